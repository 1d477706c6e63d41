"""The dispatcher: turns each queued attempt into exactly one workflow run.

Each round it fails attempts past their dispatch deadline, cancels runs that lost,
and claims dispatches (new queued attempts, and dispatches due another try) under a
lease kept in PostgreSQL. Each claim is worked on in its own task: the provisioner
is called with no database connection held, then the outcome is recorded in one
statement. What to do with each outcome is decided here; the SQL lives in
`jobs_app.services.dispatches`, the HTTP in the provisioner. N dispatchers (one per
process, any number of replicas) give the outcome of one: claims skip locked rows, a
lease fences every record (a record refused because the lease was lost is said so in the
log, and nothing is logged as done), and at most one dispatch per attempt is live.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable
from datetime import timedelta
from typing import TypeVar

import msgspec

from jobs_app.core import metrics
from jobs_app.core.backoff import full_jitter
from jobs_app.core.errors import DatabaseUnavailableError
from jobs_app.core.lifecycle import DispatchState, TryKind
from jobs_app.core.logs import get_logger, job_context
from jobs_app.core.provisioning import (
    DispatchRequest,
    Outcome,
    Provisioner,
    Result,
    callback_url,
)
from jobs_app.core.settings import Settings
from jobs_app.core.tracing import current_traceparent, round_span
from jobs_app.services import dispatches

log = get_logger("jobs_app.dispatcher")

T = TypeVar("T")

CANCEL_MAX_TRIES = 10
RECONCILE_MARGIN = timedelta(minutes=2)
"""Runs created this long before the dispatch still count (clocks differ)."""


class DispatcherHealth(msgspec.Struct, omit_defaults=True):
    """What /health says of this process's dispatcher."""

    provisioner: str
    state: str
    """`running`, `paused` (misconfigured or rate limited; jobs wait), or `stopped`."""
    reason: str | None = None
    resumes_in_seconds: float | None = None


