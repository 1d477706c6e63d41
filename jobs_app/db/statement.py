"""How the service-layer modules talk to PostgreSQL: statements written with
:named parameters, run in one round trip on the current transaction's or a pooled
connection, with constraint violations turned into the domain errors they stand for.

The services (jobs_app.services) hold the statements themselves, built from the shared
blocks of `fragments.py`.
"""

from __future__ import annotations

import re
from typing import Any

import asyncpg

from jobs_app.core import errors
from jobs_app.core.lifecycle import CONCURRENT_PROVISION_MESSAGE
from jobs_app.db.connector import connection


class Statement:
    """SQL written with :named parameters, compiled once to asyncpg's $n form."""

    _PARAM = re.compile(r"(?<![:\w]):([a-z_]+)\b")

    def __init__(self, template: str) -> None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        self.sql = self._PARAM.sub(number, template)
        self.names = tuple(names)

    def args(self, values: dict[str, Any]) -> list[Any]:
        return [values[name] for name in self.names]


async def fetchrow(statement: Statement, **values: Any) -> asyncpg.Record | None:
    async with connection() as conn:
        try:
            return await conn.fetchrow(statement.sql, *statement.args(values))
        except asyncpg.PostgresError as exc:
            raise domain_error(exc) from exc


async def fetch(statement: Statement, **values: Any) -> list[asyncpg.Record]:
    async with connection() as conn:
        try:
            return await conn.fetch(statement.sql, *statement.args(values))
        except asyncpg.PostgresError as exc:
            raise domain_error(exc) from exc


CONSTRAINT_ERRORS: dict[str, tuple[type[errors.DomainError], str]] = {
    "provisioning_jobs_one_active_per_user": (
        errors.ConcurrentProvisionError,
        CONCURRENT_PROVISION_MESSAGE,
    ),
    "provisioning_jobs_user_id_fkey": (errors.NotFoundError, "user not found"),
    "provisioning_jobs_agent_id_fkey": (errors.NotFoundError, "agent not found"),
    "provisioning_jobs_agent_owner_fkey": (
        errors.InvalidReferenceError,
        "agent does not belong to this user",
    ),
    "agents_user_id_fkey": (errors.NotFoundError, "user not found"),
    "users_email_key": (errors.DuplicateError, "a user with this email already exists"),
    "job_events_actor_check": (
        errors.BadRequestError,
        "actor must be system, workflow, api or operator:<name>",
    ),
    "provisioning_jobs_retry_count_check": (
        errors.RetriesExhaustedError,
        "retries exhausted",
    ),
}


def domain_error(exc: asyncpg.PostgresError) -> Exception:
    """Turn a constraint violation into the domain error it stands for."""
    constraint = getattr(exc, "constraint_name", None)
    if constraint in CONSTRAINT_ERRORS:
        cls, message = CONSTRAINT_ERRORS[constraint]
        return cls(message)
    return exc
