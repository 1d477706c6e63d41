"""The benchmarks can't rot, and the hot queries keep their indexes.

Neither test asserts a timing: the smoke run checks that `python -m bench --quick`
produces every section and counts one round trip per write; the EXPLAIN test checks
each hot statement's plan on a table big enough for the planner to care.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg

import bench.lone
from bench import seed
from bench.main import SECTIONS as BENCH_SECTIONS
from jobs_app.core.lifecycle import TRANSITIONS, Actor, JobStatus
from jobs_app.services import dispatches, jobs

REPO = Path(__file__).resolve().parent.parent
SECTIONS = set(BENCH_SECTIONS)  # every section the bench has
ONE_ROUND_TRIP = {"enqueue", "claim", "heartbeat", "complete", "fail", "retry"}


def test_quick_bench_runs_every_section(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    # DATABASE_URL (set by conftest) names the server; the bench makes its own database.
    run = subprocess.run(
        # The lone caller's optional baseline: this checkout again, loaded as another one.
        [sys.executable, "-m", "bench", "--quick", "--json", str(out), "--lone-baseline", "."],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    sections = results["sections"]
    assert set(sections) == SECTIONS
    for name, section in sections.items():
        assert "error" not in section, (name, section["error"])

    service = {row["operation"]: row for row in sections["service"]["rows"]}
    assert set(service) >= {"enqueue", "claim", "heartbeat", "complete", "fail+retry"}
    assert all(row["service_ops_s"] > 0 and row["raw_ops_s"] > 0 for row in service.values())

    trips = {row["operation"]: row for row in sections["round_trips"]["rows"]}
    for operation in ONE_ROUND_TRIP:
        assert trips[operation]["round_trips"] == 1, trips[operation]
        assert trips[operation]["executes"] == 1, trips[operation]

    assert sections["lifecycle"]["lifecycle_steps_s"] > 0
    assert sections["lifecycle"]["limit_commits_s"] > 0
    assert len(sections["http"]["rows"]) == 2
    assert all(row["service_rps"] > 0 and row["bare_rps"] > 0 for row in sections["http"]["rows"])
    scale = {row["operation"] for row in sections["scale"]["rows"]}
    assert scale == {"enqueue", "get_job_by_agent_id", "get_job", "heartbeat", "sweep_stale_jobs"}
    plan = sections["scale"]["claim_plan"]["large"]
    assert "provisioning_jobs_in_flight" in plan["indexes"] and not plan["seq_scan_on_jobs"]
    dispatch = sections["dispatch"]
    assert dispatch["throughput"]["dispatches_per_s"] > 0
    assert [r["mode"] for r in dispatch["latency"]] == ["notifications", "polling (1 s)"]
    live = sections["live"]
    announced = live["announcements"]
    assert {r["operation"] for r in announced} == {"enqueue", "claim", "heartbeat", "complete"}
    assert all(r["announced_ops_s"] > 0 and r["silent_ops_s"] > 0 for r in announced)
    assert live["streams"]["streams"] == 50 and live["streams"]["others_complete"]
    assert live["streams"]["delivery_p99_ms"] > 0

    lone = {row["side"]: row for row in sections["lone"]["rows"]}
    assert set(lone) == {"shipped", *bench.lone.SIDE_ENV, "baseline"}
    for row in lone.values():
        assert all(row[f"{op}_p50_ms"] > 0 for op in ("enqueue", "provisioning", "running"))
        # The caller's CPU clock is exact; the server processes' /proc counts are in ticks
        # (10 ms), which a quick run's few jobs may not reach.
        assert row["client_cpu_ms_per_job"] > 0 and row["server_cpu_ms_per_job"] >= 0
    assert lone["baseline"]["shipped_over_it"] > 0

    # The peers that are installed (the `bench` extra, which `dev` includes) were measured,
    # and every figure came out of the database or the wire; none failed.
    peers = sections["peers"]
    assert peers["failed"] == {}, peers["failed"]
    installed = {"jobs_app"} | {
        name for name in ("pgqueuer", "procrastinate") if importlib.util.find_spec(name)
    }
    rows = {row["system"]: row for row in peers["rows"]}
    assert set(rows) == installed, (rows, peers["skipped"])
    assert set(peers["skipped"]) == {"pgqueuer", "procrastinate"} - installed
    for name, row in rows.items():
        assert row["jobs_s"] > 0, row
        assert row["write_xacts_per_job"] > 0 and row["wal_bytes_per_job"] > 0, row
        assert row["round_trips_per_job"] > 0, row
        if name != "jobs_app":
            assert row["ratio"] > 0 and "met" in row, row


# --------------------------------------------------------------------------- plans


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += _nodes(child)
    return found


async def _explain(db: asyncpg.Connection, statement: Any, **values: Any) -> list[dict]:
    raw = await db.fetchval("EXPLAIN (FORMAT JSON) " + statement.sql, *statement.args(values))
    return _nodes(json.loads(raw)[0]["Plan"])


async def test_hot_statements_use_their_indexes(db: asyncpg.Connection) -> None:
    pop = await seed.population(db, "plan", total_jobs=20_000, in_flight=100)
    busy = seed.job_id("plan", pop.in_flight_jobs[0])
    user, agent = seed.user_id("plan", 5), seed.agent_id("plan", 5)
    timeouts = {"timeout": 900, "deadline": 3600, "queue_timeout": 900}
    by_id = "pkey"

    def one(**values: Any) -> dict[str, Any]:
        """A batched statement's values for one call (arrays of one), and the plan."""
        progress = {"plan": ["create_vm", "install_agent"]}
        return {k: [v] for k, v in values.items()} | progress

    moved = {"job_id": busy, "attempt": 1, "workflow_run_id": None, "dispatch_id": None}
    moved |= {"actor": Actor.WORKFLOW, "error": None, "failed_step": None}
    cases: list[tuple[str, Any, dict[str, Any], str]] = [
        ("get_job_by_agent_id", jobs.BY_AGENT, {"agent_id": agent}, "agent_newest"),
        (
            "get_job_by_stripe_event_id",
            jobs.BY_STRIPE_EVENT,
            {"stripe_event_id": seed.stripe_event_id("plan", 5)},
            "stripe_event_id_key",
        ),
        (
            "enqueue",
            jobs.ENQUEUES,
            one(
                agent_id=agent,
                user_id=user,
                stripe_event_id=seed.stripe_event_id("plan", 5),
                region="us-east",
                max_retries=3,
                actor=Actor.API,
            ),
            "stripe_event_id_key",
        ),
        (
            "enqueue, alone",
            jobs.ENQUEUE,
            {
                "agent_id": agent,
                "user_id": user,
                "stripe_event_id": seed.stripe_event_id("plan", 5),
                "region": "us-east",
                "max_retries": 3,
                "actor": Actor.API,
            },
            "stripe_event_id_key",
        ),
        (
            "heartbeat",
            jobs.HEARTBEATS,
            one(job_id=busy, attempt=1, dispatch_id=None, workflow_run_id=None),
            by_id,
        ),
        (
            "heartbeat, alone",
            jobs.HEARTBEAT,
            {"job_id": busy, "attempt": 1, "dispatch_id": None, "workflow_run_id": None},
            by_id,
        ),
        *(
            (
                f"to {to}",
                jobs.TRANSITIONS_BATCH,
                one(
                    to_status=to,
                    failure_reason="workflow_error" if to == JobStatus.FAILED else None,
                    **moved,
                ),
                by_id,
            )
            for to in TRANSITIONS
        ),
        *(
            (
                f"to {to}, alone",
                jobs.TRANSITION,
                {
                    "to_status": to,
                    "failure_reason": "workflow_error" if to == JobStatus.FAILED else None,
                    **moved,
                },
                by_id,
            )
            for to in TRANSITIONS
        ),
        (
            "retry",
            jobs.RETRY,
            {
                "job_id": busy,
                "grant_extra": False,
                "actor": Actor.API,
                "reason": "retry",
                "plan": ["create_vm"],
            },
            by_id,
        ),
        (
            "get_job",
            jobs.GET_JOB_CHECKED,
            {"job_id": busy, "plan": ["create_vm", "install_agent"], **timeouts},
            by_id,
        ),
        (
            "list_jobs by user",
            jobs.list_statement(("user_id",)),
            {"user_id": user, "limit": 51},
            "user_newest",
        ),
        ("sweep", jobs.SWEEP, {"batch": 1000, **timeouts}, "in_flight"),
        (
            "dispatch claim",
            dispatches.CLAIM,
            {"owner": "bench", "provisioner": "github", "lease": 60.0, "batch": 20},
            "in_flight",
        ),
        (
            "dispatcher round",
            dispatches.ROUND,
            {"owner": "bench", "provisioner": "github", "lease": 60.0, "batch": 20}
            | {"deadline": 600, "cancel_batch": 20},
            "in_flight",
        ),
    ]
    # The plan for these values, and the generic plan a prepared statement may switch to
    # after a few runs (it knows no values: arrays of unknown length).
    for mode in ("auto", "force_generic_plan"):
        await db.execute(f"SET plan_cache_mode = {mode}")
        for name, statement, values, index in cases:
            nodes = await _explain(db, statement, **values)
            on_jobs = [n for n in nodes if n.get("Relation Name") == "provisioning_jobs"]
            scans = [n["Node Type"] for n in on_jobs if n["Node Type"] != "ModifyTable"]
            assert "Seq Scan" not in scans, (mode, name, scans)
            used = {n["Index Name"] for n in nodes if "Index Name" in n}
            assert f"provisioning_jobs_{index}" in used, (mode, name, used)
    await db.execute("RESET plan_cache_mode")
