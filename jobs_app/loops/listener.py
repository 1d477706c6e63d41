"""One LISTEN connection per process, kept alive, fanning notifications out.

PostgreSQL announces every statement that inserts `job_events` rows on the
`job_events` channel (a statement-level trigger, see the migration "notify job_events
inserts"): `{"first", "last", "queued", "jobs", "users"}`, ids only, or the range alone
for a bulk statement too big for NOTIFY. A notification is a hint, never the data:
whoever it wakes reads `job_events`.

The connection is dedicated and outside the pool: a pooled connection is handed to
other work between operations, and listeners are lost with their connection. It is
checked every `health_interval` seconds (`SELECT 1` with a timeout) and watched by
asyncpg's termination callback; when it fails it is replaced, with exponential backoff
and jitter, and LISTEN is issued again. Once listening (at start and after every
reconnect), a `Notification(reconnected=True)` goes through the same path, so every
subscriber re-reads from what it last delivered: what was committed while nobody
listened still arrives.

asyncpg calls listener callbacks synchronously, from the connection's protocol; they
only queue the payload. One task takes the queue in order, parses each payload, calls
the observers and wakes the subscriptions concerned.

Public API (the streams use the first two; the dispatcher the third):

- `subscribe(job_id=…)` / `subscribe(user_id=…)` → a `Subscription` whose `wake` event
  is set whenever something may concern it (set at first: its first read is the
  replay); `unsubscribe(subscription)` when the stream ends.
- `add_observer(callback)` → a function that removes it. `callback(notification)` is
  called with every parsed `Notification`, in order, from the listener's task: it must
  not block (set an `asyncio.Event`, say). `notification.queued` is true when one of
  the announced events entered `queued` (a job enqueued or retried): the dispatcher's
  cue to claim without waiting for its next poll. `jobs is None` means "any job may
  be concerned" (a bulk statement, or `reconnected`, when `queued` is also true).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from uuid import UUID

import asyncpg
import msgspec

from jobs_app.core.backoff import full_jitter
from jobs_app.core.logs import get_logger

__all__ = ["CHANNEL", "Listener", "Notification", "Subscription"]

log = get_logger("jobs_app.listener")

CHANNEL = "job_events"
APPLICATION_NAME = "jobs_app_listener"


class Notification(msgspec.Struct, frozen=True):
    """One announced statement: its event id range and whom it concerns."""

    first: int = 0
    last: int = 0
    queued: bool = True
    jobs: list[UUID] | None = None
    """The jobs whose events were inserted; None: any job may be concerned."""
    users: list[UUID] | None = None
    reconnected: bool = False
    """Not from PostgreSQL: the listener is (again) listening and may have missed some."""


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
    ) -> None:
        self._dsn = dsn
        self._health_interval = health_interval
        self._health_timeout = health_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._inbox: asyncio.Queue[str | Notification] = asyncio.Queue()
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
            self._tasks = [
                asyncio.create_task(self._keep_listening(), name="jobs_app listener"),
                asyncio.create_task(self._fan_out(), name="jobs_app listener fan-out"),
            ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ----------------------------------------------------------------- connection

    async def _keep_listening(self) -> None:
        failures = 0
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self._dsn,
                    timeout=self._health_timeout * 2,
                    server_settings={"application_name": APPLICATION_NAME},
                )
                lost = asyncio.Event()
                # Synchronous, from the protocol: only note it.
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                self.connections += 1
                self.backend_pid = conn.get_server_pid()
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
                async with asyncio.timeout(self._health_timeout):
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
