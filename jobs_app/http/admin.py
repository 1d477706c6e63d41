"""The Piccolo admin for support staff, mounted at /admin/ in the Litestar app.

Operators log in with Piccolo's own session auth (the `piccolo_user` and
`sessions` tables); every page's data and every admin API call needs a session,
and unsafe requests need piccolo_admin's CSRF token.

The admin is no way around the state machine or the audit trail: jobs and job
events are read-only in the generic table views (their add, edit and delete
endpoints are refused by PiccoloCRUD validators, whatever the client sends), and
users and agents that have jobs can't be deleted (that would cascade to their
history). Every change to a job goes through the operator forms below, which call
the service layer (`jobs_app.services.jobs`) and so write a `job_events` row with actor
`operator:<username>` and the operator's reason in the same statement.
"""

from __future__ import annotations

from typing import Any, NoReturn
from uuid import UUID

from litestar import asgi
from litestar.handlers import ASGIRouteHandler
from litestar.response.redirect import ASGIRedirectResponse
from litestar.types import Receive, Scope, Send
from piccolo.apps.user.tables import BaseUser
from piccolo_admin.endpoints import FormConfig, TableConfig, create_admin
from piccolo_api.crud.endpoints import OrderBy, PiccoloCRUD
from piccolo_api.crud.validators import Validators
from piccolo_api.media.base import MediaStorage
from piccolo_api.session_auth.tables import SessionsBase
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.requests import Request

from jobs_app.core.errors import DomainError, RetriesExhaustedError
from jobs_app.core.lifecycle import Actor, FailureReason, JobStatus
from jobs_app.core.models import Job
from jobs_app.core.settings import Settings
from jobs_app.db.tables import (
    Agent,
    Dispatch,
    DispatchTry,
    JobEvent,
    ProvisioningJob,
    RunCancellation,
    User,
)
from jobs_app.services import accounts, jobs

ADMIN_PATH = "/admin"
SITE_NAME = "jobs_app admin"
FIND_JOBS_LIMIT = 50
"""How many of a user's jobs (newest first) the "find jobs" form lists."""

# --------------------------------------------------------------------------- generic views


def _refuse(message: str) -> Any:
    def validator(piccolo_crud: PiccoloCRUD, request: Request) -> NoReturn:
        # 405 with a `detail`: the piccolo_admin UI shows the detail as the error.
        raise HTTPException(status_code=405, detail=message)

    return validator


_JOBS_READ_ONLY = _refuse(
    "Provisioning jobs are read-only here: they change only through the state machine. "
    "Use the Retry job or Fail job form, which records who did it and why."
)
_EVENTS_READ_ONLY = _refuse(
    "Job events are the audit trail: they can't be added, edited or deleted."
)
_DISPATCH_READ_ONLY = _refuse(
    "Dispatches are the dispatcher's record of what it asked GitHub: read-only. "
    "Retry or fail the job with the operator forms instead."
)


class RunLinks(MediaStorage):
    """Shows a dispatch's workflow run as a link. piccolo_admin renders no HTML in its
    tables, but opens a media column's value through this storage's URL, so the run's
    page opens from the row. Stores, serves and deletes nothing."""

    def __init__(self, column: Any) -> None:
        super().__init__(column, allowed_extensions=None)

    def __hash__(self) -> int:  # piccolo_admin puts storages in a set
        return hash(("run-links", self.column._meta.table._meta.tablename, self.column._meta.name))

    async def generate_file_url(self, file_key: str, root_url: str, user: Any = None) -> Any:
        return file_key if file_key.startswith(("https://", "http://")) else None

    async def store_file(self, file_name: str, file: Any, user: Any = None) -> str:
        raise HTTPException(status_code=405, detail="Run links can't be uploaded.")

    async def get_file(self, file_key: str) -> None:
        return None

    async def delete_file(self, file_key: str) -> None:
        return None

    async def bulk_delete_files(self, file_keys: list[str]) -> None:
        return None

    async def get_file_keys(self) -> list[str]:
        return []


def _read_only(validator: Any) -> Validators:
    return Validators(
        post_single=[validator],
        put_single=[validator],
        patch_single=[validator],
        delete_single=[validator],
        delete_all=[validator],
    )


