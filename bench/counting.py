"""An asyncpg connection that counts what it sends to PostgreSQL.

Every exchange with the server that waits for an answer is one round trip:
  * executes: a Bind/Execute/Sync of a prepared statement (fetch, fetchrow,
    execute with arguments, executemany batches);
  * prepares: a Parse/Describe/Sync, when a statement is not in the connection's
    statement cache yet (or is never cached);
  * simple queries: `execute()` without arguments (BEGIN, ROLLBACK, a reset).

The hooks are asyncpg's own: `_get_statement` (every statement passes through it
and comes back cached or freshly prepared), `_do_execute` (it calls the executor
that sends the Bind/Execute) and `execute` (its argument-less path sends a simple
query). `jobs_app.db.connector.start_pool(connection_class=CountingConnection)` puts
it under the service layer's pool.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg


@dataclass
class Tally:
    executes: int = 0
    prepares: int = 0
    simple_queries: int = 0
    exchanges: int = 0
    """psycopg's round trips (it does not tell executes from prepares here)."""
    statements: list[str] = field(default_factory=list)

    @property
    def round_trips(self) -> int:
        return self.executes + self.prepares + self.simple_queries + self.exchanges


_tally: contextvars.ContextVar[Tally | None] = contextvars.ContextVar("bench_tally", default=None)


def start_tally() -> Tally:
    """Count what this task (and tasks it starts) sends from now on."""
    tally = Tally()
    _tally.set(tally)
    return tally


def stop_tally() -> None:
    _tally.set(None)


def _first_words(sql: str) -> str:
    return " ".join(sql.split()[:4])


class CountingConnection(asyncpg.Connection):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bench_prepared: set[str] = set()

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109
        tally = _tally.get()
        if tally is not None and not args:
            tally.simple_queries += 1
            tally.statements.append(_first_words(query))
        return await super().execute(query, *args, timeout=timeout)

    async def _get_statement(
        self,
        query: str,
        timeout: float | None,  # noqa: ASYNC109 - asyncpg's signature
        **kwargs: Any,
    ) -> Any:
        statement = await super()._get_statement(query, timeout, **kwargs)
        tally = _tally.get()
        # A cached statement comes back with a name seen before; a new one was just
        # prepared (an unnamed one always is).
        if statement.name == "" or statement.name not in self._bench_prepared:
            self._bench_prepared.add(statement.name)
            if tally is not None:
                tally.prepares += 1
        return statement

    async def _do_execute(
        self,
        query: str,
        executor: Callable[[Any, float | None], Awaitable[Any]],
        timeout: float | None,  # noqa: ASYNC109 - asyncpg's signature
        retry: bool = True,
        **kwargs: Any,
    ) -> Any:
        def counted(statement: Any, timeout: float | None) -> Awaitable[Any]:
            tally = _tally.get()
            if tally is not None:
                tally.executes += 1
                tally.statements.append(_first_words(query))
            return executor(statement, timeout)

        return await super()._do_execute(query, counted, timeout, retry, **kwargs)


def count_psycopg() -> bool:
    """Count psycopg's round trips into the current tally from now on, process-wide.

    psycopg sends every statement, BEGIN and COMMIT and then waits on one generator,
    `execute(pgconn)`, which cursors import by name and connections look up on
    `psycopg.generators`; both names are replaced by a counting wrapper. False when
    this psycopg is laid out otherwise (nothing is patched then: "not counted").
    """
    try:
        import psycopg._cursor_base as cursor_base
        import psycopg.generators as generators
    except ImportError:
        return False
    original = getattr(generators, "execute", None)
    if original is None or getattr(cursor_base, "execute", None) is not original:
        return False

    def execute(pgconn: Any) -> Any:
        tally = _tally.get()
        if tally is not None:
            tally.exchanges += 1
        return (yield from original(pgconn))

    generators.execute = execute
    cursor_base.execute = execute
    return True
