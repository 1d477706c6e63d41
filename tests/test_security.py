"""Who gets in, against real `jobs-app serve` processes.

Every route in the OpenAPI spec but the open ones needs the bearer token; the admin
needs a session; tokens and signatures compare in constant time; secrets never reach
a log line, an error body or any other answer; signatures outside 300 s, or over
another body, are refused; request bodies are bounded.
"""

from __future__ import annotations

import ast
import inspect
import json
import secrets
import time
import uuid
from typing import Any

import asyncpg
import httpx
import stripe

from jobs_app.core import signing
from jobs_app.core.signing import sign
from jobs_app.http import auth
from tests.conftest import API_HEADERS, CALLBACK_SECRET, LoggedServer, record_figure

OPEN_PATHS = {"/health", "/metrics"}
"""Open to the monitoring system."""
SIGNED_PREFIXES = ("/api/callbacks/",)
"""Authenticated by X-Signature instead of the token."""
STRIPE_PATH = "/webhooks/stripe"
"""Authenticated by Stripe-Signature."""


def _needs_token(path: str) -> bool:
    return not (
        path in OPEN_PATHS
        or path.startswith("/schema")
        or path.startswith(SIGNED_PREFIXES)
        or path == STRIPE_PATH
    )


def _fill(path: str) -> str:
    """A concrete path: every {param} a random UUID."""
    parts = [str(uuid.uuid4()) if p.startswith("{") else p for p in path.split("/")]
    return "/".join(parts)


async def _counts(db: asyncpg.Connection) -> tuple[int, ...]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM agents),"
        " (SELECT count(*) FROM provisioning_jobs), (SELECT count(*) FROM job_events)"
    )
    assert row is not None
    return tuple(row)


