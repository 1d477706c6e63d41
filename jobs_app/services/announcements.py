"""What this process has just committed, told to whoever listens in it, and to the
other replicas.

Every service statement that records `job_events` rows hands back their ids; once the
statement has committed, the service calls `announce(events)`. In-process sinks (the
listener, which wakes this process's streams and dispatcher at once) take it from there;
the listener then tells the other replicas with `notify_others`: one NOTIFY per round
(rounds at least 20 ms apart), in a transaction of its own that writes nothing and
commits asynchronously (on the listener's own connection while it is up), so no
transition's commit takes PostgreSQL's instance-wide NOTIFY lock.

A sink is called synchronously and must not block (queue the events, set an event).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from uuid import UUID

import asyncpg
import msgspec

from jobs_app.core.logs import get_logger
from jobs_app.db.connector import connection

log = get_logger("jobs_app.announcements")

CHANNEL = "job_events"
NOTIFY_MAX_BYTES = 7900
"""NOTIFY takes at most 8,000 bytes of payload."""
ASYNC_COMMIT = {"synchronous_commit": "off"}
"""The session setting of a connection `notify_others` may use: its transactions (NOTIFYs
only) commit without waiting for their WAL flush."""


class Notification(msgspec.Struct, frozen=True, omit_defaults=True):
    """One announcement on the `job_events` channel: whom some committed events concern.

    From the service layer of a replica: `ids` (the events), `origin` (the process, which
    ignores its own). From the job_events trigger (any other writer): the statement's
    id range, `first` to `last`. `jobs is None` means any job may be concerned (a range
    too big to list, or `reconnected`).
    """

    first: int = 0
    last: int = 0
    queued: bool = True
    jobs: list[UUID] | None = None
    users: list[UUID] | None = None
    ids: list[int] | None = None
    origin: str | None = None
    reconnected: bool = False
    """Not from PostgreSQL: the listener is (again) listening and may have missed some."""


class Committed(msgspec.Struct, frozen=True, array_like=True):
    """One committed `job_events` row: whom it concerns."""

    id: int
    job_id: UUID
    user_id: UUID
    queued: bool
    """The event entered `queued` (an enqueue or a retry): the dispatcher's cue."""


Sink = Callable[[Sequence[Committed]], None]

_sinks: list[Sink] = []


def add_sink(sink: Sink) -> Callable[[], None]:
    """Call `sink(events)` with everything this process commits from now on; returns
    the function that removes it (the process's background loops add one on start and
    remove it on stop)."""
    _sinks.append(sink)

    def remove() -> None:
        with contextlib.suppress(ValueError):
            _sinks.remove(sink)

    return remove


def announce(events: Sequence[Committed]) -> None:
    """Tell every sink (after the events' commit)."""
    if not events:
        return
    for sink in list(_sinks):
        try:
            sink(events)
        except Exception:  # a sink's fault must not fail the caller's committed change
            log.exception("announcement sink failed")


def notification_of(events: Sequence[Committed], origin: str | None = None) -> Notification:
    """The events as one notification (ids, and whom they concern)."""
    ids = [event.id for event in events]
    return Notification(
        first=min(ids),
        last=max(ids),
        queued=any(event.queued for event in events),
        jobs=list(dict.fromkeys(event.job_id for event in events)),
        users=list(dict.fromkeys(event.user_id for event in events)),
        ids=ids,
        origin=origin,
    )


def _payloads(events: Sequence[Committed], origin: str) -> list[str]:
    """The events as NOTIFY payloads of at most NOTIFY_MAX_BYTES each."""
    payloads: list[str] = []
    pending = list(events)
    while pending:
        size = len(pending)
        while True:
            text = msgspec.json.encode(notification_of(pending[:size], origin)).decode()
            if len(text) <= NOTIFY_MAX_BYTES or size == 1:
                break
            size = max(1, size * NOTIFY_MAX_BYTES // len(text))
        payloads.append(text)
        pending = pending[size:]
    return payloads


async def notify_others(
    events: Sequence[Committed], origin: str, conn: asyncpg.Connection | None = None
) -> None:
    """Tell the other replicas, in one round trip: on `conn`, a session that writes
    nothing else and commits asynchronously (the listener's own: see `ASYNC_COMMIT`), or
    else on a pooled connection, in a transaction made to commit asynchronously. Either
    way nothing waits for a WAL flush while it holds NOTIFY's lock.

    The payloads are our own JSON of ids (no quote character in them) written as
    literals: a simple-protocol round trip runs the whole transaction.
    """
    notifies = "".join(
        f"NOTIFY {CHANNEL}, '{payload.replace(chr(39), chr(39) * 2)}';"
        for payload in _payloads(events, origin)
    )
    if conn is not None:
        await conn.execute(notifies)
        return
    async with connection() as pooled:
        await pooled.execute(f"BEGIN; SET LOCAL synchronous_commit TO off; {notifies} COMMIT;")
