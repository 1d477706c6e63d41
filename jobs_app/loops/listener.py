"""Live-update announcements for one process: what it commits, what the other replicas
commit, and what anyone else writes, fanned out to this process's streams and
dispatcher.

`job_events` is the truth; an announcement is only a hint to read it. Three ways in:

- **Local**: the service layer announces what it commits, after the commit
  (`services/announcements.py`). The listener wakes this process's streams and observers
  at once, and tells the other replicas: one NOTIFY per round (whatever this process
  committed since the previous round), in a transaction of its own that writes nothing
  and commits asynchronously, sent on the LISTEN connection itself (no pooled
  connection, no second server process woken for it; a pooled one while that connection
  is being replaced); rounds start at least `ANNOUNCE_SPACING` (20 ms) apart, so
  under load one small transaction carries many batches' commits, and a commit after a
  quiet spell goes at once. A transition's commit never takes PostgreSQL's
  instance-wide NOTIFY lock.
- **Other replicas and other writers**: one LISTEN connection per process on the
  `job_events` channel. Replicas send the event ids (a process ignores its own); any
  other writer (hand-written SQL, a migration) is announced by the job_events trigger,
  in its own transaction.
- **Catch-up**: every `catch_up_interval` seconds (1 s), one cheap read of the events
  after the last id it has seen (and of the ids it found missing, which a transaction
  still in flight may yet commit, until `GAP_SECONDS`): whatever was committed but
  never announced (a process killed between its commit and its NOTIFY, a notification
  lost while the connection was down) wakes its streams within a second or two.

The LISTEN connection is dedicated and outside the pool: a pooled connection is handed
to other work between operations, and listeners are lost with their connection. It is
checked every `health_interval` seconds (`SELECT 1` with a timeout) and watched by
asyncpg's termination callback; when it fails it is replaced, with backoff and jitter,
and LISTEN is issued again. Once listening (at start and after every reconnect), a
`Notification(reconnected=True)` wakes every subscriber, which re-reads from what it
last delivered.

Public API (the streams use the first two; the dispatcher the third):

- `subscribe(job_id=…)` / `subscribe(user_id=…)` → a `Subscription` whose `wake` event
  is set whenever something may concern it (set at first: its first read is the
  replay); `unsubscribe(subscription)` when the stream ends.
- `add_observer(callback)` → a function that removes it. `callback(notification)` is
  called with every `Notification`: it must not block (set an `asyncio.Event`, say).
  `notification.queued` is true when one of the announced events entered `queued` (a
  job enqueued or retried): the dispatcher's cue to claim without waiting for its next
  poll. `jobs is None` means "any job may be concerned".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from uuid import UUID

import asyncpg
import msgspec

from jobs_app.core import metrics
from jobs_app.core.backoff import full_jitter
from jobs_app.core.errors import DatabaseUnavailableError
from jobs_app.core.logs import get_logger
from jobs_app.services import announcements, live
from jobs_app.services.announcements import CHANNEL, Committed, Notification

__all__ = ["CHANNEL", "Listener", "Notification", "Subscription"]

log = get_logger("jobs_app.listener")

APPLICATION_NAME = "jobs_app_listener"
GAP_SECONDS = 30.0
"""How long the catch-up read keeps looking for an id it found missing (a transaction
that drew it and has not committed): service statements take milliseconds; another
writer's long transaction is announced by the trigger at its commit."""
CATCH_UP_BATCH = 5000
ANNOUNCE_SPACING = 0.02
"""Rounds of announcements to the other replicas start at least this far apart. Under
load a round then carries every commit of the last 20 ms in one small transaction (one
per batch had been half of all transactions); a commit after a quiet spell goes at once."""

_RECONNECTED = Notification(reconnected=True)


class Subscription:
    """A stream's interest in one job or one user."""

    __slots__ = ("job_id", "user_id", "wake")

    def __init__(self, *, job_id: UUID | None, user_id: UUID | None) -> None:
        self.job_id = job_id
        self.user_id = user_id
        self.wake = asyncio.Event()
        self.wake.set()  # the first read is the replay


Observer = Callable[[Notification], None]


