"""Hostile input against a real `jobs-app serve` process.

schemathesis generates valid and invalid requests for every operation in
/schema/openapi.json (bearer token on the dashboard routes, a valid X-Signature on
the workflow callbacks, a valid Stripe-Signature on the webhook, so the generated
bodies reach the code behind the guards) and checks that no answer is a server error
and every answer is documented and matches its schema. Then explicit cases: oversized
bodies, deeply nested JSON, unicode and NUL bytes, SQL-shaped values, huge limits and
cursors: each a clear 4xx with a JSON body, and nothing written.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import requests
import schemathesis
import stripe
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from jobs_app.core.signing import sign
from tests.conftest import API_HEADERS, CALLBACK_SECRET, STRIPE_SECRET, record_figure

EXAMPLES_PER_OPERATION = 150
"""Hypothesis examples per operation and generation mode pass (positive + negative)."""

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    ignored_auth,
]

OPEN = ("/health", "/metrics")

APP_TABLES = ("users", "agents", "provisioning_jobs", "job_events")


async def table_counts(db: asyncpg.Connection) -> dict[str, int]:
    return {t: int(await db.fetchval(f"SELECT count(*) FROM {t}")) for t in APP_TABLES}


# --------------------------------------------------------------------------- schemathesis


async def _seed(base_url: str, n: int = 4) -> list[dict[str, str]]:
    """A few users, agents and jobs the generated requests can name, so they reach
    the code paths behind "not found" too."""
    known: list[dict[str, str]] = []
    async with httpx.AsyncClient(base_url=base_url, headers=API_HEADERS, timeout=10) as c:
        for i in range(n):
            user = (await c.post("/api/users", json={"email": f"seed-{i}@example.com"})).json()
            agent = (await c.post("/api/agents", json={"user_id": user["id"], "name": "a"})).json()
            job = await c.post(
                "/api/jobs",
                json={"user_id": user["id"], "agent_id": agent["id"], "stripe_event_id": f"e{i}"},
            )
            assert job.status_code == 201, job.text
            known.append(
                {"user_id": user["id"], "agent_id": agent["id"], "job_id": job.json()["id"]}
            )
    return known


def _is_uuid(value: object) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return isinstance(value, str)


def _point_at_known_dict(container: dict[str, Any], known: dict[str, str]) -> None:
    for name in ("job_id", "agent_id", "user_id"):
        if _is_uuid(container.get(name)):
            container[name] = known[name]


def _point_at_known(case: Any, known: dict[str, str]) -> None:
    """Replace generated well-formed ids with ids that exist (well-formed stays well-formed,
    so a negative case stays negative and a positive one positive)."""
    for container in (case.path_parameters, case.query, case.body):
        if isinstance(container, dict):
            _point_at_known_dict(container, known)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _stripe_events() -> st.SearchStrategy[Any]:
    """Stripe-shaped events (checkout or not, metadata right, wrong or missing) and junk."""
    ids = st.uuids().map(str) | st.text(max_size=40)
    metadata = st.fixed_dictionaries(
        {"user_id": ids, "agent_id": ids},
        optional={"region": st.sampled_from(["us-east", "eu-west", "Bad Region", ""]), "x": _JSON},
    )
    event = st.fixed_dictionaries(
        {
            "id": st.text(min_size=1, max_size=300),
            "type": st.sampled_from(["checkout.session.completed", "invoice.paid"]) | st.text(),
            "data": st.fixed_dictionaries(
                {"object": st.fixed_dictionaries({"metadata": metadata | _JSON})}
            ),
        },
        optional={"object": st.just("event"), "livemode": st.booleans()},
    )
    return event | _JSON


def _signed_request(case: Any, base_url: str) -> dict[str, Any]:
    """The request schemathesis would send, with the body serialised here so it can
    be signed the way the workflow and Stripe sign theirs."""
    # A case whose headers were made invalid on purpose (no or a bad Authorization)
    # goes as generated: it must be refused.
    negative_headers = case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER)
    headers = None if negative_headers else dict(API_HEADERS)
    kwargs = case.as_transport_kwargs(base_url=base_url, headers=headers)
    if "json" in kwargs:
        kwargs["data"] = json.dumps(kwargs.pop("json")).encode()
    body = kwargs.get("data")
    if isinstance(body, str):
        body = kwargs["data"] = body.encode()
    if case.path.startswith("/api/callbacks/"):
        kwargs["headers"]["X-Signature"] = sign(CALLBACK_SECRET, body or b"")
    elif case.path == "/webhooks/stripe":
        payload = (body or b"").decode("utf-8", errors="surrogateescape")
        kwargs["headers"]["Stripe-Signature"] = stripe.WebhookSignature.generate_signature_header(
            payload, STRIPE_SECRET
        )
    kwargs["timeout"] = 10
    return kwargs


def _budget(path: str) -> int:
    if path in OPEN:  # no input: a few requests exhaust them
        return 10
    if path == "/webhooks/stripe":  # no negative pass (its body is not in the spec)
        return 2 * EXAMPLES_PER_OPERATION
    return EXAMPLES_PER_OPERATION


def _fuzz(
    base_url: str, known: list[dict[str, str]]
) -> tuple[Counter[str], Counter[int], list[str]]:
    """Run every operation's positive and negative strategies; raise on the first violation."""
    schema = schemathesis.openapi.from_url(f"{base_url}/schema/openapi.json", timeout=10)
    examples: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    unsatisfiable: list[str] = []
    with requests.Session() as session:

        def runner(operation: Any, mode: GenerationMode) -> Any:
            @settings(
                max_examples=_budget(operation.path),
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck),
            )
            @given(
                case=operation.as_strategy(mode),
                pick=st.integers(0, len(known)),
                event=_stripe_events(),
            )
            def run(case: Any, pick: int, event: Any) -> None:
                if operation.path == "/webhooks/stripe":
                    # The spec can't describe Stripe's body (it is verified raw): generate
                    # events, valid-looking and not, and sign them as Stripe would.
                    case.body = event
                    case.media_type = "application/json"
                # An event stream of a known job or user never ends: the stream routes are
                # fuzzed on what they decide before streaming (auth, 400, 404).
                if pick < len(known) and not operation.path.endswith("/events/stream"):
                    _point_at_known(case, known[pick])
                    if isinstance(case.body, dict):
                        metadata = case.body.get("data", {}).get("object", {}).get("metadata")
                        if isinstance(metadata, dict):
                            _point_at_known_dict(metadata, known[pick])
                kwargs = _signed_request(case, base_url)
                response = session.request(**kwargs)
                examples[operation.label] += 1
                statuses[response.status_code] += 1
                # Plain dicts: the ignored_auth probe strips the token from them.
                headers = dict(kwargs["headers"])
                case.validate_response(
                    response,
                    checks=CHECKS,
                    headers=headers,
                    transport_kwargs={"base_url": base_url, "headers": headers, "timeout": 10},
                )

            return run

        for result in schema.get_all_operations():
            operation = result.ok()
            runner(operation, GenerationMode.POSITIVE)()
            try:
                runner(operation, GenerationMode.NEGATIVE)()
            except Unsatisfiable:
                # Nothing to make invalid (GET /health takes no input): no negative case.
                unsatisfiable.append(operation.label)
    return examples, statuses, unsatisfiable


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(server, db):
    known = await _seed(server.url)
    started = time.monotonic()
    examples, statuses, positive_only = await asyncio.to_thread(_fuzz, server.url, known)
    elapsed = time.monotonic() - started
    operations = sorted(examples)
    async with httpx.AsyncClient(base_url=server.url) as c:
        spec = (await c.get("/schema/openapi.json")).json()
    documented = {f"{m.upper()} {path}" for path, ops in spec["paths"].items() for m in ops}
    assert set(operations) == documented  # every operation in the spec was exercised
    # Every operation that takes input got a few hundred examples.
    assert all(examples[op] >= 150 for op in operations if op.split()[1] not in OPEN), examples
    assert not any(code >= 500 for code in statuses), statuses
    record_figure(
        "schemathesis",
        operations=len(operations),
        examples=sum(examples.values()),
        examples_per_operation=dict(examples),
        statuses={str(k): v for k, v in sorted(statuses.items())},
        without_negative_cases=positive_only,
        seconds=round(elapsed, 1),
        violations=0,
    )


