"""Group commit: concurrent calls of one kind, coalesced into one statement and one commit.

A `Batcher` takes requests from any number of concurrent callers and runs them in
batches through one function (one statement over arrays), each caller getting its own
answer, exactly as it would alone. Batching is natural: a caller alone goes at once (no
timer, no added wait); while a batch is in the database, the next one gathers (one batch
in flight per kind makes the biggest batches: measured faster than two or three). A
batch still in the database after `STALL_SECONDS` (a row another transaction holds) no
longer holds the others back: each such batch opens one more place, up to `max_in_flight`.

- Requests with a key in common (the same job, the same Stripe event, the same user)
  never share a batch: the later one waits for the next batch, so it sees the earlier
  one's committed result, as it would have alone.
- A batch whose statement raises (a constraint that only one row trips) falls back to
  running its requests one by one, so only that caller gets the error.
- A batch runs in a task of its own: a caller cancelled while it runs (client gone, a
  timeout) neither breaks it nor loses its committed change; it only stops waiting.
- Batch size is bounded (`max_size`); a request waits at most for the batch in flight
  and its own, each bounded by the statement timeout.
- Inside a transaction (the engine's current one) a request runs on its own, on that
  transaction's connection: its commit is the caller's.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Generic, TypeVar

import asyncpg

from jobs_app.core import errors, metrics
from jobs_app.db.connector import in_transaction

MAX_IN_FLIGHT = 4
"""Batches of one kind in the database at once, per process, at most (the default)."""
STALL_SECONDS = 0.05
"""A batch in the database longer than this is stalled: another may start beside it."""

Request = TypeVar("Request")
Answer = TypeVar("Answer")

RunBatch = Callable[[Sequence[Request]], Awaitable[Sequence[Answer | BaseException]]]
"""Runs requests in one statement: an answer, or the error to raise, for each, in order."""


class Batcher(Generic[Request, Answer]):
    """See the module docstring. `keys(request)` names what two requests must not share."""

    def __init__(
        self,
        name: str,
        run: RunBatch[Request, Answer],
        *,
        keys: Callable[[Request], Iterable[Hashable]],
        max_size: int = 200,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.name = name
        self._run = run
        self._keys = keys
        self.max_size = max_size
        self.max_in_flight = max_in_flight
        self._pending: deque[tuple[Request, asyncio.Future[Answer]]] = deque()
        self._in_flight: dict[asyncio.Task[None], float] = {}
        """Each batch in flight, and when it started (the loop's clock)."""
        self._stall_check: asyncio.TimerHandle | None = None
        self._busy: set[Hashable] = set()
        """The keys of the batches in flight: their requests' successors wait."""
        self._sizes = metrics.BATCH_SIZE.labels(name)

    async def submit(self, request: Request) -> Answer:
        """The answer to `request`, once its batch has committed (or its error)."""
        if in_transaction():
            [answer] = await self._run([request])
            if isinstance(answer, BaseException):
                raise answer
            return answer
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        self._kick()
        # Cancelling the caller cancels only its wait: the batch goes on without it.
        return await future

    def _kick(self) -> None:
        """Send batches while there is room in flight and requests free to go."""
        loop = asyncio.get_running_loop()
        while self._pending:
            now = loop.time()
            stalled = sum(now - started > STALL_SECONDS for started in self._in_flight.values())
            if len(self._in_flight) >= min(self.max_in_flight, 1 + stalled):
                if self._stall_check is None and len(self._in_flight) < self.max_in_flight:
                    self._stall_check = loop.call_later(STALL_SECONDS, self._stall_passed)
                return
            batch, keys = self._take()
            if not batch:
                return
            self._busy |= keys
            task = asyncio.create_task(self._settle(batch), name=f"batch {self.name}")
            self._in_flight[task] = now
            task.add_done_callback(functools.partial(self._done, keys=keys))

    def _stall_passed(self) -> None:
        self._stall_check = None
        self._kick()

    def _done(self, task: asyncio.Task[None], *, keys: set[Hashable]) -> None:
        self._in_flight.pop(task, None)
        self._busy -= keys
        self._kick()

    def _take(self) -> tuple[list[tuple[Request, asyncio.Future[Answer]]], set[Hashable]]:
        """The next batch and its keys: oldest first, no two requests sharing a key nor a
        key with a batch in flight, at most max_size; requests whose caller stopped
        waiting are dropped before they are sent."""
        batch: list[tuple[Request, asyncio.Future[Answer]]] = []
        taken: set[Hashable] = set()
        later: deque[tuple[Request, asyncio.Future[Answer]]] = deque()
        while self._pending and len(batch) < self.max_size:
            request, future = self._pending.popleft()
            if future.done():
                continue
            keys = set(self._keys(request))
            if not keys.isdisjoint(taken) or not keys.isdisjoint(self._busy):
                later.append((request, future))
                continue
            taken |= keys
            batch.append((request, future))
        later.extend(self._pending)
        self._pending = later
        return batch, taken

    async def _settle(self, batch: list[tuple[Request, asyncio.Future[Answer]]]) -> None:
        if not batch:
            return
        self._sizes.observe(len(batch))
        requests = [request for request, _ in batch]
        try:
            try:
                answers: list[Answer | BaseException] = list(await self._run(requests))
            except Exception as exc:
                if len(batch) == 1 or not _row_specific(exc):
                    answers = [exc] * len(batch)
                else:
                    # One row tripped something: each on its own, so only its caller sees it.
                    answers = [await self._alone(request) for request in requests]
        except BaseException:
            # The worker itself is cancelled (the loop is closing): nobody waits forever.
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), answer in zip(batch, answers, strict=True):
            if future.done():  # the caller stopped waiting; its change stands
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)

    async def _alone(self, request: Request) -> Answer | BaseException:
        try:
            [answer] = await self._run([request])
        except Exception as exc:
            return exc
        return answer


def _row_specific(exc: Exception) -> bool:
    """Whether an error may belong to one row of a batch (a constraint, the transition
    trigger, a deadlock), so that the others should be tried alone. A database that is
    down or a statement that timed out would only fail them all again, one by one."""
    if isinstance(exc, errors.DatabaseUnavailableError):
        return False
    return isinstance(
        exc,
        errors.DomainError
        | asyncpg.IntegrityConstraintViolationError
        | asyncpg.exceptions.RaiseError
        | asyncpg.exceptions.TransactionRollbackError,
    )