class Listener:
    """The process's LISTEN connection (see the module docstring)."""

    def __init__(
        self,
        dsn: str,
        *,
        health_interval: float = 5.0,
        health_timeout: float = 2.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        catch_up_interval: float = 1.0,
        announce_spacing: float = ANNOUNCE_SPACING,
    ) -> None:
        self._dsn = dsn
        self.origin = uuid.uuid4().hex[:16]
        """This process, in its announcements (it ignores its own)."""
        self._catch_up_interval = catch_up_interval
        self._announce_spacing = announce_spacing
        self._health_interval = health_interval
        self._health_timeout = health_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._inbox: asyncio.Queue[str | Notification] = asyncio.Queue()
        self._to_announce: list[Committed] = []
        self._announce_wanted = asyncio.Event()
        self._seen: set[int] = set()
        """Ids announced (here or by another replica) above the catch-up's mark."""
        self._high: int | None = None
        """The catch-up's mark: every id below it was seen, or given up as a gap."""
        self._missing: dict[int, float] = {}
        """Ids below the mark not yet seen, since when (time.monotonic())."""
        self._remove_sink: Callable[[], None] | None = None
        self._by_job: dict[UUID, set[Subscription]] = {}
        self._by_user: dict[UUID, set[Subscription]] = {}
        self._all: set[Subscription] = set()
        self._observers: list[Observer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = asyncio.Event()
        """Set while LISTEN is in effect on a healthy connection."""
        self.connections = 0
        """How many connections have listened so far (1 + reconnects)."""
        self.backend_pid: int | None = None
        """The current connection's server process id (diagnostics, tests)."""
        self._conn: asyncpg.Connection | None = None
        """The LISTEN connection while it is listening: the announcements go out on it."""
        self._using = asyncio.Lock()
        """One operation at a time on it (the health check, a round's NOTIFY)."""

    # ----------------------------------------------------------------- public API

    def subscribe(self, *, job_id: UUID | None = None, user_id: UUID | None = None) -> Subscription:
        if (job_id is None) == (user_id is None):
            raise ValueError("subscribe to exactly one of job_id or user_id")
        subscription = Subscription(job_id=job_id, user_id=user_id)
        index, key = (self._by_job, job_id) if job_id is not None else (self._by_user, user_id)
        assert key is not None
        index.setdefault(key, set()).add(subscription)
        self._all.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Forget a subscription (idempotent)."""
        self._all.discard(subscription)
        pairs = ((self._by_job, subscription.job_id), (self._by_user, subscription.user_id))
        for index, key in pairs:
            if key is None:
                continue
            subscribers = index.get(key)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del index[key]

    @property
    def subscriptions(self) -> int:
        return len(self._all)

    def add_observer(self, callback: Observer) -> Callable[[], None]:
        """Call `callback(notification)` for every notification; returns its remover."""
        self._observers.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._observers.remove(callback)

        return remove

    async def start(self) -> None:
        if not self._tasks:
            self._remove_sink = announcements.add_sink(self._committed_here)
            self._tasks = [
                asyncio.create_task(self._keep_listening(), name="jobs_app listener"),
                asyncio.create_task(self._fan_out(), name="jobs_app listener fan-out"),
                asyncio.create_task(self._announce_rounds(), name="jobs_app announcer"),
                asyncio.create_task(self._catch_up_forever(), name="jobs_app catch-up"),
            ]

    async def stop(self) -> None:
        if self._remove_sink is not None:
            self._remove_sink()
            self._remove_sink = None
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if tasks and self._to_announce:  # a round cut short: sent now, not a second later
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._health_timeout):
                    await self._announce_pending()

    # ----------------------------------------------------------------- connection

    async def _keep_listening(self) -> None:
        failures = 0
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self._dsn,
                    timeout=self._health_timeout * 2,
                    server_settings={
                        "application_name": APPLICATION_NAME,
                        **announcements.ASYNC_COMMIT,
                    },
                )
                lost = asyncio.Event()
                # Synchronous, from the protocol: only note it.
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                self.connections += 1
                self.backend_pid = conn.get_server_pid()
                self._conn = conn
                self.listening.set()
                failures = 0
                self._inbox.put_nowait(_RECONNECTED)
                await self._watch(conn, lost)
                log.warning("listener connection lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: reconnect after a pause
                log.warning("listener connection failed; retrying", error=str(exc))
            finally:
                self.listening.clear()
                self._conn = None
                if conn is not None:
                    conn.terminate()  # never wait on a connection that may be dead
            await asyncio.sleep(
                max(
                    self._backoff_initial / 2,
                    full_jitter(self._backoff_initial, self._backoff_max, failures),
                )
            )
            failures += 1

    async def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Return when the connection is gone or stops answering."""
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._health_interval):
                    await lost.wait()
                    return
            try:
                async with asyncio.timeout(self._health_timeout), self._using:
                    await conn.fetchval("SELECT 1")
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                return

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._inbox.put_nowait(payload)

    # ----------------------------------------------------------------- fan-out

    async def _fan_out(self) -> None:
        while True:
            item = await self._inbox.get()
            if isinstance(item, Notification):
                notification = item
            else:
                try:
                    notification = msgspec.json.decode(item, type=Notification)
                except msgspec.DecodeError:
                    log.warning("unreadable notification; waking every stream", channel=CHANNEL)
                    notification = Notification()
                if notification.origin == self.origin:
                    continue  # ours: fanned out when it was committed
            self._deliver(notification)

    def _deliver(self, notification: Notification) -> None:
        """Observers first, then the subscriptions concerned; its ids are now seen."""
        if notification.ids is not None:
            self._seen.update(notification.ids)
        for observer in list(self._observers):
            try:
                observer(notification)
            except Exception:
                log.exception("listener observer failed")
        self._wake(notification)

    def _wake(self, notification: Notification) -> None:
        if notification.jobs is None or notification.users is None:
            for subscription in self._all:
                subscription.wake.set()
            return
        for job_id in notification.jobs:
            for subscription in self._by_job.get(job_id, ()):
                subscription.wake.set()
        for user_id in notification.users:
            for subscription in self._by_user.get(user_id, ()):
                subscription.wake.set()

    # ----------------------------------------------------------------- this process's own

    def _committed_here(self, events: Sequence[Committed]) -> None:
        """The announcements sink: this process committed `events` (synchronous)."""
        self._deliver(announcements.notification_of(events, self.origin))
        self._to_announce.extend(events)
        self._announce_wanted.set()

    async def _announce_rounds(self) -> None:
        """One NOTIFY per round to the other replicas: whatever was committed meanwhile;
        rounds start at least `announce_spacing` apart."""
        loop = asyncio.get_running_loop()
        while True:
            await self._announce_wanted.wait()
            self._announce_wanted.clear()
            started = loop.time()
            await self._announce_pending()
            await asyncio.sleep(self._announce_spacing - (loop.time() - started))

    async def _announce_pending(self) -> None:
        events, self._to_announce = self._to_announce, []
        if not events:
            return
        try:
            conn = self._conn
            if conn is None:  # being replaced: a pooled connection meanwhile
                await announcements.notify_others(events, self.origin)
            else:
                async with asyncio.timeout(self._health_timeout), self._using:
                    await announcements.notify_others(events, self.origin, conn)
            metrics.ANNOUNCEMENTS.labels("sent").inc()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the other replicas' catch-up reads find them
            log.warning("announcement not sent; the catch-up read covers it", error=str(exc))

    # ----------------------------------------------------------------- catch-up

    async def _catch_up_forever(self) -> None:
        while True:
            try:
                more = await self.catch_up()
            except asyncio.CancelledError:
                raise
            except (DatabaseUnavailableError, asyncpg.PostgresError, OSError) as exc:
                log.warning("catch-up read failed; trying again", error=str(exc))
                more = False
            if not more:
                await asyncio.sleep(self._catch_up_interval)

    async def catch_up(self) -> bool:
        """One catch-up read: deliver what was committed and never announced. True when
        there is more to read at once."""
        if self._high is None:
            self._high = await live.latest_event_id()
            return False
        events = await live.committed_since(self._high, list(self._missing), CATCH_UP_BATCH)
        found = {event.id for event in events}
        unseen = [event for event in events if event.id not in self._seen]
        if unseen:
            metrics.ANNOUNCEMENTS.labels("caught_up").inc(len(unseen))
            self._deliver(announcements.notification_of(unseen))
        now = time.monotonic()
        top = max(found, default=self._high)
        for event_id in range(self._high + 1, top + 1):
            if event_id not in found:
                self._missing.setdefault(event_id, now)
        for event_id in found:
            self._missing.pop(event_id, None)
        for event_id, since in list(self._missing.items()):
            if now - since > GAP_SECONDS:
                del self._missing[event_id]
        self._high = max(self._high, top)
        self._seen = {event_id for event_id in self._seen if event_id > self._high}
        return len(events) == CATCH_UP_BATCH
