"""Traces, with an in-memory exporter: a signed callback is an HTTP span with its SQL
span as a child; a round span parents the HTTP client calls made inside it; the
trace id is on the log lines written inside a span."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from jobs_app.core import tracing
from jobs_app.loops import sweeper
from jobs_app.services import jobs
from tests.http_helpers import callback


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure_tracing(exporter=exporter) is not None
    try:
        yield exporter
    finally:
        tracing.shutdown_tracing()


@pytest.fixture
async def traced_client(spans: InMemorySpanExporter, database: str) -> AsyncIterator[Any]:
    """The app in this process, built while tracing is on (so with Litestar's plugin)."""
    from jobs_app.http.app import create_app

    app = create_app(run_sweeper=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """What the app logs, through its own formatter (JSON), into a buffer."""
    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(root.handlers[0].formatter)
    root.addHandler(handler)
    try:
        yield handler.stream
    finally:
        root.removeHandler(handler)


def _sql(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if (s.attributes or {}).get("db.system") == "postgresql"]


async def test_a_signed_callback_is_an_http_span_with_its_sql_as_children(
    spans, traced_client, log_lines, user_agent
):
    user_id, agent_id = user_agent
    job = (
        await jobs.enqueue_provisioning_job(
            agent_id=agent_id, user_id=user_id, stripe_event_id="evt_traced"
        )
    ).job
    spans.clear()
    started = {"attempt": 1, "status": "provisioning", "workflow_run_id": "run-1"}
    r = await callback(traced_client, job.id, "status", started)
    assert r.status_code == 200, r.text

    finished = spans.get_finished_spans()
    servers = [s for s in finished if s.kind == trace.SpanKind.SERVER]
    assert len(servers) == 1, [s.name for s in finished]
    server = servers[0]
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/api/callbacks/jobs/{job_id}/status"
    assert server.attributes["http.status_code"] == 200
    statements = _sql(finished)
    assert statements, [s.name for s in finished]
    for statement in statements:  # the transition's one statement, in the request's span
        assert statement.parent is not None
        assert statement.parent.span_id == server.context.span_id
        assert statement.context.trace_id == server.context.trace_id
        # Parameters (ids, error texts) are not recorded.
        assert not any(k.startswith("db.statement.parameters") for k in statement.attributes or {})

    # The request's log line carries its trace.
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    reported = [r for r in lines if r["event"] == "status reported"]
    assert len(reported) == 1
    assert reported[0]["trace_id"] == trace.format_trace_id(server.context.trace_id)
    assert reported[0]["job_id"] == str(job.id)


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def loopback_server() -> Iterator[str]:
    """A real HTTP server on loopback (a stand-in for GitHub's API)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


async def test_a_round_span_parents_the_http_calls_made_in_it(spans, loopback_server):
    async with httpx.AsyncClient() as client:
        with tracing.round_span("dispatch.round", replica="r1") as round_:
            assert round_ is not None
            assert tracing.current_trace_ids()["span_id"] == trace.format_span_id(
                round_.get_span_context().span_id
            )
            assert (await client.get(f"{loopback_server}/repos/x/dispatches")).status_code == 200
    finished = spans.get_finished_spans()
    rounds = [s for s in finished if s.name == "dispatch.round"]
    clients = [s for s in finished if s.kind == trace.SpanKind.CLIENT]
    assert len(rounds) == 1 and len(clients) == 1, [s.name for s in finished]
    assert clients[0].parent is not None
    assert clients[0].parent.span_id == rounds[0].context.span_id
    assert (clients[0].attributes or {}).get("http.status_code", 200) == 200
    assert (rounds[0].attributes or {})["replica"] == "r1"
    # Outside any span, log lines carry no trace.
    assert tracing.current_trace_ids() == {}


async def test_a_sweeper_round_is_one_span_with_its_statement(spans, database):
    spans.clear()
    await sweeper.sweep_once()
    finished = spans.get_finished_spans()
    rounds = [s for s in finished if s.name == "sweeper.round"]
    assert len(rounds) == 1, [s.name for s in finished]
    statements = _sql(finished)
    assert statements
    assert all(
        s.parent is not None and s.parent.span_id == rounds[0].context.span_id for s in statements
    )


def test_tracing_is_off_unless_the_standard_variables_ask_for_it():
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "otlp"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none"})
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert not tracing.wanted({**endpoint, "OTEL_SDK_DISABLED": "true"})
    # Off: round spans cost nothing and yield no span.
    with tracing.round_span("sweeper.round") as span:
        assert span is None


async def test_one_dispatch_is_a_github_request_span_under_the_dispatchers(
    spans, db, user_agent, start_github_standin
):
    """The dispatcher's round span parents the dispatch's span, which parents the HTTP
    client spans of its GitHub calls (the installation token and the dispatch POST)."""
    import msgspec

    from jobs_app.core.settings import get_settings
    from jobs_app.loops.dispatcher import Dispatcher
    from jobs_app.loops.provisioners.github import GitHubProvisioner

    standin = start_github_standin()
    user_id, agent_id = user_agent
    await jobs.enqueue_provisioning_job(
        agent_id=agent_id, user_id=user_id, stripe_event_id="evt_traced"
    )
    provisioner = GitHubProvisioner(
        api_url=standin.url,
        repository=standin.repository,
        workflow="provision.yml",
        app_id=standin.app_id,
        private_key=standin.private_key,
        installation_id=standin.installation_id,
    )
    settings = msgspec.structs.replace(get_settings(), public_url="http://jobs.example")
    dispatcher = Dispatcher(provisioner, settings)
    spans.clear()
    try:
        assert await dispatcher.run_once() == 1
        await dispatcher.drain()
    finally:
        await provisioner.aclose()
    finished = spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished}
    [round_] = [s for s in finished if s.name == "dispatch.round"]
    [request] = [s for s in finished if s.name == "dispatch.request"]
    assert request.parent is not None and request.parent.span_id == round_.context.span_id
    clients = [  # HTTP client spans (asyncpg's statement spans are CLIENT spans too)
        s
        for s in finished
        if s.kind == trace.SpanKind.CLIENT and (s.attributes or {}).get("db.system") is None
    ]
    assert len(clients) == 2, [s.name for s in clients]  # the token, the dispatch
    for span in clients:
        assert span.parent is not None and by_id[span.parent.span_id] is request
    assert (request.attributes or {})["job_id"]


def test_spans_are_redacted_before_export_whatever_the_attribute_name(spans):
    """Every string of a span goes through the log redaction's list: URLs under any name,
    captured secret headers, exception events, status, links."""
    token, jwt = "ghs_" + "a1" * 12, "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiI0MjQyIn0.c2lnbmF0dXJlc2ln"
    provider = tracing.provider()
    assert provider is not None
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("GET /stream?token=s3cr3t-stream") as span:
        span.set_attribute("http.url", "http://h/api/users/1/events/stream?token=s3cr3t-stream")
        span.set_attribute("url.query", "token=s3cr3t-stream&last_event_id=4")
        span.set_attribute("url.full", "postgresql://app:hunter2hunter2@db/jobs")
        span.set_attribute("http.request.header.authorization", ("Bearer anything-at-all",))
        span.set_attribute("http.request.header.x_signature", ("t=1,v1=" + "ab" * 32,))
        span.set_attribute("retries", 3)
        span.record_exception(RuntimeError(f"GitHub said no to {token} signed {jwt}"))
        span.set_status(trace.StatusCode.ERROR, f"refused token {token}")
    [exported] = spans.get_finished_spans()
    attributes = dict(exported.attributes or {})
    assert attributes == {
        "http.url": "http://h/api/users/1/events/stream?token=[redacted]",
        "url.query": "token=[redacted]&last_event_id=4",
        "url.full": "postgresql://app:[redacted]@db/jobs",
        "http.request.header.authorization": ("[redacted]",),
        "http.request.header.x_signature": ("[redacted]",),
        "retries": 3,
    }
    assert exported.name == "GET /stream?token=[redacted]"
    text = repr([(e.name, dict(e.attributes or {})) for e in exported.events])
    assert token not in text and jwt not in text and "[redacted]" in text
    assert exported.status.description == "refused token [redacted]"


def test_trace_ids_for_log_lines_never_raise_even_without_a_context(spans):
    """OTEL_PROPAGATORS=none made the current context None: every log line then raised."""
    from opentelemetry import context

    token = context.attach(None)  # type: ignore[arg-type]
    try:
        assert tracing.current_trace_ids() == {}
        assert tracing.current_traceparent() is None
    finally:
        context.detach(token)


def test_the_callback_client_sends_only_a_valid_traceparent():
    from jobs_app.workflow.callback_client import trace_headers

    valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert trace_headers({"TRACEPARENT": valid}) == {"traceparent": valid}
    assert trace_headers({"TRACEPARENT": valid, "TRACESTATE": "vendor=x"}) == {
        "traceparent": valid,
        "tracestate": "vendor=x",
    }
    assert trace_headers({}) == {} and trace_headers({"TRACEPARENT": ""}) == {}
    for bad in (
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # an all-zero trace id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # a forbidden version
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # not lowercase
        valid + "\r\nX-Injected: 1",
    ):
        assert trace_headers({"TRACEPARENT": bad}) == {}, bad
