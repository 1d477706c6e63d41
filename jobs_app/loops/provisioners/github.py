"""The GitHub provisioner: workflow_dispatch, run lookup and cancel through githubkit.

Every answer and every fault becomes a `Result` (see provisioner.Outcome); nothing here
raises for what GitHub or the network did. Things githubkit does that matter here:

- Its automatic retries would resend the dispatch POST, which is not idempotent: off.
- Its default timeout is none: one is always set.
- Without `async with`, every call opens (and closes) an HTTP client, and `async with`
  keeps the client in a ContextVar that other tasks don't see: `_OneClientGitHub` keeps
  one client for the provisioner's whole life instead (closed by `aclose`).
- A 403/429 with `retry-after` raises SecondaryRateLimitExceeded even for a plain 429,
  and a failed installation-token request surfaces as a RequestError wrapping the
  token request's RequestFailed: answers are classified by status and headers.
- A refused connection and a dropped one both arrive as RequestError: `.exc` tells
  whether anything was sent.
- The installation token is cached by githubkit's AppInstallationAuthStrategy in its
  cache strategy until one minute before GitHub's `expires_at` (the JWT for eight
  minutes); each provisioner gets a cache of its own.

Rate limits: from the moment a rate-limited answer arrives, the provisioner starts no
request to GitHub until the wait is over (calls meanwhile return RATE_LIMITED with the
time left, without sending). Requests already in flight are not called back. The gate
belongs to the provisioner (one per process, made by the dispatcher's factory): it lives
and dies with it, so nothing outlives the provisioner that learnt the limit.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import httpx
import msgspec
from githubkit import AppInstallationAuthStrategy, GitHub, TokenAuthStrategy
from githubkit.cache import MemCacheStrategy
from githubkit.exception import RequestError, RequestFailed

from jobs_app.core.logs import get_logger
from jobs_app.core.provisioning import (
    DEFAULT_GITHUB_API_URL,
    DispatchRequest,
    GitHubConfig,
    Outcome,
    Result,
)

log = get_logger("jobs_app.provisioners.github")

DEFAULT_RATE_LIMIT_WAIT = 60.0
"""Seconds to wait after a rate-limited answer that says nothing about when to retry."""

_NOTHING_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
)
"""Transport errors raised before any byte of the request left: safe to send again."""


_NO_TOKEN_YET = frozenset({Outcome.NOT_SENT, Outcome.MISCONFIGURED, Outcome.RATE_LIMITED})
"""Outcomes after which there may still be no installation token."""


class RateLimitGate:
    """No request starts before `open_at`: the provisioner's memory of GitHub's limit."""

    def __init__(self) -> None:
        self._open_at = 0.0  # time.monotonic()

    def remaining(self) -> float:
        return max(0.0, self._open_at - time.monotonic())

    def close_for(self, seconds: float) -> None:
        # Only ever pushed later: a shorter limit answered meanwhile doesn't shorten it.
        self._open_at = max(self._open_at, time.monotonic() + seconds)


class _OneClientGitHub(GitHub[Any]):
    """githubkit's GitHub with one async HTTP client shared by every task."""

    _shared_client: httpx.AsyncClient | None = None
    _client_lock: asyncio.Lock | None = None
    token_issued: asyncio.Event | None = None
    """Set when GitHub has issued an installation token to this client."""

    @asynccontextmanager
    async def get_async_client(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._shared_client is None:
            if self._client_lock is None:
                self._client_lock = asyncio.Lock()
            async with self._client_lock:
                if self._shared_client is None:
                    client = await self._create_async_client()
                    client.event_hooks["response"].append(self._note_token)
                    self._shared_client = client
        yield self._shared_client

    async def _note_token(self, response: httpx.Response) -> None:
        if response.status_code == 201 and _is_token_request(response.request):
            if self.token_issued is None:
                self.token_issued = asyncio.Event()
            self.token_issued.set()

    async def close_shared_client(self) -> None:
        client, self._shared_client = self._shared_client, None
        if client is not None:
            await client.aclose()


def _retry_after(response: httpx.Response) -> float:
    """retry-after, else x-ratelimit-reset - now, else 60 seconds."""
    value = response.headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                return max(0.0, when.timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    reset = response.headers.get("x-ratelimit-reset")
    if reset:
        try:
            return max(1.0, float(reset) - time.time())
        except ValueError:
            pass
    return DEFAULT_RATE_LIMIT_WAIT


def _is_rate_limited(response: httpx.Response) -> bool:
    if response.status_code == 429:
        return True
    return response.status_code == 403 and (
        "retry-after" in response.headers or response.headers.get("x-ratelimit-remaining") == "0"
    )


def _message(response: httpx.Response) -> str:
    """GitHub's message (and validation errors), bounded."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if not isinstance(data, dict):
        return str(data)[:500]
    message = str(data.get("message") or response.reason_phrase)
    errors = data.get("errors")
    if errors:
        message = f"{message}: {errors}"
    return message[:1000]


def _is_token_request(request: httpx.Request | None) -> bool:
    return request is not None and request.url.path.endswith("/access_tokens")


class GitHubProvisioner:
    """Starts the provisioning workflow with `workflow_dispatch` (see the module doc).

    Made from a GitHubConfig (`from_config`), or from its fields as keywords; the config
    checks them (a ValueError names what is wrong).
    """

    name = "github"

    def __init__(
        self,
        *,
        repository: str,
        workflow: str,
        ref: str = "main",
        api_url: str = DEFAULT_GITHUB_API_URL,
        app_id: int | str | None = None,
        private_key: str | None = None,
        installation_id: int | str | None = None,
        token: str | None = None,
        timeout: float = 10.0,
        per_page: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        config = GitHubConfig(
            repository=repository,
            workflow=workflow,
            ref=ref,
            api_url=api_url.rstrip("/"),
            app_id=None if app_id is None else str(app_id),
            private_key=private_key,
            installation_id=None if installation_id is None else str(installation_id),
            token=token,
            timeout=timeout,
        )
        auth: AppInstallationAuthStrategy | TokenAuthStrategy
        if config.token:
            auth = TokenAuthStrategy(config.token)
        else:
            auth = AppInstallationAuthStrategy(
                app_id=config.app_id,
                private_key=str(config.private_key),
                installation_id=int(str(config.installation_id)),
            )
        self.config = config
        self.owner, self.repo, self.workflow, self.ref = (
            config.owner,
            config.repo,
            config.workflow,
            config.ref,
        )
        self.api_url = config.api_url
        self.per_page = per_page
        self.gate = RateLimitGate()
        self._token_ready = bool(config.token)  # a fine-grained token needs no exchange
        self._token_lock = asyncio.Lock()
        self._github = _OneClientGitHub(
            auth,
            base_url=self.api_url + "/",
            timeout=httpx.Timeout(config.timeout),
            auto_retry=False,  # a retried dispatch POST could start a second run
            http_cache=False,  # nothing here may be answered from a cache
            cache_strategy=MemCacheStrategy(),  # this provisioner's own token cache
            follow_redirects=False,
            async_transport=transport,
        )

    @classmethod
    def from_config(cls, config: GitHubConfig) -> GitHubProvisioner:
        return cls(**msgspec.structs.asdict(config))

    # ------------------------------------------------------------------ the calls

    async def dispatch(self, request: DispatchRequest) -> Result:
        """POST .../dispatches: 200 (run id and URL) or 204 (GitHub Enterprise Server)."""

        async def call() -> Any:
            return await self._github.rest.actions.async_create_workflow_dispatch(
                self.owner,
                self.repo,
                self.workflow,
                data={"ref": self.ref, "inputs": request.inputs()},
            )

        result = await self._call(call, "dispatch")
        if isinstance(result, Result):
            return result
        response: httpx.Response = result.raw_response
        if response.status_code == 204:  # no body: nothing to parse
            return Result(outcome=Outcome.OK, status_code=204)
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            data = {}
        run_id = data.get("workflow_run_id")
        return Result(
            outcome=Outcome.OK,
            status_code=response.status_code,
            workflow_run_id=None if run_id is None else str(run_id),
            run_url=data.get("html_url") or None,
        )

    async def find_run(self, dispatch_id: UUID, created_since: datetime) -> Result:
        """List the workflow's dispatched runs created since then, page by page, and
        match the dispatch id in the run's display title (`provision <dispatch_id>`)."""
        since = created_since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        wanted = str(dispatch_id)
        page = 1
        while True:

            async def call(page: int = page) -> Any:
                return await self._github.rest.actions.async_list_workflow_runs(
                    self.owner,
                    self.repo,
                    self.workflow,
                    event="workflow_dispatch",
                    created=f">={since}",
                    per_page=self.per_page,
                    page=page,
                )

            result = await self._call(call, "find_run")
            if isinstance(result, Result):
                return result
            response: httpx.Response = result.raw_response
            data = response.json()
            runs = data.get("workflow_runs", []) if isinstance(data, dict) else []
            for run in runs:
                if wanted in str(run.get("display_title", "")).split():
                    return Result(
                        outcome=Outcome.OK,
                        status_code=response.status_code,
                        workflow_run_id=str(run["id"]),
                        run_url=run.get("html_url"),
                    )
            if "next" not in response.links or not runs:
                return Result(outcome=Outcome.NOT_FOUND, status_code=response.status_code)
            page += 1

    async def cancel_run(self, workflow_run_id: str) -> Result:
        """POST .../runs/{id}/cancel: 202 → OK; 409 (the run already completed) → OK too,
        with status_code 409 and GitHub's message: there is nothing left to stop; 404 →
        NOT_FOUND (cancelling is best effort: a missing run doesn't pause dispatching)."""

        async def call() -> Any:
            return await self._github.rest.actions.async_cancel_workflow_run(
                self.owner, self.repo, int(workflow_run_id)
            )

        if not workflow_run_id.isdigit():
            return Result(
                outcome=Outcome.REJECTED, message=f"not a GitHub run id: {workflow_run_id!r}"
            )
        result = await self._call(call, "cancel_run", ok_statuses=(404, 409))
        if isinstance(result, Result):
            return result
        if result.raw_response.status_code == 404:  # no such run (best effort: not a config fault)
            return Result(outcome=Outcome.NOT_FOUND, status_code=404)
        response: httpx.Response = result.raw_response
        message = _message(response) if response.status_code == 409 else None
        return Result(outcome=Outcome.OK, status_code=response.status_code, message=message)

    async def aclose(self) -> None:
        await self._github.close_shared_client()

    # ------------------------------------------------------------------ classification

    async def _call(
        self,
        call: Callable[[], Awaitable[Any]],
        what: str,
        ok_statuses: tuple[int, ...] = (),
    ) -> Any:
        """Run one githubkit call behind the rate-limit gate: its Response, or the
        Result its failure comes to."""
        if self._token_ready:
            return await self._call_now(call, what, ok_statuses)
        # Until an installation token is in hand, one call at a time: calls started
        # together would each ask GitHub for a token of their own. The others go on as
        # soon as the token is issued, not when this call's answer comes (it may hang).
        first: asyncio.Future[Any] | None = None
        async with self._token_lock:
            if not self._token_ready:
                if self._github.token_issued is None:
                    self._github.token_issued = asyncio.Event()
                first = asyncio.ensure_future(self._call_now(call, what, ok_statuses))
                issued = asyncio.ensure_future(self._github.token_issued.wait())
                try:
                    await asyncio.wait({first, issued}, return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:
                    first.cancel()
                    raise
                finally:
                    issued.cancel()
                if self._github.token_issued.is_set():
                    self._token_ready = True
                elif first.done():
                    result = first.result()
                    if not isinstance(result, Result) or result.outcome not in _NO_TOKEN_YET:
                        self._token_ready = True
        if first is None:
            return await self._call_now(call, what, ok_statuses)
        return await first

    async def _call_now(
        self,
        call: Callable[[], Awaitable[Any]],
        what: str,
        ok_statuses: tuple[int, ...],
    ) -> Any:
        waiting = self.gate.remaining()
        if waiting > 0:
            return Result(
                outcome=Outcome.RATE_LIMITED,
                retry_after=waiting,
                message="not sent: waiting out GitHub's rate limit",
            )
        try:
            return await call()
        except RequestFailed as exc:  # an error status (rate-limit subclasses included)
            response = exc.response.raw_response
            if response.status_code in ok_statuses:
                return exc.response
            return self._classify_answer(response, what, token_request=False)
        except RequestError as exc:
            return self._classify_failure(exc.exc, what)
        except (ValueError, TypeError) as exc:  # e.g. a private key that isn't one
            log.error("github call misconfigured", call=what, error=type(exc).__name__)
            return Result(outcome=Outcome.MISCONFIGURED, message=f"{type(exc).__name__}: {exc}")

    def _classify_answer(
        self,
        response: httpx.Response,
        what: str,
        *,
        token_request: bool,
    ) -> Result:
        status = response.status_code
        message = _message(response)
        if token_request:
            message = f"installation token request refused ({status}): {message}"
        if _is_rate_limited(response):
            wait = _retry_after(response)
            self.gate.close_for(wait)
            log.warning(
                "github rate limited: no request until the wait is over",
                call=what,
                status_code=status,
                api_url=self.api_url,
                wait_seconds=round(wait),
            )
            return Result(
                outcome=Outcome.RATE_LIMITED, status_code=status, message=message, retry_after=wait
            )
        if token_request:
            if status >= 500:  # the dispatch itself was never sent
                return Result(outcome=Outcome.NOT_SENT, status_code=status, message=message)
            log.error("github token request refused", call=what, error=message)
            return Result(outcome=Outcome.MISCONFIGURED, status_code=status, message=message)
        if status in (400, 410, 422):
            log.warning("github rejected the request", call=what, status_code=status, error=message)
            return Result(outcome=Outcome.REJECTED, status_code=status, message=message)
        if status in (401, 403, 404):
            log.error("github call misconfigured", call=what, status_code=status, error=message)
            return Result(outcome=Outcome.MISCONFIGURED, status_code=status, message=message)
        if status >= 500:
            return Result(outcome=Outcome.UNKNOWN, status_code=status, message=message)
        # Anything else GitHub isn't documented to answer here: the run may exist.
        return Result(outcome=Outcome.UNKNOWN, status_code=status, message=message)

    def _classify_failure(self, exc: Exception, what: str) -> Result:
        if isinstance(exc, RequestFailed):  # the installation-token request, inside the auth flow
            return self._classify_answer(exc.response.raw_response, what, token_request=True)
        if isinstance(exc, httpx.HTTPError):
            try:
                request: httpx.Request | None = exc.request
            except RuntimeError:  # httpx raises when the error carries no request
                request = None
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if isinstance(exc, _NOTHING_SENT) or _is_token_request(request):
                return Result(outcome=Outcome.NOT_SENT, message=detail)
            log.warning("github call outcome unknown", call=what, error=detail)
            return Result(outcome=Outcome.UNKNOWN, message=detail)
        # Not from the wire: the App's credentials could not make a JWT, and the like.
        log.error("github call misconfigured", call=what, error=type(exc).__name__)
        return Result(outcome=Outcome.MISCONFIGURED, message=f"{type(exc).__name__}: {exc}")
