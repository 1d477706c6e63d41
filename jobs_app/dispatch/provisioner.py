"""What a provisioner is: the one interface the dispatcher calls.

A provisioner starts a workflow run for one attempt, finds the run a dispatch
started (reconciliation after an unknown outcome), and cancels a run. It never
touches the database and never raises for an answer it got: every outcome,
GitHub's faults included, comes back as a `Result` the dispatcher acts on.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Protocol
from uuid import UUID

import msgspec


class Outcome(StrEnum):
    OK = "ok"
    """Done: the run was started (200/204), found, or cancelled."""
    NOT_FOUND = "not_found"
    """Reconciliation: no run carries this dispatch id (yet)."""
    REJECTED = "rejected"
    """400, 410, 422: the request itself is refused; permanent for this job."""
    MISCONFIGURED = "misconfigured"
    """401, 403 without rate-limit headers, 404, or the installation token refused:
    the whole provisioner is misconfigured, not this job."""
    RATE_LIMITED = "rate_limited"
    """429, or 403 with retry-after / x-ratelimit-remaining: 0, or a request not
    sent because this process is still waiting out an earlier limit."""
    NOT_SENT = "not_sent"
    """Refused connection or DNS failure: nothing reached the server; safe to retry."""
    UNKNOWN = "unknown"
    """Timeout, 5xx, or a connection closed before the answer: the run may exist."""


class Result(msgspec.Struct, frozen=True, kw_only=True):
    outcome: Outcome
    status_code: int | None = None
    message: str | None = None
    """GitHub's message, or what went wrong on the wire."""
    workflow_run_id: str | None = None
    run_url: str | None = None
    """The run's page (GitHub's html_url)."""
    retry_after: float | None = None
    """Seconds until requests may start again (RATE_LIMITED)."""
    simulated: bool = False


class DispatchRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt's workflow inputs (every value is sent as a string)."""

    job_id: UUID
    attempt: int
    dispatch_id: UUID
    agent_id: UUID
    user_id: UUID
    region: str
    callback_url: str
    """`{JOBS_PUBLIC_URL}/api/callbacks/jobs/{job_id}`: the base of the job's callback routes."""

    def inputs(self) -> dict[str, str]:
        return {
            "job_id": str(self.job_id),
            "attempt": str(self.attempt),
            "dispatch_id": str(self.dispatch_id),
            "agent_id": str(self.agent_id),
            "user_id": str(self.user_id),
            "region": self.region,
            "callback_url": self.callback_url,
        }


class Provisioner(Protocol):
    name: str
    """`github`, `simulated` or `none`: recorded with every try."""

    async def dispatch(self, request: DispatchRequest) -> Result:
        """Start one run. Never retried blindly: the POST is not idempotent."""
        ...

    async def find_run(self, dispatch_id: UUID, created_since: datetime) -> Result:
        """The run whose display title carries `dispatch_id`, created since then:
        OK with its id, NOT_FOUND, or the error outcome of the listing."""
        ...

    async def cancel_run(self, workflow_run_id: str) -> Result:
        """Cancel a run, best effort."""
        ...

    async def aclose(self) -> None: ...
