"""The process's open event streams: their limits, their places, and their end.

A stream takes a place (`LiveHub.admit`) before its response starts, within the limits
(`SSE_MAX_STREAMS` per process, `SSE_MAX_STREAMS_PER_USER` per user; beyond them 429),
and gives it back exactly once, whichever path ends it. On shutdown, and on the first
SIGTERM/SIGINT (chained before uvicorn's handler, `end_streams_on_signal`), every open
stream is ended at once, so uvicorn's graceful shutdown does not wait on them; clients
reconnect elsewhere with `Last-Event-ID`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol
from uuid import UUID

from litestar.exceptions import ServiceUnavailableException, TooManyRequestsException

from jobs_app.core.metrics import OPEN_STREAMS
from jobs_app.core.settings import Settings
from jobs_app.http.live.tokens import stream_token_key
from jobs_app.loops.listener import Listener, Subscription

RETRY_AFTER_SECONDS = 5


class Endable(Protocol):
    def end(self) -> None: ...


class Slot:
    """A stream's place in the limits; released once, whichever path gets there first."""

    __slots__ = ("__weakref__", "hub", "released", "subscription", "user_id")

    def __init__(self, hub: LiveHub, user_id: UUID, subscription: Subscription) -> None:
        self.hub = hub
        self.user_id = user_id
        self.subscription = subscription
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.hub.release(self)


class LiveHub:
    """The process's open streams, their limits, and the listener feeding them."""

    def __init__(self, settings: Settings, listener: Listener) -> None:
        self.settings = settings
        self.listener = listener
        self.token_key = stream_token_key(settings.api_token)
        self._open: dict[Slot, Endable | None] = {}
        self._per_user: Counter[UUID] = Counter()
        self.closing = False

    def check_capacity(self) -> None:
        if self.closing:
            raise ServiceUnavailableException(
                "shutting down", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
            )
        if len(self._open) >= self.settings.sse_max_streams:
            raise TooManyRequestsException(
                "too many open streams on this server",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )

    def admit(self, user_id: UUID, *, job_id: UUID | None = None) -> Slot:
        """Take a place (no await between the checks and the taking), or 429."""
        self.check_capacity()
        if self._per_user[user_id] >= self.settings.sse_max_streams_per_user:
            raise TooManyRequestsException(
                "too many open streams for this user",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        if job_id is not None:
            subscription = self.listener.subscribe(job_id=job_id)
        else:
            subscription = self.listener.subscribe(user_id=user_id)
        slot = Slot(self, user_id, subscription)
        self._open[slot] = None
        self._per_user[user_id] += 1
        OPEN_STREAMS.inc()
        return slot

    def attach(self, slot: Slot, stream: Endable) -> None:
        """The stream now running in `slot`: `close_all` ends it."""
        if slot in self._open:
            self._open[slot] = stream

    def release(self, slot: Slot) -> None:
        """Give a place back (through `Slot.release`, which does it once)."""
        self._open.pop(slot, None)
        self._per_user[slot.user_id] -= 1
        if self._per_user[slot.user_id] <= 0:
            del self._per_user[slot.user_id]
        self.listener.unsubscribe(slot.subscription)
        OPEN_STREAMS.dec()

    def close_all(self) -> None:
        """End every open stream (shutdown); new ones get 503."""
        self.closing = True
        for stream in list(self._open.values()):
            if stream is not None:
                stream.end()


def end_streams_on_signal(hub: LiveHub) -> Callable[[], None]:
    """Chain a handler before uvicorn's for SIGTERM/SIGINT that ends every stream, so
    its graceful shutdown doesn't wait for them. Returns the undo."""
    loop = asyncio.get_running_loop()
    restore: list[tuple[int, Any]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: Any, previous: Callable[..., Any] = previous) -> None:
            loop.call_soon_threadsafe(hub.close_all)
            previous(signum, frame)

        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread: nothing to chain to
            continue
        restore.append((sig, previous))

    def undo() -> None:
        for sig, previous in restore:
            with contextlib.suppress(ValueError):
                signal.signal(sig, previous)

    return undo