# --------------------------------------------------------------------------- explicit cases


async def _user_agent_job(c: httpx.AsyncClient) -> tuple[str, str, dict[str, Any]]:
    user = await c.post("/api/users", json={"email": f"{uuid.uuid4().hex[:12]}@example.com"})
    agent = await c.post("/api/agents", json={"user_id": user.json()["id"], "name": "agent"})
    job = await c.post(
        "/api/jobs",
        json={"user_id": user.json()["id"], "agent_id": agent.json()["id"], "stripe_event_id": "e"},
    )
    assert job.status_code == 201, job.text
    return user.json()["id"], agent.json()["id"], job.json()


def assert_clear_4xx(response: httpx.Response, *codes: int) -> dict[str, Any]:
    """A 4xx among `codes`, with the JSON error body every error has."""
    request = response.request
    assert response.status_code in codes, (
        request.method,
        str(request.url)[:200],
        request.content[:200],
        response.status_code,
        response.text[:500],
    )
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status_code"] == response.status_code
    assert isinstance(body["detail"], str) and body["detail"]
    return dict(body)


def _signed(body: bytes) -> dict[str, str]:
    return {"X-Signature": sign(CALLBACK_SECRET, body), "Content-Type": "application/json"}


def _stripe_signed(body: bytes) -> dict[str, str]:
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), STRIPE_SECRET)
    return {"Stripe-Signature": header, "Content-Type": "application/json"}


