"""One open event stream: the loop that reads `job_events` and writes Server-Sent Events.

Every decision that has a status (401, 403, 429, 404, 400) is taken by the route before
the response starts; the stream itself is `EventStream.run`, driven by our own ASGI
response so its end is ours: its place is freed in a `finally` (and, should the
response never be called, when it is garbage-collected), not when a generator that a
cancelled task may never close gets closed.

A stream subscribes to the process's listener, then reads `job_events` after the last
id it sent whenever its subscription wakes (the first wake is the replay, from
`Last-Event-ID` or the start); ids only move forward, so the replay and the live part
neither miss nor repeat an event. It holds at most one batch of rows; a client that
stops reading fills the transport's bounded write buffer, the next send waits, and
after `SSE_SEND_TIMEOUT_SECONDS` the stream is cut off (the client resumes from its
`Last-Event-ID`). Other streams never wait for it: each runs in its own request task,
and the listener only sets events.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import weakref
from collections.abc import Awaitable, Callable

import msgspec
from litestar.response.base import ASGIResponse
from litestar.types import Receive, Scope, Send

from jobs_app.core import errors
from jobs_app.core.logs import get_logger
from jobs_app.core.metrics import STREAMS_CUT_OFF
from jobs_app.http.live.hub import LiveHub, Slot
from jobs_app.services.live import StepMessage, StreamEvent

log = get_logger("jobs_app.streams")

RETRY_MS = 3000
BATCH = 100
"""Rows read per query: what one stream holds at most."""

Read = Callable[[int, int], Awaitable[list[StreamEvent]]]
"""(after, limit) → the stream's events with id > after, oldest first."""

_CUT_OFF_HERE: contextvars.ContextVar[bool] = contextvars.ContextVar("sse_cut_off", default=False)


class QuietCutOff(logging.Filter):
    """A stream cut off for not reading ends without completing its response, which
    uvicorn reports as an error; it was ours, and logged as a warning already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            _CUT_OFF_HERE.get() and "without completing response" in str(record.getMessage())
        )


QUIET_CUT_OFF = QuietCutOff()
"""uvicorn.error's filter (the app factory installs it)."""


class _CutOff(Exception):
    """The client took no data for the send timeout."""


class EventStream:
    """One open stream's loop (see the module docstring)."""

    def __init__(self, hub: LiveHub, slot: Slot, after: int, read: Read) -> None:
        self.hub = hub
        self.slot = slot
        self.after = after
        self.read = read
        self.ending = False
        self.gone = False

    def end(self) -> None:
        self.ending = True
        self.slot.subscription.wake.set()

    async def run(self, send: Send, receive: Receive) -> None:
        settings = self.hub.settings
        wake = self.slot.subscription.wake
        self.hub.attach(self.slot, self)
        watcher = asyncio.create_task(self._watch_disconnect(receive))
        try:
            last_sent = await self._send(send, f"retry: {RETRY_MS}\n\n".encode())
            while not (self.ending or self.gone):
                if wake.is_set():
                    wake.clear()
                    try:
                        events = await self.read(self.after, BATCH)
                    except errors.DatabaseUnavailableError:
                        log.warning("event stream ended: database unavailable")
                        break
                    for event in events:
                        kind = b"step" if isinstance(event, StepMessage) else b"transition"
                        data = msgspec.json.encode(event)
                        last_sent = await self._send(
                            send, b"id: %d\nevent: %s\ndata: %s\n\n" % (event.id, kind, data)
                        )
                        self.after = event.id
                    if len(events) == BATCH:
                        wake.set()  # more to read
                    continue
                idle = last_sent + settings.sse_ping_seconds - time.monotonic()
                if idle <= 0:
                    last_sent = await self._send(send, b": ping\n\n")
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(idle):
                        await wake.wait()
            if not self.gone:
                await self._send(send, b"", more_body=False)
        except _CutOff:
            STREAMS_CUT_OFF.inc()
            _CUT_OFF_HERE.set(True)
            log.warning(
                "event stream cut off: the client took no data",
                send_timeout_seconds=settings.sse_send_timeout_seconds,
            )
        finally:
            watcher.cancel()

    async def _send(self, send: Send, body: bytes, *, more_body: bool = True) -> float:
        try:
            async with asyncio.timeout(self.hub.settings.sse_send_timeout_seconds):
                await send({"type": "http.response.body", "body": body, "more_body": more_body})
        except TimeoutError:
            raise _CutOff from None
        return time.monotonic()

    async def _watch_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                self.slot.subscription.wake.set()
                return


class EventStreamResponse(ASGIResponse):
    """The `text/event-stream` response that runs an EventStream and frees its place."""

    _should_set_content_length = False

    def __init__(self, stream: EventStream) -> None:
        super().__init__(
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            status_code=200,
        )
        self.stream = stream
        # If this response is never called, its place is still freed.
        weakref.finalize(self, stream.slot.release)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.slot.release()

    async def send_body(self, send: Send, receive: Receive) -> None:
        await self.stream.run(send, receive)
