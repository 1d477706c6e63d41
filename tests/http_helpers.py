"""Helpers for driving the HTTP API in tests: signed callbacks and Stripe events."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import stripe

from jobs_app.core.signing import sign
from tests.conftest import API_HEADERS, CALLBACK_SECRET, STRIPE_SECRET


def signed_headers(
    body: bytes, *, secret: str = CALLBACK_SECRET, t: int | None = None
) -> dict[str, str]:
    return {"X-Signature": sign(secret, body, t), "Content-Type": "application/json"}


async def callback(
    client: httpx.AsyncClient, job_id: Any, kind: str, payload: dict[str, Any]
) -> httpx.Response:
    body = json.dumps(payload).encode()
    return await client.post(
        f"/api/callbacks/jobs/{job_id}/{kind}", content=body, headers=signed_headers(body)
    )


def stripe_event(
    user_id: Any = None,
    agent_id: Any = None,
    *,
    event_id: str | None = None,
    type_: str = "checkout.session.completed",
    metadata: dict[str, Any] | None = None,
) -> bytes:
    if metadata is None:
        metadata = {"user_id": str(user_id), "agent_id": str(agent_id)}
    event = {
        "id": event_id or f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "type": type_,
        "data": {"object": {"id": "cs_test_1", "object": "checkout.session", "metadata": metadata}},
    }
    return json.dumps(event).encode()


def stripe_headers(payload: bytes, *, secret: str = STRIPE_SECRET) -> dict[str, str]:
    """A real Stripe-Signature header, computed the way Stripe does."""
    header = stripe.WebhookSignature.generate_signature_header(payload.decode(), secret)
    return {"Stripe-Signature": header, "Content-Type": "application/json"}


async def make_user_agent(client: httpx.AsyncClient) -> tuple[str, str]:
    user = await client.post(
        "/api/users", json={"email": f"u-{uuid.uuid4().hex[:10]}@example.com"}, headers=API_HEADERS
    )
    assert user.status_code == 201, user.text
    agent = await client.post(
        "/api/agents", json={"user_id": user.json()["id"], "name": "agent"}, headers=API_HEADERS
    )
    assert agent.status_code == 201, agent.text
    return user.json()["id"], agent.json()["id"]


async def make_job(client: httpx.AsyncClient, event_id: str | None = None) -> dict[str, Any]:
    user_id, agent_id = await make_user_agent(client)
    r = await client.post(
        "/api/jobs",
        json={
            "user_id": user_id,
            "agent_id": agent_id,
            "stripe_event_id": event_id or f"evt_{uuid.uuid4().hex}",
        },
        headers=API_HEADERS,
    )
    assert r.status_code == 201, r.text
    return dict(r.json())