def _row_id(request: Request) -> UUID | None:
    try:
        return UUID(str(request.path_params.get("row_id")))
    except ValueError:
        return None


async def _user_without_jobs(piccolo_crud: PiccoloCRUD, request: Request) -> None:
    user_id = _row_id(request)
    if user_id is not None and (await jobs.list_jobs(user_id=user_id, limit=1)).items:
        raise HTTPException(
            status_code=405,
            detail="This user has provisioning jobs: deleting it would erase their history.",
        )


async def _agent_without_jobs(piccolo_crud: PiccoloCRUD, request: Request) -> None:
    agent_id = _row_id(request)
    if agent_id is not None and await jobs.get_job_by_agent_id(agent_id) is not None:
        raise HTTPException(
            status_code=405,
            detail="This agent has provisioning jobs: deleting it would erase their history.",
        )


_NO_BULK_DELETE = _refuse("Bulk deletes are not allowed.")


def table_configs() -> list[TableConfig]:
    job = ProvisioningJob
    event = JobEvent
    return [
        TableConfig(
            job,
            visible_columns=[
                job.id,
                job.status,
                job.user_id,
                job.agent_id,
                job.attempt,
                job.retry_count,
                job.workflow_run_id,
                job.dispatch_id,
                job.error,
                job.failed_step,
                job.last_heartbeat_at,
                job.created_at,
            ],
            visible_filters=[
                job.status,
                job.user_id,
                job.agent_id,
                job.region,
                job.failure_reason,
            ],
            order_by=[OrderBy(job.created_at, ascending=False), OrderBy(job.id, ascending=False)],
            validators=_read_only(_JOBS_READ_ONLY),
        ),
        TableConfig(
            event,
            visible_columns=[
                event.id,
                event.job_id,
                event.kind,
                event.from_status,
                event.to_status,
                event.step,
                event.step_state,
                event.attempt,
                event.actor,
                event.reason,
                event.detail,
                event.created_at,
            ],
            visible_filters=[event.job_id, event.kind, event.to_status, event.step, event.actor],
            order_by=[OrderBy(event.id, ascending=False)],
            validators=_read_only(_EVENTS_READ_ONLY),
        ),
        TableConfig(
            Dispatch,
            visible_columns=[
                Dispatch.id,
                Dispatch.job_id,
                Dispatch.attempt,
                Dispatch.state,
                Dispatch.tries,
                Dispatch.run_url,
                Dispatch.workflow_run_id,
                Dispatch.last_error,
                Dispatch.created_at,
                Dispatch.dispatched_at,
            ],
            visible_filters=[Dispatch.job_id, Dispatch.state, Dispatch.workflow_run_id],
            order_by=[OrderBy(Dispatch.created_at, ascending=False)],
            media_storage=[RunLinks(Dispatch.run_url)],
            validators=_read_only(_DISPATCH_READ_ONLY),
            menu_group="Dispatch",
        ),
        TableConfig(
            DispatchTry,
            visible_filters=[DispatchTry.dispatch_id, DispatchTry.kind, DispatchTry.outcome],
            order_by=[OrderBy(DispatchTry.id, ascending=False)],
            validators=_read_only(_DISPATCH_READ_ONLY),
            menu_group="Dispatch",
        ),
        TableConfig(
            RunCancellation,
            visible_filters=[RunCancellation.job_id, RunCancellation.state],
            order_by=[OrderBy(RunCancellation.created_at, ascending=False)],
            validators=_read_only(_DISPATCH_READ_ONLY),
            menu_group="Dispatch",
        ),
        TableConfig(
            User,
            order_by=[OrderBy(User.created_at, ascending=False)],
            validators=Validators(delete_single=[_user_without_jobs], delete_all=[_NO_BULK_DELETE]),
        ),
        TableConfig(
            Agent,
            visible_filters=[Agent.user_id, Agent.name],
            order_by=[OrderBy(Agent.created_at, ascending=False)],
            validators=Validators(
                delete_single=[_agent_without_jobs], delete_all=[_NO_BULK_DELETE]
            ),
        ),
    ]


# --------------------------------------------------------------------------- operator forms
# A form endpoint's ValueError is shown to the operator as the form's error; the
# string it returns is shown as the success message.


