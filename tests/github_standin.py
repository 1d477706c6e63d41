"""A GitHub stand-in: a real HTTP/1.1 server on loopback, for tests and bench/.

It serves the part of GitHub's REST API the provisioner uses, the way GitHub does:

- `POST /app/installations/{id}/access_tokens`: checks the App's JWT (RS256 against
  the app's public key, `iss` = app id, sane `iat`/`exp`) and issues installation
  tokens that expire (`token_ttl`).
- Every other call needs a live installation token (or the configured fine-grained
  token): 401 otherwise.
- `POST /repos/{o}/{r}/actions/workflows/{wf}/dispatches`: the workflow declares exactly
  WORKFLOW_INPUTS, all strings; unknown, missing or non-string inputs and unknown refs
  are 422, an unknown repository or workflow 404. Each accepted dispatch creates a run
  titled `provision <dispatch_id>` (the workflow's run-name) and is answered 200 with
  `workflow_run_id`, `run_url`, `html_url` (API version 2026-03-10, or
  `return_run_details`), else 204 (older API versions, and `ghes=True` always).
- `GET .../actions/workflows/{wf}/runs`: newest first, `event` and `created` filters,
  `per_page`/`page` pagination and a Link header like GitHub's.
- `POST .../actions/runs/{id}/cancel` (202; 409 once the run completed) and
  `GET .../actions/runs/{id}`.

Every request is recorded (`records`: receive and answer times on time.monotonic(),
method, path, status answered, dispatch id). Faults are injected per request,
deterministically: `faults.push(endpoint, Fault(...), ...)` queues faults for the next
matching requests; `faults.plan(endpoint, rate=..., kinds=[...], seed=...)` faults a
seeded share of requests (for dispatches the draw depends on the dispatch id only, so it
is the same whatever order requests arrive in; the n-th request of one dispatch id draws
the same, so a dispatch sent again after a rate limit is not limited forever).

The optional runner acts as the workflow (deploy/github/provision.yml) does: after
`start_delay` it calls jobs_app's signed callbacks through jobs_app.workflow.callback_client
(in this process, or through the real `jobs-app callback` CLI with `use_cli=True`):
`provisioning`, heartbeats, then `running`. A 409 stops the run at once; a heartbeat that
fails otherwise does not (the workflow goes on provisioning without it); a provisioning
report that fails otherwise makes the run report `failed`, as the workflow's always-run
last step does. Each run has an HTTP client of its own, as each runner machine has (one
client shared by hundreds of runs would be a bottleneck no real workflow has). Each run
records what its callbacks got.

The server runs on its own thread and event loop: the code under test never shares a
loop with it, as with the real GitHub.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import h11
import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from jobs_app.workflow import callback_client

WORKFLOW_INPUTS = frozenset(
    {"job_id", "attempt", "dispatch_id", "agent_id", "user_id", "region", "callback_url"}
)
OPTIONAL_INPUTS = frozenset({"traceparent"})
"""Inputs the workflow declares `required: false`."""
NEW_API_VERSION = "2026-03-10"
"""From this API version on, a dispatch is answered 200 with the run's id and URLs."""


