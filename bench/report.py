"""The results as a text table (the JSON holds the same figures, and the samples)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _fmt(value: Any, spec: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int | float):
        return format(value, spec)
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def render(results: dict[str, Any]) -> str:
    out: list[str] = []
    meta = results.get("meta", {})
    out.append(
        f"jobs_app bench  {meta.get('started', '')}  {meta.get('cpus', '?')} CPUs"
        f"  load {meta.get('load_before', '?')}  {meta.get('postgres', '')}"
    )
    out.append(f"command: {meta.get('command', '')}")
    sections = results.get("sections", {})
    for key, title, renderer in _SECTIONS:
        if key not in sections:
            continue
        section = sections[key]
        out.append("")
        if "error" in section:
            out.append(f"{title}: FAILED: {section['error']}")
            continue
        out.extend(renderer(title, section))
    return "\n".join(out)


def _service(title: str, s: dict[str, Any]) -> list[str]:
    how = f"{s['duration_s']} s" if s.get("ops") is None else f"{s['ops']} ops"
    head = (
        f"{title} ({s['concurrency']} tasks, pool {s['pool_size']},"
        f" {s['rounds']} rounds of {how} per side; medians, ratio = median of per-round"
        f" ratios; target >= {s['target']})"
    )
    rows = [
        [
            r["operation"],
            _fmt(r["service_ops_s"]),
            _fmt(r["raw_ops_s"]),
            _fmt(r["ratio"], ".2f"),
            _fmt(r["met"]),
            _fmt(r.get("raw_timeouts_ops_s")),
            _fmt(r.get("ratio_to_raw_timeouts"), ".2f"),
        ]
        for r in s["rows"]
    ]
    headers = ["operation", "service ops/s", "raw ops/s", "ratio", "met"]
    headers += ["raw+timeouts ops/s", "ratio to it"]
    return [head, *_table(headers, rows)]


def _round_trips(title: str, s: dict[str, Any]) -> list[str]:
    head = (
        f"{title} (counted on the wire, per call; target {s['target']} for enqueue and transitions)"
    )
    rows = [
        [
            r["operation"],
            _fmt(r["round_trips"], "g"),
            "/".join(_fmt(r[k], "g") for k in ("executes", "prepares", "simple_queries")),
            _fmt(r["first_call_round_trips"], "g"),
            _fmt(r.get("met"), ""),
        ]
        for r in s["rows"]
    ]
    return [
        head,
        *_table(["operation", "round trips", "execute/prepare/simple", "first call", "met"], rows),
    ]


def _lifecycle(title: str, s: dict[str, Any]) -> list[str]:
    head = (
        f"{title} ({s['concurrency']} workflows, pool {s['pool_size']}, "
        f"{s['steps_per_lifecycle']} steps each; limit: 1-row UPDATE commits, "
        f"{s['concurrency']} connections; target ratio >= {s['target']})"
    )
    rows = [
        [
            "service lifecycle",
            _fmt(s["lifecycle_steps_s"]),
            _fmt(s["ratio"], ".2f"),
            _fmt(s["met"]),
        ],
        [
            "  same SQL, raw pool",
            _fmt(s.get("raw_lifecycle_steps_s")),
            _fmt(_over(s.get("raw_lifecycle_steps_s"), s["limit_commits_s"]), ".2f"),
            f"service/raw {_fmt(s.get('ratio_to_raw_lifecycle'), '.2f')}",
        ],
        [
            "  1-row UPDATE of provisioning_jobs",
            _fmt(s.get("jobs_update_commits_s")),
            _fmt(s.get("jobs_update_ratio_to_limit"), ".2f"),
            "",
        ],
        ["limit: 1-row UPDATE, 2-column table", _fmt(s["limit_commits_s"]), "1.00", ""],
    ]
    return [
        head,
        f"lifecycles/s: {_fmt(s['lifecycles_s'])}",
        *_table(["", "commits (steps)/s", "ratio to limit", "met"], rows),
    ]


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _http(title: str, s: dict[str, Any]) -> list[str]:
    head = (
        f"{title} ({s['workers']} workers each, {s['server']}, {s['connections']} connections,"
        f" {s['duration_s']} s runs; target ratio >= {s['target']})"
    )
    rows = [
        [
            r["endpoint"],
            _fmt(r["service_rps"]),
            _fmt(r["bare_rps"]),
            _fmt(r["ratio"], ".2f"),
            f"{_fmt(r['service_p50_ms'], '.2f')}/{_fmt(r['service_p99_ms'], '.2f')}",
            f"{_fmt(r['bare_p50_ms'], '.2f')}/{_fmt(r['bare_p99_ms'], '.2f')}",
            _fmt(r["met"]),
        ]
        for r in s["rows"]
    ]
    return [
        head,
        *_table(
            [
                "endpoint",
                "service req/s",
                "bare req/s",
                "ratio",
                "service p50/p99 ms",
                "bare p50/p99 ms",
                "met",
            ],
            rows,
        ),
    ]


def _scale(title: str, s: dict[str, Any]) -> list[str]:
    small, large = f"{s['small_jobs']:,}", f"{s['large_jobs']:,}"
    head = (
        f"{title} ({small} vs {large} jobs, {s['in_flight']} in flight; sequential calls;"
        f" per-round percentiles, medians over rounds; target: large within {s['target']}x"
        " of small)"
    )
    rows = [
        [
            r["operation"],
            _fmt(r["small_p50_ms"], ".2f"),
            _fmt(r["large_p50_ms"], ".2f"),
            _fmt(r["p50_ratio"], ".2f"),
            _fmt(r["small_p99_ms"], ".2f"),
            _fmt(r["large_p99_ms"], ".2f"),
            _fmt(r["p99_ratio"], ".2f"),
            _fmt(r["met"]),
        ]
        for r in s["rows"]
    ]
    plan = s.get("claim_plan", {}).get("large", {})
    claim = (
        f"dispatch claim at {large} jobs reads {', '.join(plan.get('indexes', []))}"
        f"{' (and scans the jobs table!)' if plan.get('seq_scan_on_jobs') else ''}"
    )
    return [
        head,
        claim,
        *_table(
            [
                "operation (ms)",
                f"p50 {small}",
                f"p50 {large}",
                "x",
                f"p99 {small}",
                f"p99 {large}",
                "x",
                "met",
            ],
            rows,
        ),
    ]


def _live(title: str, s: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["operation"],
            _fmt(r["announced_ops_s"]),
            _fmt(r["silent_ops_s"]),
            _fmt(r["ratio"], ".2f"),
        ]
        for r in s["announcements"]
    ]
    st = s["streams"]
    return [
        f"{title}: live updates announced vs not (service layer, interleaved; target >= 0.9)",
        *_table(["operation", "announced ops/s", "not announced ops/s", "ratio"], rows),
        "",
        f"{st['streams']:,} open streams on one process: {_fmt(st['kib_per_stream'], '.1f')} KiB"
        f" per stream (RSS {_fmt(st['rss_before_mib'], '.1f')} ->"
        f" {_fmt(st['rss_after_mib'], '.1f')} MiB)",
        f"GET /api/jobs/{{id}} p50/p99 ms: no stream {_fmt(st['get_job_idle_p50_ms'], '.2f')}/"
        f"{_fmt(st['get_job_idle_p99_ms'], '.2f')}, streams open"
        f" {_fmt(st['get_job_streams_open_p50_ms'], '.2f')}/"
        f"{_fmt(st['get_job_streams_open_p99_ms'], '.2f')}",
        f"commit to receipt, one transition per job fanned out to every stream: p50"
        f" {_fmt(st['delivery_p50_ms'], '.1f')} ms, p99 {_fmt(st['delivery_p99_ms'], '.1f')} ms",
        f"a client that never reads: cut off after {_fmt(st['stalled_cut_off_after_s'], '.1f')} s;"
        f" the same job's other streams got all 400 large events in"
        f" {_fmt(st['others_got_big_history_in_s'], '.1f')} s",
    ]


def _dispatch(title: str, s: dict[str, Any]) -> list[str]:
    t = s["throughput"]
    rows = [
        [r["mode"], str(r["jobs"]), _fmt(r["p50_ms"], ".1f"), _fmt(r["p99_ms"], ".1f")]
        for r in s["latency"]
    ]
    return [
        f"{title}: one dispatcher, GitHub provisioner → the GitHub stand-in on loopback",
        f"throughput: {t['jobs']:,} queued jobs dispatched in {_fmt(t['seconds'], '.2f')} s:"
        f" {_fmt(t['dispatches_per_s'])} dispatches/s",
        *_table(["wake-up", "jobs", "enqueue→request p50 ms", "p99 ms"], rows),
    ]


def _peers(title: str, s: dict[str, Any]) -> list[str]:
    head = (
        f"{title} ({s['callers']} callers, pools of {s['pool_size']}, {s['rounds']} rounds of"
        f" {s['duration_s']} s after {s['warmup_s']} s of warm-up, a fresh process each;"
        " medians; ratio = median of per-round ratios; jobs counted in the database)"
    )

    def target(r: dict[str, Any]) -> str:
        if "target" not in r:
            return ""
        aim = f" (aim {r['aim']})" if r.get("aim") else ""
        return f">= {r['target']}{aim}"

    rows = [
        [
            r["system"],
            _fmt(r["jobs_s"]),
            _fmt(r.get("ratio"), ".2f"),
            target(r),
            _fmt(r.get("met"), ""),
            _fmt(r["write_xacts_per_job"], ".2f"),
            _fmt(r["commits_per_job"], ".2f"),
            _fmt(r["wal_bytes_per_job"]),
            _fmt(r["round_trips_per_job"], ".2f"),
        ]
        for r in s["rows"]
    ]
    headers = ["system", "jobs/s", "jobs_app/it", "target", "met", "write xacts/job"]
    headers += ["commits/job", "WAL B/job", "round trips/job"]
    out = [head, *_table(headers, rows)]
    out += [f"{name}: skipped, {why}" for name, why in s.get("skipped", {}).items()]
    out += [f"{name}: FAILED, {why[:300]}" for name, why in s.get("failed", {}).items()]
    out += [f"note: {note}" for note in s.get("notes", [])]
    return out


def _lone(title: str, s: dict[str, Any]) -> list[str]:
    head = (
        f"{title} ({s['calls_per_run']} jobs per run, {s['rounds']} rounds, a fresh process"
        " and database per side; medians; shipped/it = median of per-round ratios of the"
        f" transition p50, target <= {s['target']} over the baseline)"
    )
    rows = [
        [
            r["side"],
            _fmt(r["enqueue_p50_ms"], ".3f"),
            _fmt(r["provisioning_p50_ms"], ".3f"),
            _fmt(r["running_p50_ms"], ".3f"),
            _fmt(r["transition_p50_ms"], ".3f"),
            _fmt(r.get("shipped_over_it"), ".2f"),
            _fmt(r.get("client_cpu_ms_per_job"), ".3f"),
            _fmt(r.get("server_cpu_ms_per_job"), ".3f"),
        ]
        for r in s["rows"]
    ]
    headers = ["side", "enqueue ms", "provisioning ms", "running ms", "transition ms"]
    return [head, *_table([*headers, "shipped/it", "client CPU ms/job", "server CPU ms/job"], rows)]


_SECTIONS = [
    ("service", "1. Service layer vs raw asyncpg", _service),
    ("round_trips", "2. Round trips", _round_trips),
    ("lifecycle", "3. Full lifecycle vs commit limit", _lifecycle),
    ("http", "4. HTTP: jobs-app serve vs bare Litestar", _http),
    ("scale", "5. Scale", _scale),
    ("live", "6. Live updates", _live),
    ("dispatch", "7. Dispatch", _dispatch),
    ("peers", "8. Peers: the full lifecycle beside pgqueuer and procrastinate", _peers),
    ("lone", "9. A lone caller: p50 latency, concurrency 1", _lone),
]