def _operator(request: Request) -> str:
    """`operator:<username>` for the logged-in admin user (set by the session auth)."""
    username = getattr(request.scope.get("user"), "username", None)
    if not username:
        raise ValueError("Not logged in.")
    return Actor.operator(username)


def _job_id(raw: str) -> UUID:
    try:
        return UUID(raw.strip())
    except ValueError:
        raise ValueError(f"{raw.strip()!r} is not a job id (a job id is a UUID).") from None


def _reason(raw: str) -> str:
    reason = raw.strip()
    if not reason:
        raise ValueError("Give a reason: it is recorded in the job's history.")
    return reason


class OperatorRefused(ValueError):
    """The state machine refused an operator's action (the console answers 409)."""


def _refused(action: str, job_id: UUID, exc: DomainError) -> ValueError:
    return OperatorRefused(
        f"{action} refused for job {job_id}: {exc.message}. Nothing was changed."
    )


def _describe(job: Job) -> str:
    return (
        f"status {job.status}, attempt {job.attempt} "
        f"(retries used {job.retry_count} of {job.max_retries})"
    )


class RetryJobForm(BaseModel):
    job_id: str = Field(description="The failed job's id (a UUID).")
    reason: str = Field(description="Why: recorded in the job's history.", max_length=1000)
    grant_extra_attempt: bool = Field(
        default=False,
        description="If the job has used all its retries, grant one more attempt "
        "past max_retries (recorded as such).",
    )


def reason_given(raw: str) -> str:
    """The operator's reason, stripped; ValueError when there is none."""
    return _reason(raw)


async def retry_as_operator(
    actor: str, job_id: UUID, reason: str, *, grant_extra_attempt: bool = False
) -> str:
    """Re-queue a failed job as `actor` (`operator:<username>`) with `reason`: what the
    admin's Retry job form and the console's Retry button both do. The message to show;
    OperatorRefused (with the message) when refused."""
    try:
        try:
            job = await jobs.retry_job(job_id, actor=actor, reason=reason)
            return f"Job {job.id} re-queued: {_describe(job)}."
        except RetriesExhaustedError as exc:
            if not grant_extra_attempt:
                raise OperatorRefused(
                    f"Retry refused for job {job_id}: {exc.message}. Nothing was changed. "
                    "Tick 'grant extra attempt' to allow one more attempt past max_retries."
                ) from exc
        # Only now is an extra attempt needed: grant it, and say so in the history.
        job = await jobs.retry_job(
            job_id,
            actor=actor,
            reason=f"{reason} (extra attempt granted past max_retries)",
            grant_extra_attempt=True,
        )
        return f"Job {job.id} re-queued with an extra attempt granted: {_describe(job)}."
    except DomainError as exc:
        raise _refused("Retry", job_id, exc) from exc


async def fail_as_operator(actor: str, job_id: UUID, reason: str) -> str:
    """Fail a queued or provisioning job as `actor` with `reason` (failure reason
    `operator`): the admin's Fail job form and the console's Fail button. The message to
    show; OperatorRefused when refused."""
    try:
        # Whatever attempt is current; an already failed job is refused, not repeated.
        job = await jobs.update_job_status(
            job_id,
            status=JobStatus.FAILED,
            attempt=None,
            error=reason,
            failure_reason=FailureReason.OPERATOR,
            actor=actor,
            repeat_ok=False,
        )
    except DomainError as exc:
        raise _refused("Fail", job_id, exc) from exc
    return f"Job {job.id} failed by {actor}: {_describe(job)}."


async def retry_job(request: Request, data: RetryJobForm) -> str:
    return await retry_as_operator(
        _operator(request),
        _job_id(data.job_id),
        _reason(data.reason),
        grant_extra_attempt=data.grant_extra_attempt,
    )


class FailJobForm(BaseModel):
    job_id: str = Field(description="The queued or provisioning job's id (a UUID).")
    reason: str = Field(
        description="Why: recorded as the job's error and in its history.", max_length=1000
    )


async def fail_job(request: Request, data: FailJobForm) -> str:
    return await fail_as_operator(_operator(request), _job_id(data.job_id), _reason(data.reason))


