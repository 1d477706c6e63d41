"""The workflow's side of the callbacks: signed POSTs to jobs_app, and `jobs-app callback`.

The provisioning workflow (deploy/github/provision.yml), the simulated provisioner and
the GitHub stand-in's runner all call jobs_app through these functions, so the wire
format lives in one place:

- `POST {base}/status`    {"attempt", "status", "dispatch_id"?, "workflow_run_id"?, "error"?,
  "failed_step"?} → 200 (the job)
- `POST {base}/heartbeat` {"attempt", "dispatch_id"?, "workflow_run_id"?} → 204
- `POST {base}/steps`     {"attempt", "step", "state", "dispatch_id"?, "workflow_run_id"?,
  "detail"?} → 200 (the job)

where `base` is `{JOBS_PUBLIC_URL}/api/callbacks/jobs/{job_id}` (the workflow's
`callback_url` input). Each body is signed: `X-Signature: t=<unix>,v1=<hex>` with
hex = HMAC-SHA256(JOBS_CALLBACK_SECRET, f"{t}.{raw_body}").

With `TRACEPARENT` (and `TRACESTATE`) in its environment, as the workflow sets them from
the dispatch's `traceparent` input, `jobs-app callback` sends them as the W3C
`traceparent`/`tracestate` headers: the callbacks' spans join the trace that dispatched
the run. No OpenTelemetry is needed on the runner for that.

A 409 means this run must stop (its dispatch was superseded, its attempt is stale, or
the move is not allowed): exit code 3. Other errors exit 1, after a few retries for
network errors and 5xx (callbacks are idempotent, so a retry is safe).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any
from uuid import UUID

import httpx
import msgspec

from jobs_app.core.backoff import full_jitter
from jobs_app.core.signing import SIGNATURE_HEADER, sign

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_STOP = 3
"""A 409: superseded dispatch, stale attempt or invalid transition. The run must stop."""

SECRET_ENV = "JOBS_CALLBACK_SECRET"
URL_ENV = "JOBS_CALLBACK_URL"
TRACEPARENT_ENV = "TRACEPARENT"
TRACESTATE_ENV = "TRACESTATE"

# W3C trace context: version-trace_id-parent_id-flags, lowercase hex.
_TRACEPARENT = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace>[0-9a-f]{32})-(?P<span>[0-9a-f]{16})-[0-9a-f]{2}"
)
_TRACESTATE = re.compile(r"[\x20-\x7e]{1,512}")

_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_SECONDS = 30.0


class CallbackResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one callback came to, after its retries."""

    status_code: int | None
    """The last HTTP status answered (None: no answer at all)."""
    reason: str | None = None
    """409: the body's `extra.reason` (superseded_dispatch, stale_attempt, invalid_transition)."""
    detail: str = ""
    """The body's `detail`, or what went wrong on the wire."""
    body: Any = None
    """The decoded JSON answer (the job, for a 200 status callback), when there was one."""
    tries: int = 1

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def stop(self) -> bool:
        """The run must stop now (a 409)."""
        return self.status_code == 409

    @property
    def exit_code(self) -> int:
        if self.ok:
            return EXIT_OK
        return EXIT_STOP if self.stop else EXIT_ERROR


def status_body(
    *,
    attempt: int,
    status: str,
    dispatch_id: UUID | str | None = None,
    workflow_run_id: str | None = None,
    error: str | None = None,
    failed_step: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"attempt": attempt, "status": status}
    if dispatch_id is not None:
        body["dispatch_id"] = str(dispatch_id)
    if workflow_run_id is not None:
        body["workflow_run_id"] = workflow_run_id
    if error is not None:
        body["error"] = error
    if failed_step is not None:
        body["failed_step"] = failed_step
    return body


def heartbeat_body(
    *, attempt: int, dispatch_id: UUID | str | None = None, workflow_run_id: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"attempt": attempt}
    if dispatch_id is not None:
        body["dispatch_id"] = str(dispatch_id)
    if workflow_run_id is not None:
        body["workflow_run_id"] = workflow_run_id
    return body


def step_body(
    *,
    attempt: int,
    step: str,
    state: str,
    dispatch_id: UUID | str | None = None,
    workflow_run_id: str | None = None,
    detail: str | None = None,
) -> dict[str, Any]:
    body = heartbeat_body(attempt=attempt, dispatch_id=dispatch_id, workflow_run_id=workflow_run_id)
    body |= {"step": step, "state": state}
    if detail is not None:
        body["detail"] = detail
    return body


