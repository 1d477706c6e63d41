"""A small HTTP/1.1 keep-alive load generator, for machines without wrk.

Runs in its own process (the bench starts it) so it never shares an event loop
with what it measures:

    python -m bench.loader --port 8000 --connections 16 --duration 3 --requests reqs.json

`reqs.json` is a list of [method, path, headers, body]; each connection cycles
through it from its own offset. Prints one JSON line: requests, seconds, non-2xx
answers, socket errors, p50/p99 latency in microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def _encode(host: str, method: str, path: str, headers: dict[str, str], body: str) -> bytes:
    raw = body.encode()
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(raw)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + raw


async def _connection(
    host: str, port: int, requests: list[bytes], offset: int, deadline: float, out: dict[str, Any]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = offset
    latencies: list[float] = out["latencies"]
    try:
        while time.perf_counter() < deadline:
            request = requests[i % len(requests)]
            i += 1
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not 200 <= status < 300:
                out["non_2xx"] += 1
    except (OSError, asyncio.IncompleteReadError):
        out["socket_errors"] += 1
    finally:
        writer.close()


async def run(host: str, port: int, connections: int, duration: float, spec: list[Any]) -> dict:
    requests = [_encode(host, m, p, h, b) for m, p, h, b in spec]
    out: dict[str, Any] = {"latencies": [], "non_2xx": 0, "socket_errors": 0}
    started = time.perf_counter()
    deadline = started + duration
    step = max(len(requests) // connections, 1)
    await asyncio.gather(
        *(_connection(host, port, requests, c * step, deadline, out) for c in range(connections))
    )
    elapsed = time.perf_counter() - started
    latencies = sorted(out["latencies"])
    n = len(latencies)
    return {
        "requests": n,
        "seconds": elapsed,
        "non_2xx": out["non_2xx"],
        "socket_errors": out["socket_errors"],
        "p50_us": latencies[n // 2] * 1e6 if n else None,
        "p99_us": latencies[min(int(n * 0.99), n - 1)] * 1e6 if n else None,
    }


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop when it is installed (the server runs on it too)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--requests", required=True)
    args = parser.parse_args()
    with open(args.requests) as f:
        spec = json.load(f)
    result = run_loop(run(args.host, args.port, args.connections, args.duration, spec))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