class FindJobsForm(BaseModel):
    email: str = Field(description="The user's email address (case-insensitive).")


async def find_jobs(request: Request, data: FindJobsForm) -> str:
    _operator(request)
    email = data.email.strip()
    if not email:
        raise ValueError("Give the user's email address.")
    try:
        user = await accounts.find_user_by_email(email)
        page = await jobs.list_jobs(user_id=user.id, limit=FIND_JOBS_LIMIT)
    except DomainError as exc:
        raise ValueError(f"{exc.message}: {email}.") from exc
    if not page.items:
        return f"{user.email} (user {user.id}) has no jobs."
    shown = "newest first" if page.next_cursor is None else f"the newest {FIND_JOBS_LIMIT}"
    lines = [
        f"job {j.id}: {j.status}, attempt {j.attempt}, "
        f"created {j.created_at.isoformat(sep=' ', timespec='seconds')}"
        for j in page.items
    ]
    count = f"{len(page.items)} job" + ("s" if len(page.items) > 1 else "")
    return f"{user.email} (user {user.id}), {count}, {shown}: " + "; ".join(lines)


def form_configs() -> list[FormConfig]:
    return [
        FormConfig(
            name="Retry job",
            pydantic_model=RetryJobForm,
            endpoint=retry_job,
            description="Re-queue a failed job as its next attempt. "
            "Recorded in the job's history with your name and reason.",
        ),
        FormConfig(
            name="Fail job",
            pydantic_model=FailJobForm,
            endpoint=fail_job,
            description="Fail a queued or provisioning job (failure reason 'operator'). "
            "Recorded in the job's history with your name and reason.",
        ),
        FormConfig(
            name="Find jobs of a user by email",
            pydantic_model=FindJobsForm,
            endpoint=find_jobs,
            description=f"List a user's jobs, newest first (at most {FIND_JOBS_LIMIT}).",
        ),
    ]


# --------------------------------------------------------------------------- mounting


def create_admin_app(settings: Settings) -> Any:
    """The piccolo_admin ASGI app (a FastAPI app with its own CSRF and session auth)."""
    return create_admin(
        tables=table_configs(),
        forms=form_configs(),
        auth_table=BaseUser,
        session_table=SessionsBase,
        production=settings.production,
        allowed_hosts=settings.admin_allowed_hosts,
        site_name=SITE_NAME,
        auto_include_related=False,
        sidebar_links={
            "Support console": "./console/",
            "Failed jobs": "./#/provisioning_jobs?status=failed",
            "Jobs in flight (queued)": "./#/provisioning_jobs?status=queued",
            "Jobs in flight (provisioning)": "./#/provisioning_jobs?status=provisioning",
            "Dispatches still working": "./#/dispatches?state=unknown",
            "Refused dispatches": "./#/provisioning_jobs?failure_reason=dispatch_error",
        },
    )


def admin_route_handlers(settings: Settings) -> list[ASGIRouteHandler]:
    """Litestar handlers serving the admin at /admin/ (and redirecting /admin there).

    The admin app is built here, once, when the Litestar app is created.
    """
    admin_app = create_admin_app(settings)

    @asgi(ADMIN_PATH, is_mount=True, copy_scope=False)
    async def admin(scope: Scope, receive: Receive, send: Send) -> None:
        # One route label for the whole admin in the request metrics (a mount has
        # no template of its own); the admin app itself gets a copy of the scope.
        scope["path_template"] = ADMIN_PATH
        # Litestar hands a mount the path below it ("/" for both /admin and
        # /admin/). The single-page app's assets are relative to /admin/, so the
        # bare path is redirected there; raw_path still says which was asked for.
        raw_path = scope.get("raw_path") or b""
        if scope["type"] == "http" and scope["path"] == "/" and raw_path.endswith(b"/admin"):
            location = f"{scope.get('root_path', '')}{ADMIN_PATH}/"
            if query := scope.get("query_string", b""):
                location += "?" + query.decode("latin-1")
            redirect = ASGIRedirectResponse(
                location, status_code=307, is_head_response=scope.get("method") == "HEAD"
            )
            await redirect(scope, receive, send)
            return
        await admin_app(scope.copy(), receive, send)

    return [admin]