def _result(response: httpx.Response, tries: int) -> CallbackResult:
    try:
        data = response.json() if response.content else None
    except ValueError:
        data = None
    detail = ""
    reason = None
    if isinstance(data, dict) and not response.is_success:
        detail = str(data.get("detail", ""))
        extra = data.get("extra")
        if isinstance(extra, dict) and isinstance(extra.get("reason"), str):
            reason = extra["reason"]
    elif not response.is_success:
        detail = response.text[:500]
    return CallbackResult(
        status_code=response.status_code, reason=reason, detail=detail, body=data, tries=tries
    )


async def post_signed(
    client: httpx.AsyncClient,
    url: str,
    secret: str,
    body: dict[str, Any],
    *,
    retries: int = 3,
    backoff: float = 0.5,
) -> CallbackResult:
    """POST `body` signed, retrying network errors and 5xx up to `retries` more times
    with full-jitter exponential backoff (base `backoff` seconds). Never raises for an
    answer or a network error: the result says what happened."""
    raw = json.dumps(body, separators=(",", ":")).encode()
    tries = 0
    while True:
        tries += 1
        headers = {SIGNATURE_HEADER: sign(secret, raw), "Content-Type": "application/json"}
        try:
            response = await client.post(url, content=raw, headers=headers)
        except httpx.TransportError as exc:
            result = CallbackResult(
                status_code=None, detail=f"{type(exc).__name__}: {exc}", tries=tries
            )
        else:
            result = _result(response, tries)
            if response.status_code not in _TRANSIENT_STATUS:
                return result
        if tries > retries:
            return result
        await asyncio.sleep(full_jitter(backoff, MAX_BACKOFF_SECONDS, tries - 1))


async def send_status(
    client: httpx.AsyncClient,
    base_url: str,
    secret: str,
    *,
    attempt: int,
    status: str,
    dispatch_id: UUID | str | None = None,
    workflow_run_id: str | None = None,
    error: str | None = None,
    failed_step: str | None = None,
    retries: int = 3,
    backoff: float = 0.5,
) -> CallbackResult:
    """`POST {base_url}/status`: provisioning, running or failed."""
    body = status_body(
        attempt=attempt,
        status=status,
        dispatch_id=dispatch_id,
        workflow_run_id=workflow_run_id,
        error=error,
        failed_step=failed_step,
    )
    return await post_signed(
        client, f"{base_url.rstrip('/')}/status", secret, body, retries=retries, backoff=backoff
    )


async def send_heartbeat(
    client: httpx.AsyncClient,
    base_url: str,
    secret: str,
    *,
    attempt: int,
    dispatch_id: UUID | str | None = None,
    workflow_run_id: str | None = None,
    retries: int = 3,
    backoff: float = 0.5,
) -> CallbackResult:
    """`POST {base_url}/heartbeat`: a sign of life for this attempt."""
    body = heartbeat_body(attempt=attempt, dispatch_id=dispatch_id, workflow_run_id=workflow_run_id)
    return await post_signed(
        client, f"{base_url.rstrip('/')}/heartbeat", secret, body, retries=retries, backoff=backoff
    )


async def send_step(
    client: httpx.AsyncClient,
    base_url: str,
    secret: str,
    *,
    attempt: int,
    step: str,
    state: str,
    dispatch_id: UUID | str | None = None,
    workflow_run_id: str | None = None,
    detail: str | None = None,
    retries: int = 3,
    backoff: float = 0.5,
) -> CallbackResult:
    """`POST {base_url}/steps`: a step of the plan started, succeeded or failed."""
    body = step_body(
        attempt=attempt,
        step=step,
        state=state,
        dispatch_id=dispatch_id,
        workflow_run_id=workflow_run_id,
        detail=detail,
    )
    return await post_signed(
        client, f"{base_url.rstrip('/')}/steps", secret, body, retries=retries, backoff=backoff
    )


# --------------------------------------------------------------------------- the CLI


def add_callback_parser(commands: Any) -> None:
    """Add `callback status|heartbeat|step` to the `jobs-app` subcommands."""
    cmd = commands.add_parser(
        "callback",
        help="send a signed status, heartbeat or step callback (run by the provisioning workflow)",
        description=(
            f"Reads the secret from ${SECRET_ENV}. Exit codes: 0 ok, {EXIT_STOP} the service "
            f"answered 409 (this run must stop), {EXIT_ERROR} any other error."
        ),
    )
    kinds = cmd.add_subparsers(dest="callback_kind", required=True)
    status = kinds.add_parser("status", help="report provisioning, running or failed")
    heartbeat = kinds.add_parser("heartbeat", help="a sign of life; --every N keeps sending")
    step = kinds.add_parser("step", help="report a step of the plan: started, succeeded, failed")
    for sub in (status, heartbeat, step):
        sub.add_argument(
            "--url",
            default=os.environ.get(URL_ENV),
            help=f"the job's callback base URL (default ${URL_ENV})",
        )
        sub.add_argument("--attempt", type=int, required=True)
        sub.add_argument("--dispatch-id", type=UUID, default=None)
        sub.add_argument("--workflow-run-id", default=None)
        sub.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
        sub.add_argument("--retries", type=int, default=3, help="retries of network errors, 5xx")
    status.add_argument("--status", required=True, choices=["provisioning", "running", "failed"])
    status.add_argument("--error", default=None, help="what went wrong (with --status failed)")
    status.add_argument("--failed-step", default=None)
    step.add_argument("--step", required=True, help="the step's name (JOBS_PROVISION_STEPS)")
    step.add_argument("--state", required=True, choices=["started", "succeeded", "failed"])
    step.add_argument("--detail", default=None, help="for support: at most 500 characters")
    heartbeat.add_argument(
        "--every",
        type=float,
        default=None,
        help="keep sending every SECONDS until killed or answered 409",
    )


