"""The accounts service: the customers (users) and their agents.

Their invariants are the schema's: a unique email (case-insensitively found), an
agent that belongs to one user.
"""

from __future__ import annotations

from uuid import UUID

from jobs_app.core import errors
from jobs_app.core.models import Agent, User
from jobs_app.db.statement import Statement, fetchrow

CREATE_USER = Statement("INSERT INTO users (email) VALUES (:email) RETURNING id, email, created_at")
CREATE_AGENT = Statement(
    """INSERT INTO agents (user_id, name) VALUES (:user_id, :name)
       RETURNING id, user_id, name, created_at"""
)
USER_BY_EMAIL = Statement(
    "SELECT id, email, created_at FROM users WHERE lower(email) = lower(:email)"
)


async def create_user(email: str) -> User:
    """A new customer; DuplicateError when the email is taken."""
    row = await fetchrow(CREATE_USER, email=email)
    assert row is not None
    return User(*row)


async def create_agent(user_id: UUID, name: str) -> Agent:
    """A new agent of the user; NotFoundError for an unknown user."""
    row = await fetchrow(CREATE_AGENT, user_id=user_id, name=name)
    assert row is not None
    return Agent(*row)


async def find_user_by_email(email: str) -> User:
    """The user with this email, whatever its case; NotFoundError if none."""
    row = await fetchrow(USER_BY_EMAIL, email=email)
    if row is None:
        raise errors.NotFoundError("no user with this email")
    return User(*row)
