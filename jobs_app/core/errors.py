"""Typed domain errors. The service layer raises them; `http/app.py` maps them
to status codes in one place, and the admin forms show their messages."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base class: `message` is safe to show to the caller, `extra` is detail for the body."""

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class BadRequestError(DomainError):
    """A value the caller sent can't be used (a cursor this service never issued)."""


class NotFoundError(DomainError):
    """The named user, agent or job does not exist."""


class ConflictError(DomainError):
    """The request contradicts the current state; retrying the same request won't help."""


class ConcurrentProvisionError(ConflictError):
    """The user already has a job queued or provisioning."""


class IdempotencyConflictError(ConflictError):
    """A Stripe event id was already used for another user or agent."""


class DuplicateError(ConflictError):
    """A unique value (such as an email) is taken."""


class InvalidTransitionError(ConflictError):
    """The state machine does not allow this move from the job's current status."""


class RetriesExhaustedError(InvalidTransitionError):
    """The job used all its retries; an operator may grant one more."""


class StaleAttemptError(ConflictError):
    """A callback names another attempt than the job's current one."""


class SupersededDispatchError(ConflictError):
    """A callback comes from a dispatch that is not (or can no longer be) the one its
    attempt is bound to: another run of the same attempt moves the job."""


class InvalidReferenceError(DomainError):
    """The request names things that exist but do not belong together (an agent of another user)."""


class DatabaseUnavailableError(DomainError):
    """PostgreSQL could not be reached, or did not answer in time."""
