"""The operations measured, each twice: through `jobs_app.services.jobs`, and as the same SQL
text (the service layer's own compiled statements) with the same arguments, one call at
a time (the statements the service runs for a batch of one): the raw side never coalesces calls,
the service does (group commit), so under concurrency the ratio shows what batching buys.

An operation's inputs are dicts of the statement's named values. Single-use
operations (enqueue, claim, complete) consume theirs, so fresh rows are seeded for
every measurement; the others cycle over a fixed population.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from bench import seed
from bench.context import Context
from jobs_app.core.lifecycle import Actor, FailureReason, JobStatus
from jobs_app.services import jobs

Values = dict[str, Any]
Step = tuple[str, list[Any]]  # SQL text and its positional arguments


@dataclass(frozen=True)
class Operation:
    name: str
    single_use: bool
    service: Callable[[Values], Awaitable[object]]
    statements: tuple[Callable[[Values], Step], ...]
    """The raw side: what the service layer sends for these values, in order."""

    def raw_steps(self, values: Values) -> list[Step]:
        return [step(values) for step in self.statements]


def _step(statement: Any, **fixed: Any) -> Callable[[Values], Step]:
    def build(values: Values) -> Step:
        return statement.sql, statement.args(values | fixed)

    return build


_NO_FAILURE = {"error": None, "failed_step": None, "failure_reason": None}


async def raw_call(pool: asyncpg.Pool, steps: list[Step]) -> None:
    for sql, args in steps:
        await pool.fetchrow(sql, *args)


# --------------------------------------------------------------------------- the operations

_WORKFLOW_RUN = "wf-bench"


async def _enqueue(v: Values) -> object:
    return await jobs.enqueue_provisioning_job(
        agent_id=v["agent_id"], user_id=v["user_id"], stripe_event_id=v["stripe_event_id"]
    )


async def _claim(v: Values) -> object:
    return await jobs.update_job_status(
        v["job_id"], status=JobStatus.PROVISIONING, attempt=1, workflow_run_id=_WORKFLOW_RUN
    )


async def _heartbeat(v: Values) -> object:
    return await jobs.record_heartbeat(v["job_id"], attempt=1)


async def _complete(v: Values) -> object:
    return await jobs.update_job_status(v["job_id"], status=JobStatus.RUNNING, attempt=1)


async def _fail_retry(v: Values) -> object:
    await jobs.update_job_status(
        v["job_id"], status=JobStatus.FAILED, attempt=None, error="bench failure"
    )
    return await jobs.retry_job(v["job_id"])


async def _by_agent(v: Values) -> object:
    return await jobs.get_job_by_agent_id(v["agent_id"])


async def _by_stripe(v: Values) -> object:
    return await jobs.get_job_by_stripe_event_id(v["stripe_event_id"])


async def _get_job(v: Values) -> object:
    return await jobs.get_job(v["job_id"])


_T = jobs.TRANSITION

OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in [
        Operation(
            "enqueue",
            True,
            _enqueue,
            (_step(jobs.ENQUEUE, region="us-east", max_retries=3, actor=Actor.API),),
        ),
        Operation(
            "claim",
            True,
            _claim,
            (
                _step(
                    _T,
                    to_status=JobStatus.PROVISIONING,
                    workflow_run_id=_WORKFLOW_RUN,
                    attempt=1,
                    dispatch_id=None,
                    actor=Actor.WORKFLOW,
                    **_NO_FAILURE,
                ),
            ),
        ),
        Operation(
            "heartbeat",
            False,
            _heartbeat,
            (_step(jobs.HEARTBEAT, attempt=1, dispatch_id=None, workflow_run_id=None),),
        ),
        Operation(
            "complete",
            True,
            _complete,
            (
                _step(
                    _T,
                    to_status=JobStatus.RUNNING,
                    workflow_run_id=None,
                    attempt=1,
                    dispatch_id=None,
                    actor=Actor.WORKFLOW,
                    **_NO_FAILURE,
                ),
            ),
        ),
        Operation(
            "fail+retry",
            False,
            _fail_retry,
            (
                _step(
                    _T,
                    to_status=JobStatus.FAILED,
                    workflow_run_id=None,
                    attempt=None,
                    error="bench failure",
                    failed_step=None,
                    failure_reason=FailureReason.WORKFLOW_ERROR,
                    dispatch_id=None,
                    actor=Actor.WORKFLOW,
                ),
                _step(jobs.RETRY, grant_extra=False, actor=Actor.API, reason="retry"),
            ),
        ),
        Operation("get_job_by_agent_id", False, _by_agent, (_step(jobs.BY_AGENT),)),
        Operation("get_job_by_stripe_event_id", False, _by_stripe, (_step(jobs.BY_STRIPE_EVENT),)),
    ]
}


# --------------------------------------------------------------------------- inputs


class Inputs:
    """Seeds the rows the operations work on, in the bench database."""

    FIXED = 1024  # jobs the repeatable operations cycle over (16 tasks never collide)

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._fixed: dict[str, list[Values]] = {}

    async def setup(self) -> None:
        conn, n = self.ctx.conn, self.FIXED // 4 if self.ctx.quick else self.FIXED
        # Heartbeats: provisioning jobs, one user each.
        hb = self.ctx.tag("hb")
        await seed.users(conn, hb, 1, n)
        await seed.jobs(conn, hb, first=1, count=n, owners=n, first_owner=1, status="provisioning")
        # Fail + retry: queued jobs whose retry budget never runs out.
        fr = self.ctx.tag("fr")
        await seed.users(conn, fr, 1, n)
        await seed.jobs(
            conn,
            fr,
            first=1,
            count=n,
            owners=n,
            first_owner=1,
            status="queued",
            max_retries=2_000_000_000,
        )
        # Reads: a history of terminal jobs, ~10 per agent.
        rd = self.ctx.tag("rd")
        pop = await seed.population(conn, rd, total_jobs=10 * n, in_flight=0)
        await conn.execute("ANALYZE")
        self._fixed = {
            "heartbeat": [{"job_id": seed.job_id(hb, i)} for i in range(1, n + 1)],
            "fail+retry": [{"job_id": seed.job_id(fr, i)} for i in range(1, n + 1)],
            "get_job_by_agent_id": [
                {"agent_id": seed.agent_id(rd, i)} for i in range(1, pop.history_users + 1)
            ],
            "get_job_by_stripe_event_id": [
                {"stripe_event_id": seed.stripe_event_id(rd, i)}
                for i in range(1, pop.history_jobs + 1)
            ],
            "get_job": [{"job_id": seed.job_id(rd, i)} for i in range(1, pop.history_jobs + 1)],
        }

    def fixed(self, name: str) -> list[Values]:
        return self._fixed[name]

    async def single_use(self, name: str, count: int) -> list[Values]:
        """`count` fresh inputs for enqueue, claim or complete."""
        conn, tag = self.ctx.conn, self.ctx.tag(name[:3])
        await seed.users(conn, tag, 1, count)
        numbers = range(1, count + 1)
        if name == "enqueue":
            return [
                {
                    "user_id": seed.user_id(tag, i),
                    "agent_id": seed.agent_id(tag, i),
                    "stripe_event_id": f"evt_{tag}_new_{i}",
                }
                for i in numbers
            ]
        status = {"claim": "queued", "complete": "provisioning"}[name]
        await seed.jobs(conn, tag, first=1, count=count, owners=count, first_owner=1, status=status)
        return [{"job_id": seed.job_id(tag, i)} for i in numbers]