@pytest.fixture
async def api(server, db) -> Any:
    async with httpx.AsyncClient(base_url=server.url, headers=API_HEADERS, timeout=30) as c:
        yield c


async def _chunks(raw: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    """The body in chunks: sent with Transfer-Encoding: chunked, no Content-Length."""
    for i in range(0, len(raw), size):
        yield raw[i : i + size]


async def test_oversized_bodies_are_413_documented_and_write_nothing(server, api, db):
    user_id, agent_id, job = await _user_agent_job(api)
    before = await table_counts(db)
    spec = (await api.get("/schema/openapi.json")).json()
    padding = "a" * (1024 * 1024)
    bodies = {
        "/api/users": {"email": f"{padding}@example.com"},
        "/api/agents": {"user_id": user_id, "name": padding},
        "/api/jobs": {"user_id": user_id, "agent_id": agent_id, "stripe_event_id": padding},
        f"/api/callbacks/jobs/{job['id']}/status": {
            "attempt": 1,
            "status": "failed",
            "error": padding,
        },
        f"/api/callbacks/jobs/{job['id']}/heartbeat": {"attempt": 1, "x": padding},
        "/webhooks/stripe": {"id": "evt_big", "type": "x", "data": {"object": {"p": padding}}},
    }
    templates = {
        f"/api/callbacks/jobs/{job['id']}/status": "/api/callbacks/jobs/{job_id}/status",
        f"/api/callbacks/jobs/{job['id']}/heartbeat": "/api/callbacks/jobs/{job_id}/heartbeat",
    }
    for path, payload in bodies.items():
        raw = json.dumps(payload).encode()
        assert len(raw) > 1024 * 1024
        headers = {"Content-Type": "application/json"}
        if "/callbacks/" in path:
            headers = _signed(raw)
        elif path == "/webhooks/stripe":
            headers = _stripe_signed(raw)
        # With a Content-Length, and streamed in chunks without one.
        sized = await api.post(path, content=raw, headers=headers)
        streamed = await api.post(path, content=_chunks(raw), headers=headers)
        for response in (sized, streamed):
            assert_clear_4xx(response, 413)
        documented = spec["paths"][templates.get(path, path)]["post"]["responses"]
        assert "413" in documented, f"413 not documented for POST {path}"
    assert await table_counts(db) == before
    # The server is fine afterwards.
    assert (await api.get(f"/api/jobs/{job['id']}")).json()["status"] == "queued"


async def test_deeply_nested_json_is_400_not_a_crash(server, api, db):
    _, _, job = await _user_agent_job(api)
    before = await table_counts(db)
    depth = 100_000
    arrays = b"[" * depth + b"]" * depth
    objects = b'{"a":' * depth + b"1" + b"}" * depth

    def event_of(inner: bytes) -> bytes:
        return (
            b'{"id":"evt_deep","type":"checkout.session.completed",'
            b'"data":{"object":{"metadata":' + inner + b"}}}"
        )

    for nested in (arrays, objects):
        assert len(nested) < 1024 * 1024
        requests_ = [
            api.post("/api/users", content=nested, headers={"Content-Type": "application/json"}),
            api.post("/api/jobs", content=nested, headers={"Content-Type": "application/json"}),
            api.post(
                f"/api/callbacks/jobs/{job['id']}/status", content=nested, headers=_signed(nested)
            ),
            api.post("/webhooks/stripe", content=nested, headers=_stripe_signed(nested)),
            # Nesting inside an otherwise well-formed, validly signed Stripe event.
            api.post(
                "/webhooks/stripe",
                content=event_of(nested),
                headers=_stripe_signed(event_of(nested)),
            ),
        ]
        for response in await asyncio.gather(*requests_):
            assert_clear_4xx(response, 400, 422)
    assert await table_counts(db) == before
    assert (await api.get("/health")).status_code == 200
    assert "Traceback" not in server.log_text()


async def test_unicode_is_kept_and_nul_bytes_are_refused(server, api, db):
    email = "ünïcödé.🦄@例え.jp"
    user = await api.post("/api/users", json={"email": email})
    assert user.status_code == 201, user.text
    assert user.json()["email"] == email
    name = "agent 🚀 ‮right-to-left‬ 名前 \u200b\ufeff"
    agent = await api.post("/api/agents", json={"user_id": user.json()["id"], "name": name})
    assert agent.status_code == 201, agent.text
    assert await db.fetchval("SELECT email FROM users") == email
    assert await db.fetchval("SELECT name FROM agents") == name
    event_id = "evt_🧾_ß_\u00e9"
    job = await api.post(
        "/api/jobs",
        json={
            "user_id": user.json()["id"],
            "agent_id": agent.json()["id"],
            "stripe_event_id": event_id,
        },
    )
    assert job.status_code == 201, job.text
    assert (await api.get(f"/api/jobs/{job.json()['id']}")).json()["stripe_event_id"] == event_id

    before = await table_counts(db)
    job_id = job.json()["id"]
    uid, aid = user.json()["id"], agent.json()["id"]
    refused = [
        await api.post("/api/users", json={"email": "nul\x00@example.com"}),
        await api.post("/api/agents", json={"user_id": uid, "name": "bad\x00name"}),
        await api.post(
            "/api/jobs", json={"user_id": uid, "agent_id": aid, "stripe_event_id": "evt\x00"}
        ),
        await api.post(
            "/api/jobs",
            json={"user_id": uid, "agent_id": aid, "stripe_event_id": "e2", "region": "us\x00"},
        ),
        await api.get("/api/jobs", params={"cursor": "abc\x00"}),
    ]
    for body in (
        {"attempt": 1, "status": "failed", "error": "boom\x00"},
        {"attempt": 1, "status": "provisioning", "workflow_run_id": "run\x00"},
        {"attempt": 1, "status": "failed", "failed_step": "\x00"},
    ):
        raw = json.dumps(body).encode()
        refused.append(
            await api.post(
                f"/api/callbacks/jobs/{job_id}/status", content=raw, headers=_signed(raw)
            )
        )
    # A validly signed Stripe event whose id or metadata holds a NUL, or whose id is huge.
    metadata = {"user_id": uid, "agent_id": aid}
    for event in (
        {"id": "evt_\x00", "type": "checkout.session.completed", "data": {"object": {}}},
        {
            "id": "evt_\x00",
            "type": "checkout.session.completed",
            "data": {"object": {"metadata": metadata}},
        },
        {
            "id": "evt_" + "x" * 100_000,
            "type": "checkout.session.completed",
            "data": {"object": {"metadata": metadata}},
        },
        {
            "id": "evt_nul_meta",
            "type": "checkout.session.completed",
            "data": {"object": {"metadata": {"user_id": uid, "agent_id": aid, "region": "\x00"}}},
        },
    ):
        raw = json.dumps(event).encode()
        refused.append(await api.post("/webhooks/stripe", content=raw, headers=_stripe_signed(raw)))
    # A raw NUL byte (not an escape) and invalid UTF-8 in the body.
    for raw in (b'{"email": "a\x00b@example.com"}', b'{"email": "\xff\xfe@example.com"}'):
        refused.append(
            await api.post("/api/users", content=raw, headers={"Content-Type": "application/json"})
        )
    for response in refused:
        assert_clear_4xx(response, 400, 422)
    assert await table_counts(db) == before
    assert (await api.get(f"/api/jobs/{job_id}")).json()["status"] == "queued"


async def test_sql_shaped_values_are_stored_literally(server, api, db):
    tables_before = await db.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
    )
    email = "x');DROP_TABLE_users;--@example.com"
    user = await api.post("/api/users", json={"email": email})
    assert user.status_code == 201, user.text
    name = "x'); DROP TABLE users;--"
    agent = await api.post("/api/agents", json={"user_id": user.json()["id"], "name": name})
    assert agent.status_code == 201, agent.text
    event_id = "evt' OR '1'='1'; DELETE FROM provisioning_jobs; --"
    job = await api.post(
        "/api/jobs",
        json={
            "user_id": user.json()["id"],
            "agent_id": agent.json()["id"],
            "stripe_event_id": event_id,
        },
    )
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    error = "'; UPDATE provisioning_jobs SET status = 'running'; --"
    for body in (
        {"attempt": 1, "status": "provisioning", "workflow_run_id": "1; SELECT pg_sleep(10)"},
        {"attempt": 1, "status": "failed", "error": error, "failed_step": "$1 $$ \\x00 %s"},
    ):
        raw = json.dumps(body).encode()
        r = await api.post(
            f"/api/callbacks/jobs/{job_id}/status", content=raw, headers=_signed(raw)
        )
        assert r.status_code == 200, r.text
    got = (await api.get(f"/api/jobs/{job_id}")).json()
    assert got["stripe_event_id"] == event_id
    assert got["workflow_run_id"] == "1; SELECT pg_sleep(10)"
    assert (got["status"], got["error"], got["failed_step"]) == ("failed", error, "$1 $$ \\x00 %s")
    assert await db.fetchval("SELECT name FROM agents") == name
    assert await db.fetchval("SELECT email FROM users") == email
    # Filters and cursors shaped like SQL are refused or match nothing; none runs.
    listed = await api.get("/api/jobs", params={"user_id": user.json()["id"]})
    assert [j["id"] for j in listed.json()["items"]] == [job_id]
    for params in (
        {"status": "failed' OR '1'='1"},
        {"user_id": "' OR 1=1 --"},
        {"cursor": "' UNION SELECT * FROM users --"},
        {"limit": "1; DROP TABLE users"},
    ):
        assert_clear_4xx(await api.get("/api/jobs", params=params), 400)
    tables_after = await db.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
    )
    assert tables_after == tables_before
    assert await table_counts(db) == {
        "users": 1,
        "agents": 1,
        "provisioning_jobs": 1,
        "job_events": 3,
    }