class Dispatcher:
    def __init__(
        self, provisioner: Provisioner, settings: Settings, *, owner: str | None = None
    ) -> None:
        self.provisioner = provisioner
        self.settings = settings
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._tasks: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._stopping = False
        self._loop: asyncio.Task[None] | None = None
        self._paused_until = 0.0
        self._pause_reason: str | None = None
        self._setbacks = 0
        """Consecutive rate limits or misconfigured answers: the backoff's exponent."""

    # ------------------------------------------------------------------ control

    def wake(self) -> None:
        """Look for work now instead of at the next interval (a job was queued)."""
        self._wake.set()

    def health(self) -> DispatcherHealth:
        if self._stopping:
            return DispatcherHealth(self.provisioner.name, "stopped")
        remaining = self._paused_until - time.monotonic()
        if remaining > 0:
            return DispatcherHealth(
                self.provisioner.name, "paused", self._pause_reason, round(remaining, 1)
            )
        return DispatcherHealth(self.provisioner.name, "running")

    def start(self) -> None:
        """Run the loop in the background until `stop()`."""
        self._loop = asyncio.create_task(self.run_forever())

    async def run_forever(self) -> None:
        interval = self.settings.dispatch_interval_seconds
        log.info("dispatcher started", provisioner=self.provisioner.name, owner=self.owner)
        while not self._stopping:
            # Cleared before the round: a job queued during it wakes the next one at once.
            self._wake.clear()
            try:
                await self.run_once()
            except DatabaseUnavailableError:
                log.warning("dispatch round skipped: database unavailable")
            except Exception:  # the next round tries again
                log.exception("dispatch round failed")
            # Jitter keeps replicas started together from polling in lockstep.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval * random.uniform(0.8, 1.2))

    async def stop(self, grace: float = 5.0) -> None:
        """Stop claiming, let requests in flight finish within `grace` seconds, then give
        every lease back (a request cut off may have started a run: it is reconciled)."""
        self._stopping = True
        if self._loop is not None:
            # A claim cut off here may still commit: its leases are released below.
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        cut_off: list[uuid.UUID] = []
        if self._tasks:
            _, still = await asyncio.wait(list(self._tasks.values()), timeout=grace)
            cut_off = [key for key, task in self._tasks.items() if task in still]
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        try:
            released = await dispatches.release_leases(self.owner, cut_off)
            log.info("dispatcher stopped", released_leases=released, cut_off=len(cut_off))
        except DatabaseUnavailableError:
            log.warning("dispatcher stopped; leases left to expire: database unavailable")

    # ------------------------------------------------------------------ one round

    async def run_once(self) -> int:
        """One round (one trace span; the work it starts is traced under it); the number
        of dispatches it started work on."""
        with round_span("dispatch.round", provisioner=self.provisioner.name) as span:
            started = await self._round()
            if span is not None:
                span.set_attribute("dispatches", started)
            return started

    async def _round(self) -> int:
        """One statement whatever there is to do (or not): deadlines, due cancels, claims.
        Paused (rate limited, misconfigured) or stopping, it only fails what is past its
        deadline, so no job waits longer than that."""
        s = self.settings
        working = not self._stopping and time.monotonic() >= self._paused_until
        taken = await dispatches.run_round(
            self.owner,
            self.provisioner.name,
            lease_seconds=s.dispatch_lease_seconds,
            deadline_seconds=s.dispatch_deadline_seconds,
            claim_batch=max(0, s.dispatch_batch - len(self._tasks)) if working else 0,
            cancel_batch=s.dispatch_batch if working else 0,
        )
        for job in taken.failed:
            log.warning(
                "job failed: dispatch deadline",
                job_id=str(job.id),
                attempt=job.attempt,
                error=job.error,
            )
        for claim in taken.claims:
            self._tasks[claim.dispatch_id] = asyncio.create_task(self._work(claim))
        if taken.cancellations:
            await asyncio.gather(*(self._cancel(c) for c in taken.cancellations))
        return len(taken.claims)

    async def drain(self) -> None:
        """Wait for the work started so far (tests use it to take a round to its end)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    # ------------------------------------------------------------------ one claim

    async def _work(self, claim: dispatches.Claim) -> None:
        try:
            await self._work_on(claim)
        finally:
            self._tasks.pop(claim.dispatch_id, None)

    async def _work_on(self, claim: dispatches.Claim) -> None:
        with (
            job_context(claim.job_id, claim.attempt, dispatch_id=claim.dispatch_id),
            round_span(
                "dispatch.reconcile" if claim.reconcile else "dispatch.request",
                job_id=str(claim.job_id),
                attempt=claim.attempt,
                dispatch_id=str(claim.dispatch_id),
            ),
        ):
            try:
                if claim.reconcile:
                    await self._reconcile(claim)
                else:
                    await self._dispatch(claim)
            except DatabaseUnavailableError:
                # The lease expires and the dispatch is taken over (and reconciled).
                log.warning("dispatch outcome not recorded: database unavailable")
            except Exception:
                log.exception("dispatch failed unexpectedly")

    async def _dispatch(self, claim: dispatches.Claim) -> None:
        request = DispatchRequest(
            job_id=claim.job_id,
            attempt=claim.attempt,
            dispatch_id=claim.dispatch_id,
            agent_id=claim.agent_id,
            user_id=claim.user_id,
            region=claim.region,
            callback_url=callback_url(self.settings.public_url, claim.job_id),
            traceparent=current_traceparent(),  # this dispatch.request span
        )
        result = await self.provisioner.dispatch(request)
        metrics.DISPATCH_OUTCOMES.labels(TryKind.DISPATCH, result.outcome).inc()
        s = self.settings
        match result.outcome:
            case Outcome.OK:
                self._setbacks = 0
                state = await self._recorded(
                    dispatches.record_started(
                        claim.dispatch_id, self.owner, TryKind.DISPATCH, result
                    ),
                    result,
                )
                if state == DispatchState.DISPATCHED:
                    log.info(
                        "workflow dispatched",
                        workflow_run_id=result.workflow_run_id,
                        run_url=result.run_url,
                        simulated=result.simulated,
                        tries=claim.tries + 1,
                    )
                elif state is not None:
                    _log_closed(state, result)
            case Outcome.REJECTED:
                job = await dispatches.record_rejected(
                    claim.dispatch_id, self.owner, _describe(result)
                )
                log.error(
                    "dispatch refused: job failed",
                    status_code=result.status_code,
                    error=result.message,
                    job_failed=job is not None,
                )
            case Outcome.UNKNOWN:
                if await self._recorded(
                    dispatches.record_unknown(
                        claim.dispatch_id, self.owner, result, self._reconcile_delay()
                    ),
                    result,
                ):
                    log.warning(
                        "dispatch outcome unknown: reconciling",
                        status_code=result.status_code,
                        error=result.message,
                    )
            case Outcome.NOT_SENT:
                delay = full_jitter(
                    s.dispatch_backoff_base_seconds, s.dispatch_backoff_max_seconds, claim.tries
                )
                if await self._recorded(
                    dispatches.record_again_later(
                        claim.dispatch_id, self.owner, TryKind.DISPATCH, result, delay
                    ),
                    result,
                ):
                    log.warning("dispatch not sent: retrying", error=result.message, delay=delay)
            case _:
                await self._setback(claim, TryKind.DISPATCH, result)

    async def _recorded(self, record: Awaitable[T], result: Result) -> T:
        """What an outcome's record returned; when it was dropped because the lease was
        lost meanwhile (another process took the dispatch over and reconciles it), say so:
        the caller then logs nothing as done."""
        landed = await record
        if not landed:
            log.warning(
                "dispatch outcome dropped: the lease was lost to another process",
                outcome=result.outcome,
                workflow_run_id=result.workflow_run_id,
            )
        return landed

    async def _reconcile(self, claim: dispatches.Claim) -> None:
        result = await self.provisioner.find_run(
            claim.dispatch_id, claim.created_at - RECONCILE_MARGIN
        )
        metrics.DISPATCH_OUTCOMES.labels(TryKind.RECONCILE, result.outcome).inc()
        if result.outcome == Outcome.OK:
            self._setbacks = 0
            state = await self._recorded(
                dispatches.record_started(claim.dispatch_id, self.owner, TryKind.RECONCILE, result),
                result,
            )
            if state == DispatchState.DISPATCHED:
                log.info(
                    "reconciled: run found",
                    workflow_run_id=result.workflow_run_id,
                    run_url=result.run_url,
                )
            elif state is not None:
                _log_closed(state, result)
        elif result.outcome == Outcome.NOT_FOUND:
            lost = await dispatches.record_not_found(
                claim.dispatch_id,
                self.owner,
                result,
                grace=self.settings.dispatch_reconcile_grace_seconds,
                delay=self._reconcile_delay(),
            )
            if lost:
                log.warning("reconciled: no run within the grace period; dispatching anew")
                self.wake()
        elif result.outcome in (Outcome.RATE_LIMITED, Outcome.MISCONFIGURED):
            await self._setback(claim, TryKind.RECONCILE, result)
        elif await self._recorded(
            dispatches.record_again_later(
                claim.dispatch_id, self.owner, TryKind.RECONCILE, result, self._reconcile_delay()
            ),
            result,
        ):
            log.warning("reconcile lookup failed: looking again", error=result.message)

    def _reconcile_delay(self) -> float:
        """How soon to look (again) for a run: GitHub's list lags a little."""
        s = self.settings
        return min(max(s.dispatch_reconcile_grace_seconds / 4, s.dispatch_interval_seconds), 15.0)

    async def _setback(self, claim: dispatches.Claim, kind: str, result: Result) -> None:
        """Rate limited or misconfigured: not this job's fault. Pause this process's
        dispatching (with exponential backoff), and keep the dispatch for later."""
        s = self.settings
        if time.monotonic() >= self._paused_until:
            # The first setback since the last pause ended: the claims of one round
            # answered together count once, so a burst doesn't jump to the longest pause.
            self._setbacks += 1
        backoff = full_jitter(
            s.dispatch_backoff_base_seconds, s.dispatch_backoff_max_seconds, self._setbacks - 1
        )
        if result.outcome == Outcome.RATE_LIMITED:
            wait = result.retry_after or 60.0
            # Until `retry-after` has passed, then exponentially longer while limits go on.
            pause = wait + (backoff if self._setbacks > 1 else 0.0)
            reason = f"rate limited by GitHub (retry after {wait:.0f}s)"
            if result.status_code is not None:  # not for the requests the gate held back
                log.warning("dispatching paused: rate limited", pause=round(pause, 1))
        else:
            pause = max(backoff, s.dispatch_backoff_base_seconds)
            reason = f"misconfigured: {_describe(result).message}"
            log.error(
                "dispatching paused: provisioner misconfigured; jobs stay queued",
                status_code=result.status_code,
                error=result.message,
                pause=round(pause, 1),
            )
        self._pause(pause, reason, str(result.outcome))
        await dispatches.record_again_later(claim.dispatch_id, self.owner, kind, result, pause)

    def _pause(self, seconds: float, reason: str, kind: str) -> None:
        now = time.monotonic()
        if now >= self._paused_until:  # a pause begins (not one extended)
            metrics.DISPATCH_PAUSES.labels(kind).inc()
        if now + seconds > self._paused_until:
            self._paused_until, self._pause_reason = now + seconds, reason

    # ------------------------------------------------------------------ cancellations

    async def _cancel(self, cancellation: dispatches.Cancellation) -> None:
        run_id = cancellation.workflow_run_id
        with job_context(cancellation.job_id, workflow_run_id=run_id):
            result = await self.provisioner.cancel_run(run_id)
            metrics.DISPATCH_OUTCOMES.labels(TryKind.CANCEL, result.outcome).inc()
            done = result.outcome in (Outcome.OK, Outcome.REJECTED, Outcome.NOT_FOUND)
            s = self.settings
            await dispatches.record_cancellation(
                run_id,
                result,
                done=done,
                delay=full_jitter(
                    s.dispatch_backoff_base_seconds,
                    s.dispatch_backoff_max_seconds,
                    cancellation.tries,
                ),
                max_tries=CANCEL_MAX_TRIES,
            )
            log.info("run cancelled" if done else "run cancel failed", outcome=result.outcome)


def _log_closed(state: DispatchState, result: Result) -> None:
    log.warning(
        "run started for a dispatch that is over: it is cancelled",
        dispatch_state=state,
        workflow_run_id=result.workflow_run_id,
    )


def _describe(result: Result) -> Result:
    """The result with a message naming GitHub's status: what the job's error shows."""
    status = f"GitHub answered {result.status_code}" if result.status_code else "GitHub"
    message = f"{status}: {result.message or result.outcome}"
    return msgspec.structs.replace(result, message=message)