def generate_private_key() -> str:
    """A fresh RSA private key, PEM text (what a GitHub App's key file holds)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


def public_key_of(private_pem: str) -> str:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- faults


class FaultKind(StrEnum):
    ERROR_500 = "error_500"
    """500 before anything is created."""
    CREATED_502 = "created_502"
    """The run is created, then the answer is a 502."""
    CREATED_DROP = "created_drop"
    """The run is created, then the connection is dropped without an answer."""
    CREATED_HOLD = "created_hold"
    """The run is created, then the answer is held (`hold` s, past the client's timeout)
    and the connection dropped."""
    HOLD = "hold"
    """Nothing created; the answer is held, then the connection dropped."""
    RATE_LIMIT_429 = "rate_limit_429"
    """429 with retry-after."""
    SECONDARY_403 = "secondary_403"
    """403 "You have exceeded a secondary rate limit" with retry-after."""
    PRIMARY_403 = "primary_403"
    """403 with x-ratelimit-remaining: 0 and x-ratelimit-reset (no retry-after)."""
    REJECT_422 = "reject_422"
    """422 with a validation message."""
    ANSWER = "answer"
    """Answer `status` with `message` (and `headers`) in place of the real answer."""
    LATE = "late"
    """Answered as usual; use `list_delay`/`start_delay` for a run the list and the
    runner only see late."""


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    retry_after: int = 2
    """Seconds, for the rate-limit kinds (PRIMARY_403: x-ratelimit-reset = now + this)."""
    hold: float = 30.0
    """Seconds an answer is held for the HOLD kinds."""
    list_delay: float = 0.0
    """Seconds after its creation before the run shows in listings."""
    start_delay: float | None = 0.0
    """Extra seconds before the runner starts the run; None: it never starts."""
    message: str = "Validation Failed"
    status: int = 403
    """For ANSWER."""
    headers: tuple[tuple[str, str], ...] = ()
    """For ANSWER."""


class Faults:
    """Which requests get which fault. Endpoints: token, dispatch, list, cancel, get_run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Fault]] = {}
        self._plans: dict[str, tuple[float, list[Fault], int]] = {}
        self._counters: dict[str, int] = {}

    def push(self, endpoint: str, *faults: Fault, count: int = 1) -> None:
        """The next matching requests get these faults, in order (each `count` times)."""
        with self._lock:
            queue = self._queues.setdefault(endpoint, deque())
            for fault in faults:
                queue.extend([fault] * count)

    def plan(self, endpoint: str, *, rate: float, kinds: Iterable[Fault], seed: int) -> None:
        """Fault a seeded share `rate` of this endpoint's requests with one of `kinds`."""
        with self._lock:
            self._plans[endpoint] = (rate, list(kinds), seed)

    def clear(self) -> None:
        with self._lock:
            self._queues.clear()
            self._plans.clear()

    def pending(self, endpoint: str) -> int:
        with self._lock:
            return len(self._queues.get(endpoint, ()))

    def take(self, endpoint: str, key: str | None) -> Fault | None:
        with self._lock:
            queue = self._queues.get(endpoint)
            if queue:
                return queue.popleft()
            plan = self._plans.get(endpoint)
            if plan is None:
                return None
            rate, kinds, seed = plan
            if key is None:
                key = str(self._counters.get(endpoint, 0))
                self._counters[endpoint] = int(key) + 1
            else:
                # The same dispatch sent again (after a rate limit, say) draws anew: the
                # n-th request of a dispatch id always draws the same.
                seen = self._counters.get(f"{endpoint}:{key}", 0)
                self._counters[f"{endpoint}:{key}"] = seen + 1
                key = f"{key}:{seen}"
            draw = random.Random(f"{seed}:{endpoint}:{key}")
            if kinds and draw.random() < rate:
                return draw.choice(kinds)
            return None


# --------------------------------------------------------------------------- records


@dataclass
class RequestRecord:
    received: float
    """time.monotonic() when the request (head and body) was read."""
    method: str
    path: str
    query: str
    endpoint: str
    dispatch_id: str | None = None
    fault: FaultKind | None = None
    status: int | None = None
    """The status answered; None when the connection was dropped or held."""
    answered: float | None = None
    """time.monotonic() when the answer was written (or the connection dropped)."""


@dataclass
class CallbackRecord:
    kind: str
    """`status` or `heartbeat`."""
    status: str | None
    http_status: int | None
    exit_code: int
    reason: str | None = None
    detail: str = ""
    """The answer's `detail`, or what went wrong on the wire."""
    tries: int = 1


@dataclass
class Run:
    id: int
    dispatch_id: str
    inputs: dict[str, str]
    ref: str
    created_at: datetime
    visible_at: float
    """time.monotonic() from which listings show the run."""
    display_title: str
    html_url: str
    url: str
    status: str = "queued"
    conclusion: str | None = None
    cancelled: bool = False
    started: bool = False
    stopped_by_409: bool = False
    runner_done: bool = False
    callbacks: list[CallbackRecord] = field(default_factory=list)

    def as_json(self, owner: str, repo: str, workflow: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": "provision",
            "display_title": self.display_title,
            "event": "workflow_dispatch",
            "status": self.status,
            "conclusion": self.conclusion,
            "head_branch": self.ref,
            "path": f".github/workflows/{workflow}",
            "run_number": self.id,
            "run_attempt": 1,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.created_at),
            "html_url": self.html_url,
            "url": self.url,
            "repository": {"full_name": f"{owner}/{repo}"},
        }


