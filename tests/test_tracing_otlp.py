"""Traces as a collector receives them: real `jobs-app serve`, `dispatch` and `callback`
processes export over OTLP/HTTP to a receiver in this process (tests/otlp_receiver.py),
which decodes the protobuf. No exported span, event or resource holds a secret; every
OTEL_* setting the SDK accepts leaves the service answering, one that cannot work stops
it at start; the dispatcher alone is traced like serve, and the workflow's callbacks
join the trace that dispatched them."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import API_HEADERS, CALLBACK_SECRET, STRIPE_SECRET, LoggedServer, free_port
from tests.github_standin import RunnerConfig, github_env
from tests.http_helpers import make_job
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

SERVER, CLIENT = 2, 3  # the protobuf's SpanKind
CAPTURE_EVERY_HEADER = {  # the instrumentations' own switches: record every header
    f"OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_{side}": ".*"
    for side in ("SERVER_REQUEST", "SERVER_RESPONSE", "CLIENT_REQUEST", "CLIENT_RESPONSE")
}
JWT = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.")
GITHUB_TOKEN = re.compile(rb"gh[spour]_[A-Za-z0-9]{10,}")
SIGNATURE = re.compile(rb"v1=[0-9a-f]{16,}")
SHAPES = (JWT, GITHUB_TOKEN, SIGNATURE)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    try:
        yield r
    finally:
        r.stop()


def traced(receiver: OtlpReceiver, **over: str) -> dict[str, str]:
    """The OTEL_* variables of a process exporting to `receiver` every 50 ms."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "jobs-app-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        **over,
    }


async def wait_spans(receiver: OtlpReceiver, condition: Any, within: float = 60) -> list[Any]:
    return await asyncio.to_thread(receiver.wait_for, condition, within)


async def wait_job_status(api: httpx.AsyncClient, job_id: str, status: str) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    while (current := (await api.get(f"/api/jobs/{job_id}")).json()["status"]) != status:
        assert asyncio.get_running_loop().time() < deadline, current
        await asyncio.sleep(0.05)  # polling another process's progress, with a bound


def assert_clean(server: LoggedServer) -> None:
    text = server.log_text()
    assert "Traceback" not in text and "unhandled error" not in text, text[-3000:]