def _assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, (response.request.url, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["status_code"] == 401


# --------------------------------------------------------------------------- bearer token


async def test_every_route_but_the_open_ones_needs_the_bearer_token(server, db):
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        spec = (await c.get("/schema/openapi.json")).json()
        token = API_HEADERS["Authorization"].removeprefix("Bearer ")
        wrong = [
            {},
            {"Authorization": ""},
            {"Authorization": "Bearer"},
            {"Authorization": f"Bearer {token[:-1]}{chr(ord(token[-1]) + 1)}"},  # last char
            {"Authorization": f"Bearer {token[:-1]}"},  # a prefix
            {"Authorization": f"Bearer {token}x"},  # an extension
            {"Authorization": f"Bearer {token.upper()}"},
            {"Authorization": f"Basic {token}"},
            {"Authorization": token},
            {"X-Api-Token": token},
            {"Cookie": f"token={token}"},
        ]
        guarded: list[str] = []
        before = await _counts(db)
        for path, operations in spec["paths"].items():
            if not _needs_token(path):
                continue
            for method, operation in operations.items():
                assert operation.get("security") == [{"bearer": []}], (method, path)
                guarded.append(f"{method.upper()} {path}")
                url = _fill(path)
                for headers in wrong:
                    body = {"email": "a@b.c", "user_id": str(uuid.uuid4()), "name": "n"}
                    r = await c.request(method, url, headers=headers, json=body)
                    _assert_401(r)
                    assert r.headers.get("www-authenticate") == "Bearer"
                    assert token not in r.text
                # ... and the right token gets past the guard (whatever the answer is).
                ok = await c.request(method, url, headers=API_HEADERS, json={})
                assert ok.status_code != 401, (method, path, ok.text)
        assert await _counts(db) == before
    # Every dashboard route of the contract is among them.
    assert {
        "POST /api/users",
        "POST /api/agents",
        "GET /api/agents/{agent_id}/job",
        "POST /api/jobs",
        "GET /api/jobs",
        "GET /api/jobs/{job_id}",
        "GET /api/jobs/{job_id}/events",
        "POST /api/jobs/{job_id}/retry",
    } <= set(guarded)
    record_figure("bearer_routes", routes=len(guarded), refusals=len(guarded) * len(wrong))


async def test_open_routes_are_exactly_the_documented_exceptions(server):
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        spec = (await c.get("/schema/openapi.json")).json()
        open_ = {p for p in spec["paths"] if not _needs_token(p)}
        assert open_ == {
            "/health",
            "/metrics",
            "/api/callbacks/jobs/{job_id}/status",
            "/api/callbacks/jobs/{job_id}/heartbeat",
            "/api/callbacks/jobs/{job_id}/steps",
            "/webhooks/stripe",
        }
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200
        # The signed routes do not open up for the bearer token instead of a signature.
        for path in sorted(p for p in open_ if p.startswith(SIGNED_PREFIXES)):
            _assert_401(await c.post(_fill(path), headers=API_HEADERS, json={"attempt": 1}))
        stripe_r = await c.post(STRIPE_PATH, headers=API_HEADERS, json={"id": "evt"})
        assert stripe_r.status_code == 400
        assert stripe_r.json()["detail"] == "invalid Stripe signature"


# --------------------------------------------------------------------------- admin


async def test_the_admin_needs_a_session(server, db):
    marker = f"admin-probe-{uuid.uuid4().hex[:12]}"
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        user = await c.post("/api/users", headers=API_HEADERS, json={"email": f"{marker}@x.io"})
        assert user.status_code == 201
        before = await _counts(db)
        answers: list[httpx.Response] = []
        # The JSON API behind the admin's pages, without a session; the API token and a
        # made-up session cookie are no session.
        for headers in ({}, API_HEADERS, {"Cookie": f"id={secrets.token_hex(16)}"}):
            for path in (
                "/admin/api/tables/",
                "/admin/api/tables/users/",
                "/admin/api/tables/provisioning_jobs/",
                "/admin/api/forms/",
                "/admin/api/user/",
                "/admin/api/meta/",
            ):
                r = await c.get(path, headers=headers)
                assert r.status_code in (401, 403), (path, headers, r.status_code, r.text[:200])
                answers.append(r)
        # Writes: refused by the CSRF check, and with a matching CSRF pair, by auth.
        csrf = secrets.token_hex(8)
        for headers in ({}, {"X-CSRFToken": csrf, "Cookie": f"csrftoken={csrf}"}):
            for method, path, body in (
                ("POST", "/admin/api/tables/users/", {"email": "evil@example.com"}),
                ("PATCH", f"/admin/api/tables/users/{user.json()['id']}/", {"email": "e@x.io"}),
                ("DELETE", f"/admin/api/tables/users/{user.json()['id']}/", None),
                ("POST", "/admin/api/forms/retry-job/", {"job_id": str(uuid.uuid4())}),
            ):
                r = await c.request(method, path, json=body, headers=headers)
                assert r.status_code in (401, 403), (method, path, r.status_code, r.text[:200])
                answers.append(r)
        # The page itself is the sign-in shell, with no data in it.
        answers.append(await c.get("/admin/", follow_redirects=True))
        assert answers[-1].status_code == 200
        for r in answers:
            assert marker not in r.text, r.request.url
    assert await _counts(db) == before
    assert await db.fetchval("SELECT email FROM users") == f"{marker}@x.io"


# --------------------------------------------------------------------------- constant time


def _compares_with_equality(function: Any, names: set[str]) -> list[str]:
    """`==`/`!=` comparisons in `function`'s source that involve one of `names`."""
    tree = ast.parse(inspect.getsource(function).lstrip())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(
            isinstance(op, ast.Eq | ast.NotEq) for op in node.ops
        ):
            used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            used |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            if used & names:
                found.append(ast.unparse(node))
    return found


def test_tokens_and_signatures_are_compared_in_constant_time():
    secret_names = {"token", "expected", "digest", "candidates", "c", "api_token", "secret"}
    for function in (auth.require_api_token, signing.verify):
        source = inspect.getsource(function)
        assert "hmac.compare_digest(" in source, function.__name__
        assert _compares_with_equality(function, secret_names) == [], function.__name__
    # Stripe's signatures are checked by the SDK, which compares with hmac.compare_digest.
    from stripe import _util, _webhook

    assert "secure_compare" in inspect.getsource(_webhook.WebhookSignature.verify_header)
    assert "hmac.compare_digest" in inspect.getsource(_util.secure_compare)


async def test_a_token_or_signature_off_by_its_last_character_is_refused(server, db):
    token = API_HEADERS["Authorization"].removeprefix("Bearer ")
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        user = await c.post("/api/users", headers=API_HEADERS, json={"email": "x@example.com"})
        assert user.status_code == 201
        for last in {chr(ord(token[-1]) + 1), chr(ord(token[-1]) - 1), "A", "0"} - {token[-1]}:
            r = await c.get("/api/jobs", headers={"Authorization": f"Bearer {token[:-1]}{last}"})
            _assert_401(r)
        # Same for the callback signature's digest.
        agent = await c.post(
            "/api/agents", headers=API_HEADERS, json={"user_id": user.json()["id"], "name": "a"}
        )
        job = await c.post(
            "/api/jobs",
            headers=API_HEADERS,
            json={
                "user_id": user.json()["id"],
                "agent_id": agent.json()["id"],
                "stripe_event_id": "e",
            },
        )
        body = json.dumps({"attempt": 1, "status": "provisioning"}).encode()
        good = sign(CALLBACK_SECRET, body)
        for last in "0123456789abcdef":
            if good.endswith(last):
                continue
            r = await c.post(
                f"/api/callbacks/jobs/{job.json()['id']}/status",
                content=body,
                headers={"X-Signature": good[:-1] + last, "Content-Type": "application/json"},
            )
            _assert_401(r)
        assert await db.fetchval("SELECT status FROM provisioning_jobs") == "queued"


# --------------------------------------------------------------------------- signatures


async def test_old_future_and_other_body_signatures_are_refused(server, db):
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        user = await c.post("/api/users", headers=API_HEADERS, json={"email": "s@example.com"})
        agent = await c.post(
            "/api/agents", headers=API_HEADERS, json={"user_id": user.json()["id"], "name": "a"}
        )
        job = await c.post(
            "/api/jobs",
            headers=API_HEADERS,
            json={
                "user_id": user.json()["id"],
                "agent_id": agent.json()["id"],
                "stripe_event_id": "e",
            },
        )
        job_id = job.json()["id"]
        url = f"/api/callbacks/jobs/{job_id}/status"
        body = json.dumps({"attempt": 1, "status": "provisioning"}).encode()
        other = json.dumps({"attempt": 1, "status": "failed", "error": "forged"}).encode()
        now = int(time.time())
        refused = {
            "301 s old": (body, sign(CALLBACK_SECRET, body, now - 301)),
            "an hour old": (body, sign(CALLBACK_SECRET, body, now - 3600)),
            # A future timestamp draws nearer while the request travels: 30 s of room
            # for a loaded machine here (the exact 301 s edge, either way, is checked
            # on a fixed clock by test_signature_tolerance_is_300_seconds_either_way).
            "331 s ahead": (body, sign(CALLBACK_SECRET, body, now + 331)),
            "over another body": (other, sign(CALLBACK_SECRET, body)),
            "old, over another body": (other, sign(CALLBACK_SECRET, body, now - 400)),
            "another secret": (body, sign("not-the-secret", body)),
            "timestamp swapped": (
                body,
                sign(CALLBACK_SECRET, body, now - 1).replace(f"t={now - 1}", f"t={now}"),
            ),
            "digest only": (body, "v1=" + sign(CALLBACK_SECRET, body).split("v1=")[1]),
            "empty": (body, ""),
        }
        for name, (sent, header) in refused.items():
            r = await c.post(
                url,
                content=sent,
                headers={"X-Signature": header, "Content-Type": "application/json"},
            )
            assert r.status_code == 401, (name, r.text)
            assert CALLBACK_SECRET not in r.text
        events = await db.fetchval("SELECT count(*) FROM job_events")
        assert (await db.fetchval("SELECT status FROM provisioning_jobs"), events) == ("queued", 1)
        # Within the window, either way, the same body goes through.
        r = await c.post(
            url,
            content=body,
            headers={
                "X-Signature": sign(CALLBACK_SECRET, body, now - 290),
                "Content-Type": "application/json",
            },
        )
        assert r.status_code == 200 and r.json()["status"] == "provisioning", r.text
        # Stripe: an event signed 301 s ago, or over another body, is refused (400).
        event = json.dumps({"id": "evt_1", "type": "invoice.paid", "data": {"object": {}}})
        old = stripe.WebhookSignature._compute_signature(
            f"{now - 301}.{event}", "whsec_test_secret"
        )
        for payload, header in (
            (event, f"t={now - 301},v1={old}"),
            (
                event.replace("evt_1", "evt_2"),
                stripe.WebhookSignature.generate_signature_header(event, "whsec_test_secret"),
            ),
        ):
            r = await c.post(
                STRIPE_PATH,
                content=payload,
                headers={"Stripe-Signature": header, "Content-Type": "application/json"},
            )
            assert r.status_code == 400 and r.json()["detail"] == "invalid Stripe signature"


# --------------------------------------------------------------------------- body size


async def test_request_bodies_have_a_size_limit(server, db):
    big = b'{"email": "' + b"a" * (1024 * 1024) + b'@example.com"}'
    before = await _counts(db)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        r = await c.post(
            "/api/users", content=big, headers={**API_HEADERS, "Content-Type": "application/json"}
        )
        assert r.status_code == 413 and r.json()["status_code"] == 413
        # Without the token it is refused before the body is read.
        _assert_401(await c.post("/api/users", content=big))
        # A signed route reads the body to check the signature: the limit comes first.
        url = f"/api/callbacks/jobs/{uuid.uuid4()}/heartbeat"
        r = await c.post(url, content=big, headers={"X-Signature": sign(CALLBACK_SECRET, big)})
        assert r.status_code == 413
        # Just under the limit is read (and refused for what it says).
        fits = b'{"email": "' + b"a" * (1024 * 1024 - 40) + b'@example.com"}'
        r = await c.post(
            "/api/users", content=fits, headers={**API_HEADERS, "Content-Type": "application/json"}
        )
        assert r.status_code == 400, r.text[:200]
    assert await _counts(db) == before


# --------------------------------------------------------------------------- secrets


async def test_secrets_never_reach_logs_or_answers(start_logged_server, db):
    api_token = f"tok-{secrets.token_urlsafe(24)}"
    callback_secret = f"cb-{secrets.token_urlsafe(24)}"
    stripe_secret = f"whsec_{secrets.token_urlsafe(24)}"
    server = await start_logged_server(
        1,
        "--access-log",
        JOBS_API_TOKEN=api_token,
        JOBS_CALLBACK_SECRET=callback_secret,
        STRIPE_WEBHOOK_SECRET=stripe_secret,
    )
    answers: list[httpx.Response] = []
    good = {"Authorization": f"Bearer {api_token}"}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        # Failing auth of every kind, including near misses.
        for token in ("wrong", api_token[:-1], api_token + "x", api_token.upper()):
            for path in ("/api/jobs", f"/api/jobs/{uuid.uuid4()}", "/api/users"):
                answers.append(await c.get(path, headers={"Authorization": f"Bearer {token}"}))
        # Forged, expired and other-body signatures on the callbacks.
        user = await c.post("/api/users", headers=good, json={"email": "sec@example.com"})
        agent = await c.post(
            "/api/agents", headers=good, json={"user_id": user.json()["id"], "name": "a"}
        )
        job = await c.post(
            "/api/jobs",
            headers=good,
            json={
                "user_id": user.json()["id"],
                "agent_id": agent.json()["id"],
                "stripe_event_id": "e",
            },
        )
        answers += [user, agent, job]
        body = json.dumps({"attempt": 1, "status": "running"}).encode()
        url = f"/api/callbacks/jobs/{job.json()['id']}/status"
        for header in (
            sign("wrong", body),
            sign(callback_secret, body, int(time.time()) - 1000),
            sign(callback_secret, b"{}"),
            "garbage",
        ):
            answers.append(await c.post(url, content=body, headers={"X-Signature": header}))
        # A valid callback that is refused for what it asks (running from queued).
        answers.append(
            await c.post(url, content=body, headers={"X-Signature": sign(callback_secret, body)})
        )
        # Stripe: wrong secret, no header, and a valid event naming unknown things (422, logged).
        event = json.dumps(
            {
                "id": "evt_x",
                "type": "checkout.session.completed",
                "data": {"object": {"metadata": {}}},
            }
        )
        for header in (
            stripe.WebhookSignature.generate_signature_header(event, "whsec_wrong"),
            "",
            stripe.WebhookSignature.generate_signature_header(event, stripe_secret),
        ):
            answers.append(
                await c.post(STRIPE_PATH, content=event, headers={"Stripe-Signature": header})
            )
        # Bad input and the open routes.
        answers.append(await c.post("/api/users", headers=good, content=b"{not json"))
        answers += [
            await c.get("/health"),
            await c.get("/metrics"),
            await c.get("/schema/openapi.json"),
        ]
        answers.append(await c.get("/admin/api/tables/"))
    statuses = sorted({a.status_code for a in answers})
    assert {200, 201, 400, 401, 409, 422} <= set(statuses), statuses
    server.stop()
    log = server.log_text()
    assert "GET /api/jobs" in log  # the access log was on: the requests are in it
    assert "refused" in log  # the 422 Stripe event was logged at error level
    for name, value in (
        ("JOBS_API_TOKEN", api_token),
        ("JOBS_CALLBACK_SECRET", callback_secret),
        ("STRIPE_WEBHOOK_SECRET", stripe_secret),
    ):
        # Neither whole nor a telling piece of it (16 characters of the random part).
        for needle in (value, value[-16:]):
            assert needle not in log, f"{name} appears in the server's output"
            for answer in answers:
                assert needle not in answer.text, f"{name} in {answer.request.url}"
                assert needle not in str(answer.headers), f"{name} in headers"
    record_figure("secrets", requests=len(answers), log_lines=len(server.log_lines), leaks=0)


async def test_dev_mode_is_the_only_place_secrets_are_printed(database):
    """The contrast that makes the test above meaningful: dev mode prints what it
    generates (and only what it generates), so the log check would catch a leak."""
    env = {"JOBS_DEV_MODE": "1", "JOBS_API_TOKEN": "", "JOBS_CALLBACK_SECRET": "kept-secret"}
    server = LoggedServer(database, 1, **env)
    try:
        await server.wait_ready()
    finally:
        server.stop()
    log = server.log_text()
    assert "generated JOBS_API_TOKEN=" in log
    assert "kept-secret" not in log
