"""Reading Server-Sent Events from a real server process with httpx streaming."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import httpx


class SSEReader:
    """Reads one event stream in a task: the status, `retry:`, pings and every message
    (with its receipt time). `await reader.opened` / `wait_for(n)` wait with a bound."""

    def __init__(
        self, client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
    ) -> None:
        self.client = client
        self.url = url
        self.request_headers = headers or {}
        self.status: int | None = None
        self.headers: httpx.Headers | None = None
        self.body: bytes = b""
        self.retry: int | None = None
        self.pings = 0
        self.events: list[dict[str, Any]] = []
        self.received_at: list[float] = []
        self.ended = False
        self.error: BaseException | None = None
        self._opened = asyncio.Event()
        self._changed = asyncio.Event()
        self.task: asyncio.Task[None] = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async with self.client.stream(
                "GET", self.url, headers=self.request_headers, timeout=httpx.Timeout(60)
            ) as response:
                self.status = response.status_code
                self.headers = response.headers
                if response.status_code != 200:
                    self.body = await response.aread()
                    return
                message: dict[str, str] = {}
                async for line in response.aiter_lines():
                    if line == "":
                        if "data" in message:
                            self.events.append(
                                {
                                    "id": int(message["id"]),
                                    "event": message.get("event"),
                                    "data": json.loads(message["data"]),
                                }
                            )
                            self.received_at.append(time.time())
                            self._changed.set()
                        message = {}
                        continue
                    if line.startswith(":"):
                        self.pings += 1
                        self._changed.set()
                        continue
                    field, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if field == "retry":
                        self.retry = int(value)
                        self._opened.set()
                    else:
                        message[field] = value
            self.ended = True
        except (httpx.HTTPError, OSError) as exc:
            self.error = exc
        finally:
            self._opened.set()
            self._changed.set()

    async def wait_open(self, within: float = 20.0) -> None:
        async with asyncio.timeout(within):
            await self._opened.wait()

    async def wait_until(self, predicate: Any, within: float = 20.0) -> None:
        """Wait (bounded) until `predicate(self)` holds; fails with what was received."""
        try:
            async with asyncio.timeout(within):
                while True:
                    self._changed.clear()
                    if predicate(self) or self.task.done():
                        break
                    await self._changed.wait()
        except TimeoutError:
            pass
        assert predicate(self), (self.url, self.status, self.ids, self.error)

    async def wait_for(self, count: int, within: float = 20.0) -> None:
        await self.wait_until(lambda r: len(r.events) >= count, within)

    @property
    def ids(self) -> list[int]:
        return [e["id"] for e in self.events]

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def open_metric(client: httpx.AsyncClient, base: str) -> float:
    """The `jobs_sse_open_streams` value summed over the server's workers."""
    text = (await client.get(f"{base}/metrics")).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("jobs_sse_open_streams"):
            total += float(line.split()[-1])
    return total


async def wait_metric(
    client: httpx.AsyncClient, base: str, value: float, within: float = 20.0
) -> None:
    deadline = time.monotonic() + within
    current = await open_metric(client, base)
    while current != value and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # polling a gauge with a deadline
        current = await open_metric(client, base)
    assert current == value, current