def named(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


# --------------------------------------------------------------------------- secrets


async def test_no_exported_span_holds_a_secret_whatever_the_instrumentations_record(
    db, receiver, start_logged_server, start_github_standin
):
    """Serve dispatches to the GitHub stand-in (JWT, installation token), its runner
    calls back signed, a browser opens a stream with `?token=`; every header is captured
    by the instrumentations' own settings, the resource carries a URL with secrets.
    Then every byte received is scanned for every secret this test knows, and by shape."""
    standin = start_github_standin(runner=RunnerConfig(secret=CALLBACK_SECRET, start_delay=0.0))
    resource_secret = "rsrc-" + secrets.token_hex(8)
    url_password = "pw-" + secrets.token_hex(8)
    server = await start_logged_server(
        1,
        **github_env(standin, free_port()),
        **traced(
            receiver,
            **CAPTURE_EVERY_HEADER,
            OTEL_RESOURCE_ATTRIBUTES=(
                f"deployment.environment=test,jobs.link=https://ops:{url_password}@example.com/"
                f"?token={resource_secret}"
            ),
        ),
    )
    async with httpx.AsyncClient(base_url=server.url, headers=API_HEADERS, timeout=20) as api:
        job = await make_job(api)
        await wait_job_status(api, job["id"], "running")  # dispatched, called back signed
        r = await api.post("/api/stream-tokens", json={"user_id": job["user_id"]})
        assert r.status_code == 201, r.text
        stream_token = r.json()["token"]
        stream_path = f"/api/users/{job['user_id']}/events/stream"
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as browser:
            async with browser.stream("GET", f"{stream_path}?token={stream_token}") as stream:
                assert stream.status_code == 200
                await anext(stream.aiter_bytes())  # opened: its span ends when it closes
            wrong = "wrong-" + secrets.token_hex(8)
            refused = await browser.get(f"/api/jobs/{job['id']}/events/stream?token={wrong}")
            assert refused.status_code in (401, 403), refused.text
            unmatched = "nope-" + secrets.token_hex(8)
            assert (
                await browser.get(f"/no/such/route?access_token={unmatched}")
            ).status_code == 404

    def complete(spans: list[ReceivedSpan]) -> bool:
        routes = {s.attributes.get("http.route") for s in spans if s.kind == SERVER}
        return (
            bool(named(spans, "dispatch.request"))
            and "/api/callbacks/jobs/{job_id}/status" in routes
            and "/api/users/{user_id}/events/stream" in routes
            and any(s.kind == SERVER and s.attributes.get("http.status_code") == 404 for s in spans)
        )

    spans = await wait_spans(receiver, complete)
    server.stop()
    assert_clean(server)

    known = {
        "the API token": API_HEADERS["Authorization"].split()[1],
        "the callback secret": CALLBACK_SECRET,
        "the Stripe secret": STRIPE_SECRET,
        "a stream token": stream_token,
        "a refused stream token": wrong,
        "a query's access_token": unmatched,
        "a resource URL's token": resource_secret,
        "a resource URL's password": url_password,
        **{f"a GitHub credential {c[:6]}…": c for c in standin.credentials_seen},
    }
    assert len(standin.credentials_seen) >= 2  # the App's JWT and an installation token
    leaks = {what: receiver.find(secret)[:1] for what, secret in known.items()}
    shapes = {
        s.pattern: [m for raw in receiver.payloads for m in s.findall(raw)][:1] for s in SHAPES
    }
    assert not {k: v for k, v in {**leaks, **shapes}.items() if v}

    # The secrets were recorded, and hidden: not merely left out.
    [stream_span] = [
        s for s in spans if s.attributes.get("http.route") == "/api/users/{user_id}/events/stream"
    ]
    urls = [v for k, v in stream_span.attributes.items() if isinstance(v, str) and "token=" in v]
    assert urls and all("token=[redacted]" in v for v in urls), stream_span.attributes
    captured = {
        k: v for s in spans for k, v in s.attributes.items() if k.endswith("header.authorization")
    }
    assert captured and set(captured.values()) == {("[redacted]",)}, captured
    signatures = [
        v for s in spans for k, v in s.attributes.items() if k.endswith("header.x_signature")
    ]
    assert signatures and set(signatures) == {("[redacted]",)}
    assert "[redacted]" in spans[0].resource["jobs.link"]


# --------------------------------------------------------------------------- settings


PROPAGATED_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PROPAGATED_SPAN = "00f067aa0ba902b7"
INCOMING = {
    "traceparent": f"00-{PROPAGATED_TRACE}-{PROPAGATED_SPAN}-01",
    "b3": f"{PROPAGATED_TRACE}-{PROPAGATED_SPAN}-1",
    "baggage": "tenant=acme",
}


@pytest.mark.parametrize(
    ("settings", "joins"),
    [
        ({"OTEL_PROPAGATORS": "none"}, False),
        ({"OTEL_PROPAGATORS": "b3"}, True),
        ({"OTEL_PROPAGATORS": "baggage"}, False),
        ({"OTEL_PROPAGATORS": "tracecontext,b3multi"}, True),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, None),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}, True),
        ({"OTEL_TRACES_SAMPLER": "sometimes", "OTEL_TRACES_SAMPLER_ARG": "lots"}, True),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}, True),
    ],
    ids=lambda v: ",".join(f"{k[5:]}={x}" for k, x in v.items()) if isinstance(v, dict) else None,
)
async def test_standard_settings_leave_the_service_answering(
    receiver, start_logged_server, settings, joins
):
    """`joins`: whether the request's span joins the incoming trace (None: nothing is
    sampled, so nothing is exported)."""
    server = await start_logged_server(1, **traced(receiver, **settings))
    async with httpx.AsyncClient(base_url=server.url, headers=API_HEADERS, timeout=20) as api:
        assert (await api.get("/health", headers=INCOMING)).status_code == 200
        for _ in range(3):
            assert (await api.get("/api/jobs", headers=INCOMING)).status_code == 200
        garbled = {"traceparent": "00-zz-00-01", "b3": "x-y-z", "baggage": "=;=;"}
        assert (await api.get("/api/jobs", headers=garbled)).status_code == 200
    if joins is None:
        server.stop()  # flushes whatever was buffered
        assert not [s for s in receiver.spans if s.kind == SERVER]
    else:
        # Three requests came with a sampled parent; the garbled one may start a trace.
        spans = await wait_spans(
            receiver, lambda spans: len([s for s in spans if s.name == "GET /api/jobs"]) >= 3
        )
        requests = named(spans, "GET /api/jobs")
        joined = [s for s in requests if s.trace_id == PROPAGATED_TRACE]
        assert len(joined) == (3 if joins else 0), [
            (s.trace_id, s.parent_span_id) for s in requests
        ]
        assert all(s.parent_span_id == PROPAGATED_SPAN for s in joined)
        server.stop()
    assert_clean(server)


