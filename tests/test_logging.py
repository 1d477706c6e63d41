"""Structured logs, read from a real `jobs-app serve` process.

Every line is one JSON object; a job's story (Stripe webhook → workflow callbacks →
running) can be pulled out by job_id alone; a proxy's X-Request-ID is echoed and on
every line of its request; the access line names the route, never the query string;
and no secret or signature appears anywhere in the output.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid

import httpx
import stripe

from jobs_app.core.logs import log_format
from jobs_app.core.settings import load_settings
from jobs_app.core.signing import sign
from jobs_app.http.middleware import request_id_from


def test_request_id_from_a_proxy_is_kept_only_when_it_is_a_safe_token():
    assert request_id_from([(b"x-request-id", b"req-1.2:3")]) == "req-1.2:3"
    for unsafe in (b"", b"a b", b'x"}', b"x\nforged", b"a" * 129, "é".encode()):
        generated = request_id_from([(b"x-request-id", unsafe)])
        assert generated != unsafe.decode(errors="replace")
        assert len(generated) == 32 and generated.isalnum()
    assert request_id_from([]) != request_id_from([])


def test_log_format_is_json_outside_dev_mode_and_can_be_overridden():
    assert log_format(load_settings({}), {}) == "json"
    assert log_format(load_settings({"JOBS_DEV_MODE": "1"}), {}) == "console"
    dev = load_settings({"JOBS_DEV_MODE": "1"})
    assert log_format(dev, {"JOBS_LOG_FORMAT": "json"}) == "json"
    assert log_format(load_settings({}), {"JOBS_LOG_FORMAT": "console"}) == "console"


def test_before_logging_is_configured_nothing_is_written_to_stdout():
    """A program whose stdout is data (a test's child process) imports jobs_app and logs
    before anything configured logging: the lines go to stderr, never stdout."""
    code = (
        "from jobs_app.services import jobs\n"
        "from jobs_app.core.logs import get_logger\n"
        "get_logger('jobs_app.child').warning('careful', job_id='j-1')\n"
        "print('data')\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert child.stdout == "data\n"
    assert "careful" in child.stderr and "job_id=j-1" in child.stderr


def _migrate(database: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobs_app.cli", "migrate"],
        env={**os.environ, "DATABASE_URL": database, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_logs_to_stderr_json_or_console_and_keeps_stdout_clean(database):
    """Piccolo's printed migration report becomes one log line; stdout stays empty."""
    as_json = _migrate(database, JOBS_LOG_FORMAT="json")
    assert as_json.returncode == 0, as_json.stderr
    assert as_json.stdout == ""
    records = [json.loads(line) for line in as_json.stderr.splitlines() if line.strip()]
    assert [r["event"] for r in records] == ["migrations applied"]
    assert {"timestamp", "level", "logger"} <= set(records[0])

    console = _migrate(database, JOBS_DEV_MODE="1")
    assert console.returncode == 0, console.stderr
    assert console.stdout == ""
    assert "[info     ] migrations applied" in console.stderr
    assert not console.stderr.lstrip().startswith("{")


async def test_a_jobs_story_request_ids_and_no_secrets(start_logged_server, db):
    api_token = f"tok-{secrets.token_urlsafe(24)}"
    callback_secret = f"cb-{secrets.token_urlsafe(24)}"
    stripe_secret = f"whsec_{secrets.token_urlsafe(24)}"
    stream_token = f"st-{secrets.token_urlsafe(24)}"
    server = await start_logged_server(
        1,
        "--access-log",
        JOBS_API_TOKEN=api_token,
        JOBS_CALLBACK_SECRET=callback_secret,
        STRIPE_WEBHOOK_SECRET=stripe_secret,
    )
    bearer = {"Authorization": f"Bearer {api_token}"}
    signatures: list[str] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        user = (await c.post("/api/users", headers=bearer, json={"email": "s@example.com"})).json()
        agent = (
            await c.post("/api/agents", headers=bearer, json={"user_id": user["id"], "name": "a"})
        ).json()
        # The webhook, with the proxy's request id.
        event = json.dumps(
            {
                "id": f"evt_{uuid.uuid4().hex}",
                "type": "checkout.session.completed",
                "data": {"object": {"metadata": {"user_id": user["id"], "agent_id": agent["id"]}}},
            }
        )
        stripe_signature = stripe.WebhookSignature.generate_signature_header(event, stripe_secret)
        signatures.append(stripe_signature.split("v1=")[1])
        hook = await c.post(
            "/webhooks/stripe",
            content=event,
            headers={"Stripe-Signature": stripe_signature, "X-Request-ID": "proxy-req-1"},
        )
        assert hook.status_code == 200, hook.text
        assert hook.headers["x-request-id"] == "proxy-req-1"
        job_id = hook.json()["job_id"]

        async def callback(kind: str, payload: dict[str, object], request_id: str) -> int:
            body = json.dumps(payload).encode()
            signature = sign(callback_secret, body)
            signatures.append(signature.split("v1=")[1])
            r = await c.post(
                f"/api/callbacks/jobs/{job_id}/{kind}",
                content=body,
                headers={"X-Signature": signature, "X-Request-ID": request_id},
            )
            assert r.headers["x-request-id"] == request_id
            return r.status_code

        started = {"attempt": 1, "status": "provisioning", "workflow_run_id": "run-4242"}
        assert await callback("status", started, "proxy-req-2") == 200
        assert await callback("heartbeat", {"attempt": 1}, "proxy-req-3") == 204
        assert await callback("status", {"attempt": 1, "status": "running"}, "proxy-req-4") == 200
        # Refused: an old attempt. Its lines still carry the job.
        assert await callback("heartbeat", {"attempt": 7}, "proxy-req-5") == 409
        # A query string that could hold a secret (stream tokens travel as ?token=), and
        # a request id a proxy should never have sent (replaced, not echoed).
        r = await c.get(
            f"/api/jobs?token={stream_token}", headers={**bearer, "X-Request-ID": "bad id {x}"}
        )
        assert r.status_code == 400
        assert r.headers["x-request-id"] != "bad id {x}"
        generated_id = r.headers["x-request-id"]
        # Unrouted: Litestar's middleware never sees these, the access line does.
        assert (await c.get(f"/no/such/route?token={stream_token}")).status_code == 404
    server.stop()  # SIGTERM: everything it logged is flushed and read

    records = server.json_lines()  # fails on any line that isn't one JSON object
    assert all({"timestamp", "level", "logger", "event"} <= set(r) for r in records)

    story = [r for r in records if r.get("job_id") == job_id]
    told = [r["event"] for r in story if r["logger"] != "jobs_app.access"]
    assert told == [
        "job enqueued",
        "status reported",
        "heartbeat",
        "status reported",
        "request refused",
    ], story
    assert [r["status"] for r in story if r["event"] == "status reported"] == [
        "provisioning",
        "running",
    ]
    assert all(r["attempt"] == (7 if r["request_id"] == "proxy-req-5" else 1) for r in story)
    for r in story:
        if r["request_id"] == "proxy-req-2":  # the run the workflow reported, on all its lines
            assert r["workflow_run_id"] == "run-4242"
    access = [r for r in story if r["logger"] == "jobs_app.access"]
    assert [(r["method"], r["route"], r["status"]) for r in access] == [
        ("POST", "/webhooks/stripe", 200),
        ("POST", "/api/callbacks/jobs/{job_id}/status", 200),
        ("POST", "/api/callbacks/jobs/{job_id}/heartbeat", 204),
        ("POST", "/api/callbacks/jobs/{job_id}/status", 200),
        ("POST", "/api/callbacks/jobs/{job_id}/heartbeat", 409),
    ]
    assert all(isinstance(r["duration_ms"], float) for r in access)

    # Every line logged while serving a request carries its id: the webhook's two.
    first = [r for r in records if r.get("request_id") == "proxy-req-1"]
    assert [r["event"] for r in first] == ["job enqueued", "POST /webhooks/stripe 200"]
    generated = [r for r in records if r.get("request_id") == generated_id]
    assert [r["event"] for r in generated] == ["request refused", "GET /api/jobs 400"], generated
    unmatched = [r for r in records if r.get("route") == "unmatched"]
    assert [(r["method"], r["status"]) for r in unmatched] == [("GET", 404)]

    text = server.log_text()
    for name, value in (
        ("JOBS_API_TOKEN", api_token),
        ("JOBS_CALLBACK_SECRET", callback_secret),
        ("STRIPE_WEBHOOK_SECRET", stripe_secret),
        ("stream token", stream_token),
    ):
        for needle in (value, value[-16:]):
            assert needle not in text, f"{name} appears in the server's output"
    for digest in signatures:
        assert digest not in text, "a signature appears in the server's output"
    # ... and not because the last-resort redaction caught it: nothing tried to log one.
    assert "[redacted]" not in text
    for word in ("Authorization", "X-Signature", "Stripe-Signature", "token="):
        assert word.lower() not in text.lower(), word
