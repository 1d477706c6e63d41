"""What every section gets: the bench database, the load budget, a seeding connection."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import asyncpg

from bench.measure import Budget


@dataclass
class Context:
    url: str
    """The bench database (the service layer's engine points at it)."""
    server_url: str
    """Any database on the same server, for CREATE/DROP DATABASE."""
    budget: Budget
    quick: bool
    scale_rows: int
    conn: asyncpg.Connection
    """A raw connection to the bench database for seeding and checks."""
    _serial: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def tag(self, prefix: str) -> str:
        """A tag no seeded row has used yet."""
        return f"{prefix}{next(self._serial)}"
