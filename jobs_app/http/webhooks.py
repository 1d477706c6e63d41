"""Stripe: a paid checkout enqueues the provisioning job for its event, once."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import msgspec
import stripe
from litestar import Request, post
from litestar.exceptions import HTTPException
from litestar.status_codes import HTTP_200_OK

from jobs_app.core import errors, metrics
from jobs_app.core.lifecycle import Actor
from jobs_app.core.logs import bind_job, get_logger
from jobs_app.http.auth import settings_of
from jobs_app.http.errors import error_responses
from jobs_app.http.schemas import Region, StripeEventId, WebhookResult
from jobs_app.services import jobs

log = get_logger("jobs_app.webhooks")

CHECKOUT_COMPLETED = "checkout.session.completed"


class _EventData(msgspec.Struct):
    object: dict[str, Any]


class _StripeEvent(msgspec.Struct):
    """The fields we read of a verified event; everything else is ignored. The id is
    bounded and NUL-free like the API's stripe_event_id: it becomes that column."""

    id: StripeEventId
    type: str
    data: _EventData


class _Metadata(msgspec.Struct):
    user_id: UUID
    agent_id: UUID
    region: Region = "us-east"


def _reject(reason: str, detail: str, event_id: str) -> errors.InvalidReferenceError:
    """A validly signed event we cannot act on: 422, logged and counted, so it stays
    visible as a failing delivery in Stripe's dashboard."""
    log.error("stripe event refused", stripe_event_id=event_id, reason=reason, detail=detail)
    metrics.WEBHOOK_REJECTED.labels(reason).inc()
    return errors.InvalidReferenceError(detail, event_id=event_id)


@post(
    "/webhooks/stripe",
    status_code=HTTP_200_OK,
    tags=["stripe"],
    responses=error_responses(400, 409, 413, 422),
)
async def stripe_webhook(request: Request[Any, Any, Any]) -> WebhookResult:
    """Verify with the Stripe SDK; `checkout.session.completed` enqueues a job.

    A replay is 200 with the same job; a user with a job in flight gets 409 so that
    Stripe retries later; other event types are acknowledged and ignored.
    """
    payload = await request.body()
    secret = settings_of(request).stripe_webhook_secret
    try:
        stripe.WebhookSignature.verify_header(
            payload.decode("utf-8"),
            request.headers.get("stripe-signature", ""),
            secret,
            tolerance=settings_of(request).signature_tolerance_seconds,
        )
        event = msgspec.json.decode(payload, type=_StripeEvent)
    except (stripe.SignatureVerificationError, UnicodeDecodeError):
        raise HTTPException("invalid Stripe signature", status_code=400) from None
    except msgspec.DecodeError as exc:
        raise HTTPException(f"invalid Stripe event: {exc}", status_code=400) from None
    except RecursionError:
        raise HTTPException("invalid Stripe event: nested too deeply", status_code=400) from None

    if event.type != CHECKOUT_COMPLETED:
        log.info("stripe event ignored", stripe_event_id=event.id, type=event.type)
        return WebhookResult(received=True, ignored=True)
    try:
        meta = msgspec.convert(event.data.object.get("metadata") or {}, type=_Metadata)
    except msgspec.ValidationError as exc:
        raise _reject("bad_metadata", f"checkout session metadata: {exc}", event.id) from None
    try:
        result = await jobs.enqueue_provisioning_job(
            agent_id=meta.agent_id,
            user_id=meta.user_id,
            stripe_event_id=event.id,
            region=meta.region,
            actor=Actor.API,
        )
    except (errors.NotFoundError, errors.InvalidReferenceError) as exc:
        raise _reject("unknown_reference", exc.message, event.id) from None
    bind_job(result.job.id, result.job.attempt, stripe_event_id=event.id)
    log.info("job enqueued" if result.created else "job enqueue replayed", status=result.job.status)
    return WebhookResult(received=True, job_id=result.job.id, created=result.created)
