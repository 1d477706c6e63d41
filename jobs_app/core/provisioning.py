"""What a provisioner is: the one interface the dispatcher calls, the records it answers
with (the dispatches service stores them), and the GitHub settings it needs.

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

CALLBACKS_PATH = "/api/callbacks/jobs"
"""Where the workflow's callbacks are served: `{CALLBACKS_PATH}/{job_id}/status` etc."""
DEFAULT_GITHUB_API_URL = "https://api.github.com"


def callback_url(public_url: str, job_id: UUID) -> str:
    """The base of a job's callback routes, as the workflow receives it."""
    return f"{public_url.rstrip('/')}{CALLBACKS_PATH}/{job_id}"


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
    """`callback_url(JOBS_PUBLIC_URL, job_id)`: the base of the job's callback routes."""
    traceparent: str | None = None
    """The dispatch's span as a W3C traceparent when tracing is on: the workflow hands it
    to `jobs-app callback` (TRACEPARENT), so the run's callbacks join the trace."""

    def inputs(self) -> dict[str, str]:
        inputs = {
            "job_id": str(self.job_id),
            "attempt": str(self.attempt),
            "dispatch_id": str(self.dispatch_id),
            "agent_id": str(self.agent_id),
            "user_id": str(self.user_id),
            "region": self.region,
            "callback_url": self.callback_url,
        }
        if self.traceparent:  # optional in the workflow: absent when tracing is off
            inputs["traceparent"] = self.traceparent
        return inputs


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


class GitHubConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where and as whom the GitHub provisioner dispatches: a repository's workflow, as a
    GitHub App (`app_id`, `private_key` PEM text, `installation_id`) or with a fine-grained
    `token`. Checked when made: a ValueError names the setting (its variable) at fault.
    """

    repository: str
    workflow: str
    ref: str = "main"
    api_url: str = DEFAULT_GITHUB_API_URL
    app_id: str | None = None
    private_key: str | None = None
    installation_id: str | None = None
    token: str | None = None
    timeout: float = 10.0
    """Seconds, the bound on each HTTP request (connect, write, read)."""

    def __post_init__(self) -> None:
        owner, _, name = self.repository.partition("/")
        if not owner or not name or "/" in name:
            raise ValueError(f"JOBS_GITHUB_REPOSITORY must be owner/name, got {self.repository!r}")
        if not self.workflow:
            raise ValueError("JOBS_GITHUB_WORKFLOW (the workflow file name) is required")
        if self.timeout <= 0:
            raise ValueError("JOBS_GITHUB_TIMEOUT_SECONDS must be positive")
        app = {
            "JOBS_GITHUB_APP_ID": self.app_id,
            "JOBS_GITHUB_APP_PRIVATE_KEY (or _FILE)": self.private_key,
            "JOBS_GITHUB_INSTALLATION_ID": self.installation_id,
        }
        if self.token and any(app.values()):
            raise ValueError(
                "set either JOBS_GITHUB_TOKEN or a GitHub App (JOBS_GITHUB_APP_ID, "
                "JOBS_GITHUB_APP_PRIVATE_KEY, JOBS_GITHUB_INSTALLATION_ID), not both"
            )
        if self.token:
            return
        missing = [variable for variable, value in app.items() if not value]
        if missing:
            raise ValueError(
                f"the GitHub provisioner needs a GitHub App ({', '.join(missing)} missing), "
                "or JOBS_GITHUB_TOKEN"
            )
        for variable, value in (
            ("JOBS_GITHUB_APP_ID", self.app_id),
            ("JOBS_GITHUB_INSTALLATION_ID", self.installation_id),
        ):
            if not str(value).isdigit():
                raise ValueError(f"{variable} must be a number, got {value!r}")
        if "PRIVATE KEY" not in str(self.private_key):
            raise ValueError(
                "JOBS_GITHUB_APP_PRIVATE_KEY (or the file JOBS_GITHUB_APP_PRIVATE_KEY_FILE "
                "names) must hold the App's PEM private key"
            )

    @property
    def owner(self) -> str:
        return self.repository.partition("/")[0]

    @property
    def repo(self) -> str:
        return self.repository.partition("/")[2]
