"""A real OTLP/HTTP trace receiver on loopback, as a collector would be: it decodes each
`POST /v1/traces` (protobuf, gzip or not) into an ExportTraceServiceRequest and keeps
what it received, raw and as flat spans; `wait_for` waits, with a bound, for spans that
satisfy a condition."""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.conftest import free_port


def value_of(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return tuple(value_of(x) for x in v.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: value_of(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


def attributes_of(kvs: Any) -> dict[str, Any]:
    return {kv.key: value_of(kv.value) for kv in kvs}


@dataclass
class ReceivedSpan:
    name: str
    kind: int
    """The protobuf's SpanKind: 2 server, 3 client."""
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    status_message: str = ""

    def __str__(self) -> str:
        return f"{self.name} {self.attributes}"


class OtlpReceiver:
    """Start with `start()`, point OTEL_EXPORTER_OTLP_ENDPOINT at `url`, stop with `stop()`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.payloads: list[bytes] = []
        """Every request body received, decompressed: what a secret scan reads."""
        self.spans: list[ReceivedSpan] = []
        self.bad_requests: list[str] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    raw = gzip.decompress(raw)
                elif encoding == "deflate":
                    raw = zlib.decompress(raw)
                if self.path != "/v1/traces":
                    receiver.bad_requests.append(f"POST {self.path}")
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(raw)
                receiver._keep(raw, request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                """Quiet."""

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _keep(self, raw: bytes, request: ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = attributes_of(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            name=s.name,
                            kind=s.kind,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            attributes=attributes_of(s.attributes),
                            resource=resource,
                            events=[(e.name, attributes_of(e.attributes)) for e in s.events],
                            status_message=s.status.message,
                        )
                    )
        with self._changed:
            self.payloads.append(raw)
            self.spans.extend(spans)
            self._changed.notify_all()

    def wait_for(
        self, condition: Callable[[list[ReceivedSpan]], Any], within: float = 30.0
    ) -> list[ReceivedSpan]:
        """Every span received, once `condition(spans)` holds (AssertionError after `within`)."""
        deadline = time.monotonic() + within
        with self._changed:
            while not condition(list(self.spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({s.name for s in self.spans})
                    raise AssertionError(f"spans not received within {within}s; got {names}")
                self._changed.wait(left)
            return list(self.spans)

    def find(self, secret: str) -> list[str]:
        """Where `secret` appears in what was received: the spans' texts, then raw bytes."""
        found = [str(s) for s in self.spans if secret in repr(s)]
        needle = secret.encode()
        if not found and any(needle in raw for raw in self.payloads):
            found.append("(in a raw payload)")
        return found
