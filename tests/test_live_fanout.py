"""Fan-out across processes: 2 replicas x 2 workers (`jobs-app serve --workers 2`
twice, one database), 400 concurrent event streams spread over both, 200 transitions
made through both: every stream receives exactly its job's or user's events, each
once, in order. Commit-to-receipt p50/p99 go to the reliability figures."""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import datetime
from typing import Any

import httpx

from tests.conftest import API_HEADERS, record_figure
from tests.http_helpers import callback, make_job
from tests.sse_helpers import SSEReader, wait_metric

JOBS = 100


async def test_400_streams_over_2_replicas_of_2_workers_get_exactly_their_events(
    start_logged_server: Any, db: Any
) -> None:
    replicas = await asyncio.gather(start_logged_server(2), start_logged_server(2))
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    clients = [
        httpx.AsyncClient(base_url=r.url, headers=API_HEADERS, timeout=30, limits=limits)
        for r in replicas
    ]
    readers: list[tuple[str, str, SSEReader]] = []
    try:
        semaphore = asyncio.Semaphore(16)

        async def new_job(i: int) -> dict[str, Any]:
            async with semaphore:
                return await make_job(clients[i % 2])

        jobs = await asyncio.gather(*(new_job(i) for i in range(JOBS)))
        for job in jobs:
            for client in clients:  # each job and each user followed on both replicas
                readers.append(
                    ("job", job["id"], SSEReader(client, f"/api/jobs/{job['id']}/events/stream"))
                )
                readers.append(
                    (
                        "user",
                        job["id"],
                        SSEReader(client, f"/api/users/{job['user_id']}/events/stream"),
                    )
                )
        assert len(readers) == 400
        await asyncio.gather(*(reader.wait_open(60) for _, _, reader in readers))
        assert all(reader.status == 200 for _, _, reader in readers)
        for replica, client in zip(replicas, clients, strict=True):
            await wait_metric(client, replica.url, 200)

        started = time.monotonic()

        async def advance(i: int, job: dict[str, Any]) -> None:
            for k, status in enumerate(("provisioning", "running")):
                async with semaphore:
                    client = clients[(i + k) % 2]  # through both replicas
                    r = await callback(
                        client, job["id"], "status", {"attempt": 1, "status": status}
                    )
                    assert r.status_code == 200, r.text

        await asyncio.gather(*(advance(i, job) for i, job in enumerate(jobs)))
        transitions_seconds = time.monotonic() - started
        await asyncio.gather(
            *(reader.wait_for(3 if kind == "job" else 2, within=60) for kind, _, reader in readers)
        )

        rows = await db.fetch("SELECT id, job_id, created_at FROM job_events ORDER BY id")
        history: dict[str, list[int]] = {}
        created: dict[int, datetime] = {}
        for row in rows:
            history.setdefault(str(row["job_id"]), []).append(row["id"])
            created[row["id"]] = row["created_at"]
        assert len(rows) == JOBS * 3
        latencies: list[float] = []
        for kind, job_id, reader in readers:
            expected = history[job_id] if kind == "job" else history[job_id][1:]
            assert reader.ids == expected, (kind, job_id, reader.ids, expected)
            assert all(e["data"]["job_id"] == job_id for e in reader.events)
            for event, at in zip(reader.events, reader.received_at, strict=True):
                if event["data"]["to_status"] != "queued":  # live, not the replay
                    latencies.append(at - created[event["id"]].timestamp())
        latencies.sort()
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        record_figure(
            "SSE fan-out",
            processes="2 replicas x 2 workers",
            streams=len(readers),
            transitions=JOBS * 2,
            live_messages=len(latencies),
            transitions_made_in_s=round(transitions_seconds, 2),
            commit_to_receipt_p50_ms=round(statistics.median(latencies) * 1000, 1),
            commit_to_receipt_p99_ms=round(p99 * 1000, 1),
            commit_to_receipt_max_ms=round(latencies[-1] * 1000, 1),
            missing_or_duplicate=0,
        )
    finally:
        for _, _, reader in readers:
            await reader.close()
    try:
        for replica, client in zip(replicas, clients, strict=True):
            await wait_metric(client, replica.url, 0)  # no subscriber left behind
    finally:
        for client in clients:
            await client.aclose()
    for replica in replicas:
        assert "Traceback" not in replica.log_text(), replica.log_text()[-3000:]