@dataclass
class RunnerConfig:
    """The stand-in's runner: acts as the workflow for each run it starts."""

    secret: str
    start_delay: float = 0.05
    heartbeats: int = 1
    interval: float = 0.05
    """Seconds between the runner's callbacks."""
    final_status: str = "running"
    use_cli: bool = False
    """Run each callback as a real `jobs-app callback` process (slow: for a few runs)."""
    timeout: float = 10.0
    retries: int = 2


@dataclass
class _Answer:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    hold: float | None = None


# --------------------------------------------------------------------------- the server


class GitHubStandIn:
    """See the module doc. Use as a context manager or call start() and stop()."""

    def __init__(
        self,
        *,
        app_id: int = 4242,
        installation_id: int = 777,
        private_key: str | None = None,
        repository: str = "acme/vm-provisioning",
        workflows: Iterable[str] = ("provision.yml",),
        refs: Iterable[str] = ("main",),
        fine_grained_token: str | None = None,
        token_ttl: float = 3600.0,
        ghes: bool = False,
        runner: RunnerConfig | None = None,
        first_run_id: int = 9_000_000_001,
    ) -> None:
        self.app_id = app_id
        self.installation_id = installation_id
        self.private_key = private_key or generate_private_key()
        """The App's private key (PEM): what the provisioner signs JWTs with."""
        self.public_key = public_key_of(self.private_key)
        self.owner, _, self.repo = repository.partition("/")
        self.workflows = set(workflows)
        self.refs = set(refs)
        self.fine_grained_token = fine_grained_token
        self.token_ttl = token_ttl
        self.ghes = ghes
        self.runner = runner
        self.faults = Faults()
        self._next_run_id = first_run_id
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._runs: dict[int, Run] = {}
        self._tokens: dict[str, float] = {}  # installation token -> expiry (time.time())
        self.credentials_seen: set[str] = set()
        """Every Authorization credential received: the App's JWTs, installation tokens
        (for tests that look for them where they must not be)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner_tasks: dict[int, asyncio.Task[Any]] = {}
        self.port = 0

    # ------------------------------------------------------------------ life

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def repository(self) -> str:
        return f"{self.owner}/{self.repo}"

    def start(self) -> GitHubStandIn:
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=main, name="github-standin", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise TimeoutError("the GitHub stand-in did not start")
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        self._loop = self._thread = None

    def __enter__(self) -> GitHubStandIn:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [*self._tasks, *self._runner_tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ what tests read

    def records(self, endpoint: str | None = None) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self._records if endpoint is None or r.endpoint == endpoint]

    def runs(self) -> list[Run]:
        with self._lock:
            return list(self._runs.values())

    def run(self, run_id: int | str) -> Run:
        with self._lock:
            return self._runs[int(run_id)]

    def runs_for(self, dispatch_id: Any) -> list[Run]:
        wanted = str(dispatch_id)
        return [r for r in self.runs() if r.dispatch_id == wanted]

    def token_requests(self) -> int:
        return len(self.records("token"))

    def issue_token(self) -> str:
        """An installation token, as if the App had asked for one (for other clients)."""
        token = "ghs_" + secrets.token_hex(18)
        with self._lock:
            self._tokens[token] = time.time() + self.token_ttl
        return token

    async def wait_until(
        self, predicate: Callable[[], bool], within: float = 10.0, what: str = "condition"
    ) -> None:
        """Poll `predicate` (on the caller's loop) until true, or fail after `within` s."""
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"stand-in: {what} not reached within {within} s")
            await asyncio.sleep(0.02)  # polling with a bound, not synchronising

    # ------------------------------------------------------------------ HTTP/1.1

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._read_request(conn, reader)
                if request is None:
                    return
                record, answer = self._handle(request, body)
                if answer.hold is not None:
                    await asyncio.sleep(answer.hold)
                    answer.drop = True
                if answer.drop:
                    record.answered = time.monotonic()
                    writer.transport.abort()
                    return
                payload = b"" if answer.body is None else json.dumps(answer.body).encode()
                headers = [
                    ("content-type", "application/json; charset=utf-8"),
                    ("content-length", str(len(payload))),
                    *answer.headers.items(),
                ]
                if answer.status == 204:
                    headers = [h for h in headers if h[0] not in ("content-type", "content-length")]
                out = conn.send(h11.Response(status_code=answer.status, headers=headers))
                if answer.status != 204:
                    out += conn.send(h11.Data(data=payload))
                out += conn.send(h11.EndOfMessage())
                record.status = answer.status
                record.answered = time.monotonic()
                writer.write(out)
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:  # the stand-in stops: drop what is in flight
            writer.transport.abort()
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _read_request(
        conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""
            else:
                raise h11.RemoteProtocolError(f"unexpected {event!r}")

    # ------------------------------------------------------------------ routing

    def _handle(self, request: h11.Request, body: bytes) -> tuple[RequestRecord, _Answer]:
        target = urlsplit(request.target.decode())
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        credential = headers.get("authorization", "").partition(" ")[2]
        if credential:
            with self._lock:
                self.credentials_seen.add(credential)
        method = request.method.decode()
        path = target.path
        repo = f"/repos/{self.owner}/{self.repo}"
        routes: list[tuple[str, str, str]] = [
            ("POST", r"/app/installations/(?P<id>[^/]+)/access_tokens", "token"),
            (
                "POST",
                r"/repos/(?P<o>[^/]+)/(?P<r>[^/]+)/actions/workflows/(?P<wf>[^/]+)/dispatches",
                "dispatch",
            ),
            (
                "GET",
                r"/repos/(?P<o>[^/]+)/(?P<r>[^/]+)/actions/workflows/(?P<wf>[^/]+)/runs",
                "list",
            ),
            ("POST", r"/repos/(?P<o>[^/]+)/(?P<r>[^/]+)/actions/runs/(?P<id>\d+)/cancel", "cancel"),
            ("GET", r"/repos/(?P<o>[^/]+)/(?P<r>[^/]+)/actions/runs/(?P<id>\d+)", "get_run"),
        ]
        endpoint, match = "unknown", None
        for route_method, pattern, name in routes:
            m = re.fullmatch(pattern, path)
            if m and method == route_method:
                endpoint, match = name, m
                break
        record = RequestRecord(
            received=time.monotonic(),
            method=method,
            path=path,
            query=target.query,
            endpoint=endpoint,
        )
        with self._lock:
            self._records.append(record)
        if match is None:
            return record, _not_found()
        if endpoint == "token":
            return record, self._token(match["id"], headers)
        if not self._authorised(headers):
            return record, _Answer(401, {"message": "Bad credentials"})
        params = match.groupdict()
        if f"/repos/{params['o']}/{params['r']}" != repo:
            return record, _not_found()
        if "wf" in params and params["wf"] not in self.workflows:
            return record, _not_found()
        if endpoint == "dispatch":
            return record, self._dispatch(record, headers, body)
        fault = self.faults.take(endpoint, None)
        if fault is not None:
            record.fault = fault.kind
            answer = self._fault_answer(fault)
            if answer is not None:
                return record, answer
        if endpoint == "list":
            return record, self._list(path, parse_qs(target.query))
        if endpoint == "cancel":
            return record, self._cancel(int(match["id"]))
        run = self._runs.get(int(match["id"]))
        if run is None:
            return record, _not_found()
        return record, _Answer(200, run.as_json(self.owner, self.repo, self._workflow()))

    def _workflow(self) -> str:
        return sorted(self.workflows)[0]

    def _authorised(self, headers: dict[str, str]) -> bool:
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        if scheme.lower() not in ("token", "bearer") or not credential:
            return False
        if self.fine_grained_token is not None and credential == self.fine_grained_token:
            return True
        with self._lock:
            expiry = self._tokens.get(credential)
        return expiry is not None and expiry > time.time()

    def _token(self, installation_id: str, headers: dict[str, str]) -> _Answer:
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return _Answer(401, {"message": "A JSON web token could not be decoded"})
        now = time.time()
        try:
            claims = jwt.decode(
                credential,
                self.public_key,
                algorithms=["RS256"],
                options={"require": ["iat", "exp", "iss"], "verify_iat": False},
                leeway=30,
            )
        except jwt.PyJWTError as exc:
            return _Answer(401, {"message": f"A JSON web token could not be decoded: {exc}"})
        if str(claims["iss"]) != str(self.app_id):
            return _Answer(401, {"message": "'Issuer' claim ('iss') must be the app id"})
        iat, exp = float(claims["iat"]), float(claims["exp"])
        if iat > now + 60 or exp - iat > 660 or exp > now + 660:
            return _Answer(
                401, {"message": "'Expiration time' claim ('exp') is too far in the future"}
            )
        if installation_id != str(self.installation_id):
            return _not_found()
        fault = self.faults.take("token", None)
        if fault is not None:
            answer = self._fault_answer(fault)
            if answer is not None:
                return answer
        token = self.issue_token()
        with self._lock:
            expires = self._tokens[token]
        return _Answer(
            201,
            {
                "token": token,
                "expires_at": _iso(datetime.fromtimestamp(expires, UTC)),
                "permissions": {"actions": "write", "metadata": "read"},
                "repository_selection": "selected",
            },
        )

    def _fault_answer(self, fault: Fault) -> _Answer | None:
        """The answer a fault gives in place of the normal one (None: answer normally)."""
        kind = fault.kind
        if kind is FaultKind.ERROR_500:
            return _Answer(500, {"message": "Server Error"})
        if kind is FaultKind.RATE_LIMIT_429:
            return _Answer(
                429, {"message": "Too many requests"}, {"retry-after": str(fault.retry_after)}
            )
        if kind is FaultKind.SECONDARY_403:
            return _Answer(
                403,
                {"message": "You have exceeded a secondary rate limit. Please wait a few minutes."},
                {"retry-after": str(fault.retry_after)},
            )
        if kind is FaultKind.PRIMARY_403:
            reset = int(time.time() + fault.retry_after)
            return _Answer(
                403,
                {"message": "API rate limit exceeded for installation."},
                {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)},
            )
        if kind is FaultKind.REJECT_422:
            return _Answer(422, {"message": fault.message})
        if kind is FaultKind.ANSWER:
            return _Answer(fault.status, {"message": fault.message}, dict(fault.headers))
        if kind is FaultKind.HOLD:
            return _Answer(0, hold=fault.hold)
        return None

    def _dispatch(self, record: RequestRecord, headers: dict[str, str], body: bytes) -> _Answer:
        try:
            data = json.loads(body or b"null")
        except ValueError:
            return _Answer(400, {"message": "Problems parsing JSON"})
        if not isinstance(data, dict):
            return _Answer(400, {"message": "Problems parsing JSON"})
        inputs = data.get("inputs") or {}
        if isinstance(inputs, dict) and isinstance(inputs.get("dispatch_id"), str):
            record.dispatch_id = inputs["dispatch_id"]
        fault = self.faults.take("dispatch", record.dispatch_id)
        if fault is not None:
            record.fault = fault.kind
            answer = self._fault_answer(fault)
            if answer is not None:
                return answer
        ref = data.get("ref")
        if not isinstance(ref, str) or ref not in self.refs:
            return _Answer(422, {"message": f"No ref found for: {ref}"})
        if not isinstance(inputs, dict):
            return _Answer(422, {"message": "Invalid request: inputs is not an object"})
        unexpected = sorted(set(inputs) - WORKFLOW_INPUTS - OPTIONAL_INPUTS)
        if unexpected:
            return _Answer(422, {"message": f"Unexpected inputs provided: {unexpected}"})
        for name in sorted(WORKFLOW_INPUTS):
            if name not in inputs:
                return _Answer(422, {"message": f"Required input '{name}' not provided"})
            if not isinstance(inputs[name], str):
                return _Answer(
                    422, {"message": f"For 'properties/{name}', {inputs[name]!r} is not a string."}
                )
        run = self._create_run(ref, inputs, fault)
        if fault is not None and fault.kind is FaultKind.CREATED_502:
            return _Answer(502, {"message": "Server Error"})
        if fault is not None and fault.kind is FaultKind.CREATED_DROP:
            return _Answer(0, drop=True)
        if fault is not None and fault.kind is FaultKind.CREATED_HOLD:
            return _Answer(0, hold=fault.hold)
        version = headers.get("x-github-api-version", "2022-11-28")
        if self.ghes or (version < NEW_API_VERSION and data.get("return_run_details") is not True):
            return _Answer(204)
        return _Answer(
            200, {"workflow_run_id": run.id, "run_url": run.url, "html_url": run.html_url}
        )

    def _create_run(self, ref: str, inputs: dict[str, str], fault: Fault | None) -> Run:
        with self._lock:
            run_id = self._next_run_id
            self._next_run_id += 1
            run = Run(
                id=run_id,
                dispatch_id=inputs["dispatch_id"],
                inputs=dict(inputs),
                ref=ref,
                created_at=datetime.now(UTC),
                visible_at=time.monotonic() + (fault.list_delay if fault else 0.0),
                display_title=f"provision {inputs['dispatch_id']}",
                html_url=f"{self.url}/{self.owner}/{self.repo}/actions/runs/{run_id}",
                url=f"{self.url}/repos/{self.owner}/{self.repo}/actions/runs/{run_id}",
            )
            self._runs[run_id] = run
        start_delay = fault.start_delay if fault else 0.0
        if self.runner is not None and start_delay is not None:
            task = asyncio.get_running_loop().create_task(
                self._run_workflow(run, self.runner, self.runner.start_delay + start_delay)
            )
            self._runner_tasks[run_id] = task
        return run

    def _list(self, path: str, query: dict[str, list[str]]) -> _Answer:
        def one(name: str, default: str | None = None) -> str | None:
            values = query.get(name)
            return values[0] if values else default

        try:
            per_page = min(100, max(1, int(one("per_page", "30") or 30)))
            page = max(1, int(one("page", "1") or 1))
        except ValueError:
            return _Answer(422, {"message": "Invalid per_page or page"})
        event = one("event")
        created = one("created")
        since: datetime | None = None
        if created:
            text = created.removeprefix(">=")
            try:
                since = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                return _Answer(422, {"message": f"Invalid created filter: {created}"})
            if since.tzinfo is None:
                since = since.replace(tzinfo=UTC)
        now = time.monotonic()
        with self._lock:
            runs = [r for r in self._runs.values() if r.visible_at <= now]
        if event and event != "workflow_dispatch":
            runs = []
        if since is not None:
            # GitHub compares at whole seconds.
            runs = [r for r in runs if r.created_at.replace(microsecond=0) >= since]
        runs.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        total = len(runs)
        last = max(1, -(-total // per_page))
        items = runs[(page - 1) * per_page : page * per_page]
        headers: dict[str, str] = {}
        if total > per_page:
            base = {k: v[0] for k, v in query.items()}

            def link(p: int, rel: str) -> str:
                return f'<{self.url}{path}?{urlencode({**base, "page": p})}>; rel="{rel}"'

            rels = []
            if page > 1:
                rels += [link(page - 1, "prev"), link(1, "first")]
            if page < last:
                rels += [link(page + 1, "next"), link(last, "last")]
            if rels:
                headers["link"] = ", ".join(rels)
        workflow = self._workflow()
        return _Answer(
            200,
            {
                "total_count": total,
                "workflow_runs": [r.as_json(self.owner, self.repo, workflow) for r in items],
            },
            headers,
        )

    def _cancel(self, run_id: int) -> _Answer:
        run = self._runs.get(run_id)
        if run is None:
            return _not_found()
        if run.status == "completed":
            return _Answer(409, {"message": "Cannot cancel a workflow run that is completed."})
        run.cancelled = True
        run.status = "completed"
        run.conclusion = "cancelled"
        task = self._runner_tasks.get(run_id)
        if task is not None:
            task.cancel()
        return _Answer(202, {})

    # ------------------------------------------------------------------ the runner

    async def _run_workflow(self, run: Run, config: RunnerConfig, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            if run.cancelled:
                return
            run.started = True
            run.status = "in_progress"
            # As the workflow does: the dispatch's traceparent input on every callback.
            trace = callback_client.trace_headers(
                {callback_client.TRACEPARENT_ENV: run.inputs.get("traceparent", "")}
            )
            async with httpx.AsyncClient(timeout=config.timeout, headers=trace) as http:
                ok = await self._provision(run, config, http)
            if not run.cancelled:
                run.status = "completed"
                run.conclusion = "success" if ok else "failure"
        finally:
            run.runner_done = True

    async def _provision(self, run: Run, config: RunnerConfig, http: httpx.AsyncClient) -> bool:
        """The workflow's steps; whether the run succeeded."""

        async def report(kind: str, status: str | None = None) -> CallbackRecord:
            record = await self._callback(run, config, http, kind, status)
            run.callbacks.append(record)
            if record.exit_code == callback_client.EXIT_STOP:
                run.stopped_by_409 = True
            return record

        started = await report("status", "provisioning")
        if run.stopped_by_409:
            return False
        if started.exit_code == callback_client.EXIT_OK:
            for _ in range(config.heartbeats):
                await asyncio.sleep(config.interval)
                await report("heartbeat")  # another error: provisioning goes on without it
                if run.stopped_by_409:
                    return False
            await asyncio.sleep(config.interval)
            final = config.final_status
        else:
            final = "failed"  # the workflow's last step reports the failed run
        last = await report("status", final)
        return final == "running" and last.exit_code == callback_client.EXIT_OK

    async def _callback(
        self,
        run: Run,
        config: RunnerConfig,
        http: httpx.AsyncClient,
        kind: str,
        status: str | None,
    ) -> CallbackRecord:
        inputs = run.inputs
        common = {
            "attempt": int(inputs["attempt"]),
            "dispatch_id": inputs["dispatch_id"],
            "workflow_run_id": str(run.id),
        }
        if config.use_cli:
            argv = [
                sys.executable,
                "-m",
                "jobs_app.cli",
                "callback",
                kind,
                "--url",
                inputs["callback_url"],
                "--attempt",
                inputs["attempt"],
                "--dispatch-id",
                inputs["dispatch_id"],
                "--workflow-run-id",
                str(run.id),
                "--retries",
                str(config.retries),
            ]
            if status is not None:
                argv += ["--status", status]
            env = {
                **os.environ,
                callback_client.SECRET_ENV: config.secret,
                callback_client.TRACEPARENT_ENV: inputs.get("traceparent", ""),
            }
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            _, err = await proc.communicate()
            code = proc.returncode if proc.returncode is not None else 1
            return CallbackRecord(kind, status, None, code, err.decode(errors="replace")[-300:])
        if kind == "status":
            assert status is not None
            result = await callback_client.send_status(
                http,
                inputs["callback_url"],
                config.secret,
                status=status,
                retries=config.retries,
                backoff=0.1,
                **common,
            )
        else:
            result = await callback_client.send_heartbeat(
                http,
                inputs["callback_url"],
                config.secret,
                retries=config.retries,
                backoff=0.1,
                **common,
            )
        return CallbackRecord(
            kind,
            status,
            result.status_code,
            result.exit_code,
            result.reason,
            result.detail[:300],
            result.tries,
        )


def _not_found() -> _Answer:
    return _Answer(
        404,
        {"message": "Not Found", "documentation_url": "https://docs.github.com/rest"},
    )


def github_env(standin: GitHubStandIn, port: int, **over: str) -> dict[str, Any]:
    """A serve process dispatching to the stand-in as a GitHub App, on `port`."""
    return {
        "port": port,
        "JOBS_PROVISIONER": "github",
        "JOBS_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "JOBS_GITHUB_API_URL": standin.url,
        "JOBS_GITHUB_REPOSITORY": standin.repository,
        "JOBS_GITHUB_WORKFLOW": "provision.yml",
        "JOBS_GITHUB_APP_ID": str(standin.app_id),
        "JOBS_GITHUB_APP_PRIVATE_KEY": standin.private_key,
        "JOBS_GITHUB_INSTALLATION_ID": str(standin.installation_id),
        "JOBS_GITHUB_TIMEOUT_SECONDS": "2",
        "DISPATCH_INTERVAL_SECONDS": "0.2",
        "DISPATCH_RECONCILE_GRACE_SECONDS": "2",
        "DISPATCH_BACKOFF_BASE_SECONDS": "0.2",
        "DISPATCH_BACKOFF_MAX_SECONDS": "1",
        "SWEEP_INTERVAL_SECONDS": "1",
        **over,
    }
