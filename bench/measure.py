"""Load generation, interleaving and statistics.

Every comparison runs its sides in turns within one run (A B, B A, A B, ...: the
order alternates so neither side always goes first), and reports the medians of
each side and the median of the per-round ratios; the machine is shared, so the
ratios are what to read.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Budget:
    """How long one measurement lasts: `duration` seconds, or `ops` operations."""

    rounds: int
    duration: float | None = 1.0
    ops: int | None = None
    concurrency: int = 16

    def supply(self, rate_estimate: float) -> int:
        """How many single-use inputs one measurement may consume."""
        if self.ops is not None:
            return self.ops
        assert self.duration is not None
        return math.ceil(rate_estimate * self.duration * 1.5) + 4 * self.concurrency


@dataclass(frozen=True)
class Rate:
    count: int
    elapsed: float

    @property
    def per_second(self) -> float:
        return self.count / self.elapsed if self.elapsed > 0 else 0.0


async def drive(
    op: Callable[[T], Awaitable[object]],
    items: Iterator[T],
    *,
    concurrency: int,
    duration: float | None = None,
    ops: int | None = None,
) -> Rate:
    """Run `op` over `items` from `concurrency` tasks until the items, the
    duration or the operation count run out; how many completed, and in what time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration if duration is not None else math.inf
    remaining = ops if ops is not None else math.inf
    done = 0

    async def worker() -> None:
        # The deadline is checked after each operation, not before the first: a process
        # kept off the CPU past a short duration still measures something (a smoke run's
        # rate is never 0 by bad luck).
        nonlocal done, remaining
        while remaining > 0:
            try:
                item = next(items)
            except StopIteration:
                return
            remaining -= 1
            await op(item)
            done += 1
            if loop.time() >= deadline:
                return

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Rate(done, time.perf_counter() - start)


async def interleave(
    sides: Sequence[tuple[str, Callable[[], Awaitable[T]]]], rounds: int
) -> dict[str, list[T]]:
    """Call each side once per round, alternating which goes first."""
    results: dict[str, list[T]] = {name: [] for name, _ in sides}
    for r in range(rounds):
        order = sides if r % 2 == 0 else list(reversed(sides))
        for name, measure in order:
            results[name].append(await measure())
    return results


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median of round-by-round ratios: each pair was measured back to back, so
    it saw the same load from whatever else the machine runs."""
    return median([ratio(x, y) for x, y in zip(a, b, strict=True)])


def rounded(value: Any, digits: int = 3) -> Any:
    """Figures for the JSON: floats to a few significant places, recursively."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return float(f"{value:.{digits + 2}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


async def backend_cpu(url: str) -> dict[int, float]:
    """CPU seconds (user + system, from /proc) each server process of `url`'s database
    has spent so far, by pid (this same machine; the asking session left out)."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        pids = await conn.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    spent = {pid: _cpu_of(pid) for (pid,) in pids}
    return {pid: seconds for pid, seconds in spent.items() if seconds is not None}


def _cpu_of(pid: int) -> float | None:
    """A process's CPU seconds (/proc is no disk: reading it never blocks)."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # gone meanwhile
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def cpu_since(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two `backend_cpu` readings (new processes from 0)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())