@pytest.mark.parametrize(
    ("settings", "warning"),
    [
        ({"OTEL_TRACES_EXPORTER": "console"}, None),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:1"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "unreachable"}, None),  # a free port, below
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://[::1"},
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ),
    ],
    ids=["console", "exporter-none", "unreachable-collector", "no-scheme", "bad-host"],
)
async def test_exporters_that_cannot_deliver_never_fail_a_request(
    start_logged_server, settings, warning
):
    if settings.get("OTEL_EXPORTER_OTLP_ENDPOINT") == "unreachable":
        settings = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    server = await start_logged_server(
        1, **settings, OTEL_BSP_SCHEDULE_DELAY="50", OTEL_EXPORTER_OTLP_TIMEOUT="1"
    )
    async with httpx.AsyncClient(base_url=server.url, headers=API_HEADERS, timeout=20) as api:
        for _ in range(5):
            assert (await api.get("/api/jobs", headers=INCOMING)).status_code == 200
        await make_job(api)
    loop = asyncio.get_running_loop()
    started = loop.time()
    server.stop()
    stopped_in = loop.time() - started
    assert "Application shutdown complete" in server.log_text(), server.log_text()[-2000:]
    assert stopped_in < 20, stopped_in  # shutdown's flush is bounded by the export timeout
    assert_clean(server)
    if warning is not None:
        assert f"{warning}=" in server.log_text() and "not an http(s) URL" in server.log_text()
    if settings.get("OTEL_TRACES_EXPORTER") == "console":
        assert '"name": "GET /api/jobs"' in server.log_text()  # the console exporter's JSON


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("OTEL_TRACES_EXPORTER", "otlp,jaeger"),
        ("OTEL_PROPAGATORS", "tracecontext,xray"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "-1"),
        ("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "many"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "dispatch"])
def test_a_setting_that_cannot_work_stops_at_start_naming_the_variable(
    database, command, variable, value
):
    env = {
        **os.environ,
        "DATABASE_URL": database,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        "JOBS_PROVISIONER": "simulated",
        "JOBS_PUBLIC_URL": "http://127.0.0.1:9",
        variable: value,
    }
    argv = [sys.executable, "-m", "jobs_app.cli", command]
    if command == "serve":
        argv += ["--port", str(free_port())]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"jobs-app: {variable}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- dispatch, callback


@pytest.fixture
async def dispatch_process(database: str) -> AsyncIterator[Any]:
    """Factory: a `jobs-app dispatch` process with `env`, stopped by SIGTERM afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs_app.cli", "dispatch"],
            env={**os.environ, "DATABASE_URL": database, "DB_POOL_MAX_SIZE": "4", **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


async def test_dispatch_alone_is_traced_like_serve_and_the_runs_callbacks_join_its_trace(
    db, receiver, start_logged_server, start_github_standin, dispatch_process
):
    """Serve answers the API and the callbacks (no dispatcher of its own); `jobs-app
    dispatch` dispatches to the stand-in, whose runner calls back with the dispatch's
    traceparent, as the workflow does. (`db`: empty tables, so only this job is queued.)"""
    standin = start_github_standin(runner=RunnerConfig(secret=CALLBACK_SECRET, start_delay=0.0))
    server = await start_logged_server(1, **traced(receiver))
    env = github_env(standin, server.port, **traced(receiver))
    env.pop("port")
    dispatcher = dispatch_process(**env)
    async with httpx.AsyncClient(base_url=server.url, headers=API_HEADERS, timeout=20) as api:
        job = await make_job(api)
        await wait_job_status(api, job["id"], "running")

    callback_route = "/api/callbacks/jobs/{job_id}/status"

    def complete(spans: list[ReceivedSpan]) -> bool:
        callbacks = [s for s in spans if s.attributes.get("http.route") == callback_route]
        return bool(named(spans, "dispatch.request")) and len(callbacks) >= 2

    spans = await wait_spans(receiver, complete)
    # The run's callbacks (status provisioning, status running) joined the trace of the
    # dispatch that started it (a loaded machine may have made a first dispatch time out).
    callbacks = [s for s in spans if s.attributes.get("http.route") == callback_route]
    requests = {s.span_id: s for s in named(spans, "dispatch.request")}
    assert {s.parent_span_id for s in callbacks} <= set(requests), [str(s) for s in callbacks]
    request = requests[callbacks[0].parent_span_id]
    assert all(s.trace_id == request.trace_id for s in callbacks), [s.trace_id for s in callbacks]
    assert request.attributes["job_id"] == job["id"]
    dispatch_trace = [s for s in spans if s.trace_id == request.trace_id]
    rounds = [s for s in dispatch_trace if s.name == "dispatch.round"]
    assert rounds and request.parent_span_id == rounds[0].span_id
    github_calls = [
        s for s in dispatch_trace if s.kind == CLIENT and "db.system" not in s.attributes
    ]
    assert github_calls and all(s.parent_span_id == request.span_id for s in github_calls)
    assert any("/dispatches" in str(s.attributes) for s in github_calls)
    statements = [s for s in spans if s.attributes.get("db.system") == "postgresql"]
    assert any(s.trace_id == request.trace_id for s in statements)
    # The same resource as serve's, but for the SDK's id of each process.
    served = [s for s in spans if s.kind == SERVER]

    def shared(resource: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in resource.items() if k != "service.instance.id"}

    assert served and all(shared(s.resource) == shared(request.resource) for s in served)
    assert request.resource["service.name"] == "jobs-app-under-test"

    dispatcher.send_signal(signal.SIGTERM)
    _, err = await asyncio.to_thread(dispatcher.communicate, timeout=30)
    assert dispatcher.returncode == 0, err.decode()[-2000:]
    assert b"Traceback" not in err, err.decode()[-2000:]
    server.stop()
    assert_clean(server)


async def test_jobs_app_callback_sends_the_runners_traceparent(receiver, start_logged_server):
    server = await start_logged_server(1, **traced(receiver))
    async with httpx.AsyncClient(base_url=server.url, headers=API_HEADERS, timeout=20) as api:
        job = await make_job(api)
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)

    async def callback(status: str, traceparent: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "jobs_app.cli", "callback", "status", "--attempt", "1"]
        argv += ["--status", status, "--url", f"{server.url}/api/callbacks/jobs/{job['id']}"]
        env = {**os.environ, "JOBS_CALLBACK_SECRET": CALLBACK_SECRET, "TRACEPARENT": traceparent}
        return await asyncio.to_thread(
            subprocess.run, argv, env=env, capture_output=True, text=True, timeout=60
        )

    joined = await callback("provisioning", f"00-{trace_id}-{parent}-01")
    assert joined.returncode == 0, joined.stderr
    malformed = await callback("running", "00-not-a-trace-01")
    assert malformed.returncode == 0, malformed.stderr  # sent, without the header
    assert "TRACEPARENT is not a W3C traceparent" in malformed.stderr

    route = "/api/callbacks/jobs/{job_id}/status"
    spans = await wait_spans(
        receiver,
        lambda spans: len([s for s in spans if s.attributes.get("http.route") == route]) == 2,
    )
    first, second = [s for s in spans if s.attributes.get("http.route") == route]
    assert (first.trace_id, first.parent_span_id) == (trace_id, parent)
    assert second.trace_id != trace_id and not second.parent_span_id
    server.stop()
    assert_clean(server)
