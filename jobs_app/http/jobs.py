"""Dashboard and internal routes: users, agents, jobs, retries, history."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from litestar import Controller, Request, Response, get, post
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from jobs_app.core.errors import BadRequestError, NotFoundError
from jobs_app.core.lifecycle import Actor, JobStatus
from jobs_app.core.logs import bind_job, get_logger
from jobs_app.http.auth import require_api_token
from jobs_app.http.errors import error_responses
from jobs_app.http.schemas import (
    Agent,
    CreateAgent,
    CreateJob,
    CreateUser,
    DispatchList,
    EventList,
    Job,
    JobPage,
    User,
)
from jobs_app.services import accounts, dispatches, jobs

log = get_logger("jobs_app.jobs")


def _log_enqueued(job: Job, created: bool) -> None:
    """The first line of a job's story (or a replay of it), with its fields bound."""
    bind_job(job.id, job.attempt, stripe_event_id=job.stripe_event_id)
    log.info("job enqueued" if created else "job enqueue replayed", status=job.status)


class _DashboardController(Controller):
    """Routes the dashboard calls: all need `Authorization: Bearer $JOBS_API_TOKEN`."""

    guards = [require_api_token]  # noqa: RUF012
    security = [{"bearer": []}]  # noqa: RUF012


class UserController(_DashboardController):
    path = "/api/users"
    tags = ["users"]  # noqa: RUF012

    @post(responses=error_responses(401, 409, 413))
    async def create_user(self, data: JSONBody[CreateUser]) -> User:
        """Create a customer account (email is unique)."""
        return await accounts.create_user(data.email)


class AgentController(_DashboardController):
    path = "/api/agents"
    tags = ["agents"]  # noqa: RUF012

    @post(responses=error_responses(401, 404, 413))
    async def create_agent(self, data: JSONBody[CreateAgent]) -> Agent:
        """Create an agent for a user."""
        return await accounts.create_agent(data.user_id, data.name)

    @get("/{agent_id:uuid}/job", responses=error_responses(401, 404))
    async def agent_job(self, agent_id: FromPath[UUID]) -> Job:
        """The agent's newest job."""
        job = await jobs.get_job_by_agent_id(agent_id)
        if job is None:
            raise NotFoundError("this agent has no job", agent_id=str(agent_id))
        [job] = await jobs.with_progress([job])
        return job


_LIST_PARAMETERS = frozenset({"user_id", "agent_id", "status", "limit", "cursor"})


class JobController(_DashboardController):
    path = "/api/jobs"
    tags = ["jobs"]  # noqa: RUF012

    @post(
        status_code=HTTP_201_CREATED,
        responses={
            HTTP_200_OK: ResponseSpec(Job, description="Replay: the job this event created"),
            **error_responses(401, 404, 409, 413, 422),
        },
    )
    async def create_job(self, data: JSONBody[CreateJob]) -> Response[Job]:
        """Enqueue a provisioning job, once per Stripe event id.

        201 when created; 200 with the same job when the event was seen before;
        409 when the user already has a job in flight.
        """
        result = await jobs.enqueue_provisioning_job(
            agent_id=data.agent_id,
            user_id=data.user_id,
            stripe_event_id=data.stripe_event_id,
            region=data.region,
            actor=Actor.API,
        )
        _log_enqueued(result.job, result.created)
        return Response(result.job, status_code=HTTP_201_CREATED if result.created else HTTP_200_OK)

    @get(responses=error_responses(400, 401))
    async def list_jobs(
        self,
        request: Request[Any, Any, Any],
        user_id: FromQuery[UUID | None] = None,
        agent_id: FromQuery[UUID | None] = None,
        status: FromQuery[JobStatus | None] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, QueryParameter(max_length=512)] = None,
    ) -> JobPage:
        """Jobs newest first, keyset-paged: pass `next_cursor` back as `cursor`.

        Unknown query parameters are refused: a misspelt filter would otherwise list
        every job.
        """
        unknown = sorted(set(request.query_params) - _LIST_PARAMETERS)
        if unknown:
            raise BadRequestError("unknown query parameters", unknown=unknown)
        page = await jobs.list_jobs(
            user_id=user_id, agent_id=agent_id, status=status, limit=limit, cursor=cursor
        )
        return JobPage(items=await jobs.with_progress(page.items), next_cursor=page.next_cursor)

    @get("/{job_id:uuid}", responses=error_responses(401, 404))
    async def get_job(self, job_id: FromPath[UUID]) -> Job:
        """The job, after an on-demand timeout check (a stale job comes back failed)."""
        return await jobs.get_job(job_id)

    @get("/{job_id:uuid}/events", responses=error_responses(401, 404))
    async def job_events(self, job_id: FromPath[UUID]) -> EventList:
        """The job's history, oldest first."""
        return EventList(items=await jobs.list_job_events(job_id))

    @get("/{job_id:uuid}/dispatches", responses=error_responses(401, 404))
    async def job_dispatches(self, job_id: FromPath[UUID]) -> DispatchList:
        """The job's workflow dispatches, oldest first: each try, GitHub's answer, the run."""
        items = await dispatches.list_dispatches(job_id)
        if items is None:
            raise NotFoundError("job not found", job_id=str(job_id))
        return DispatchList(items=items)

    @post("/{job_id:uuid}/retry", status_code=HTTP_200_OK, responses=error_responses(401, 404, 409))
    async def retry_job(self, job_id: FromPath[UUID]) -> Job:
        """Re-queue a failed job as its next attempt (409 if not failed, retries
        exhausted, or the user has another job in flight)."""
        job = await jobs.retry_job(job_id, actor=Actor.API)
        bind_job(job.id, job.attempt)
        log.info("job retried", status=job.status)
        return job