def trace_headers(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`traceparent` (and `tracestate`) from the environment's TRACEPARENT (TRACESTATE),
    when it is a valid W3C value; nothing otherwise (empty when the run was dispatched
    without tracing; a malformed one is said on stderr and not sent)."""
    e = os.environ if env is None else env
    traceparent = e.get(TRACEPARENT_ENV, "").strip()
    if not traceparent:
        return {}
    match = _TRACEPARENT.fullmatch(traceparent)
    if (
        match is None
        or match["version"] == "ff"
        or set(match["trace"]) == {"0"}
        or set(match["span"]) == {"0"}
    ):
        print(
            f"jobs-app callback: ${TRACEPARENT_ENV} is not a W3C traceparent: not sent",
            file=sys.stderr,
        )
        return {}
    headers = {"traceparent": traceparent}
    tracestate = e.get(TRACESTATE_ENV, "").strip()
    if tracestate and _TRACESTATE.fullmatch(tracestate):
        headers["tracestate"] = tracestate
    return headers


def _say(result: CallbackResult, what: str) -> None:
    if result.ok:
        return
    answer = f"HTTP {result.status_code}" if result.status_code else "no answer"
    reason = f" ({result.reason})" if result.reason else ""
    print(f"jobs-app callback {what}: {answer}{reason}: {result.detail}", file=sys.stderr)


async def _heartbeat_loop(
    client: httpx.AsyncClient, url: str, secret: str, args: argparse.Namespace
) -> int:
    while True:
        result = await send_heartbeat(
            client,
            url,
            secret,
            attempt=args.attempt,
            dispatch_id=args.dispatch_id,
            workflow_run_id=args.workflow_run_id,
            retries=args.retries,
        )
        _say(result, "heartbeat")
        if result.stop:
            return EXIT_STOP
        # A permanent refusal (bad signature, unknown job, bad body) will not get better;
        # network errors and 5xx that outlived the retries may: keep beating.
        status = result.status_code
        if status is not None and 400 <= status < 500 and status not in _TRANSIENT_STATUS:
            return EXIT_ERROR
        await asyncio.sleep(args.every)


async def _run(args: argparse.Namespace) -> int:
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        print(f"jobs-app callback: ${SECRET_ENV} is not set", file=sys.stderr)
        return EXIT_ERROR
    if not args.url:
        print(f"jobs-app callback: give --url or set ${URL_ENV}", file=sys.stderr)
        return EXIT_ERROR
    async with httpx.AsyncClient(timeout=args.timeout, headers=trace_headers()) as client:
        if args.callback_kind == "status":
            result = await send_status(
                client,
                args.url,
                secret,
                attempt=args.attempt,
                status=args.status,
                dispatch_id=args.dispatch_id,
                workflow_run_id=args.workflow_run_id,
                error=args.error,
                failed_step=args.failed_step,
                retries=args.retries,
            )
            _say(result, "status")
            return result.exit_code
        if args.callback_kind == "step":
            result = await send_step(
                client,
                args.url,
                secret,
                attempt=args.attempt,
                step=args.step,
                state=args.state,
                dispatch_id=args.dispatch_id,
                workflow_run_id=args.workflow_run_id,
                detail=args.detail,
                retries=args.retries,
            )
            _say(result, "step")
            return result.exit_code
        if args.every is not None:
            if args.every <= 0:
                print("jobs-app callback: --every must be positive", file=sys.stderr)
                return EXIT_ERROR
            return await _heartbeat_loop(client, args.url, secret, args)
        result = await send_heartbeat(
            client,
            args.url,
            secret,
            attempt=args.attempt,
            dispatch_id=args.dispatch_id,
            workflow_run_id=args.workflow_run_id,
            retries=args.retries,
        )
        _say(result, "heartbeat")
        return result.exit_code


def run_callback_command(args: argparse.Namespace) -> int:
    """`jobs-app callback ...`: the process's exit code."""
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return EXIT_ERROR