def _cursor(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def test_huge_limits_and_cursors_are_400(server, api, db):
    await _user_agent_job(api)
    before = await table_counts(db)
    bad: list[dict[str, str]] = [
        {"limit": "0"},
        {"limit": "-1"},
        {"limit": "201"},
        {"limit": str(10**30)},
        {"limit": "9" * 5000},
        {"limit": "1e3"},
        {"limit": "NaN"},
        {"cursor": "A" * 513},
        {"cursor": "A" * 8000},
        {"cursor": "not base64 !!"},
        {"cursor": _cursor(b"garbage")},
        {"cursor": _cursor(b'["2020-01-01T00:00:00Z", "not-a-uuid"]')},
        {"cursor": _cursor(b'["not-a-time", "00000000-0000-0000-0000-000000000000"]')},
        {"cursor": _cursor(b"[" * 300 + b"]" * 300)},
        {"cursor": _cursor(b'["99999-01-01T00:00:00Z", "00000000-0000-0000-0000-000000000000"]')},
        {"status": "queued" * 1000},
        {"user_id": "0" * 5000},
    ]
    for params in bad:
        response = await api.get("/api/jobs", params=params)
        assert_clear_4xx(response, 400)
    # A cursor far in the past or future that *is* well formed just pages to nothing.
    far = _cursor(b'["0001-01-01T00:00:00Z","00000000-0000-0000-0000-000000000000"]')
    ok = await api.get("/api/jobs", params={"cursor": far, "limit": "200"})
    assert ok.status_code == 200 and ok.json() == {"items": [], "next_cursor": None}
    assert await table_counts(db) == before
