"""Routes for the provisioning workflow: status changes, step reports and heartbeats.

Signed, not bearer-authenticated: the guard verifies X-Signature over the raw body
before the body is decoded, so a bad signature is a 401 whatever the body holds.
"""

from __future__ import annotations

from uuid import UUID

from litestar import Controller, post
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_200_OK, HTTP_204_NO_CONTENT

from jobs_app.core.lifecycle import Actor
from jobs_app.core.logs import bind_job, get_logger
from jobs_app.core.provisioning import CALLBACKS_PATH
from jobs_app.http.auth import require_signature
from jobs_app.http.errors import error_responses
from jobs_app.http.schemas import Heartbeat, Job, StatusCallback, StepCallback
from jobs_app.services import jobs

log = get_logger("jobs_app.callbacks")


class CallbackController(Controller):
    path = CALLBACKS_PATH
    guards = [require_signature]  # noqa: RUF012
    tags = ["workflow callbacks"]  # noqa: RUF012

    @post(
        "/{job_id:uuid}/status",
        status_code=HTTP_200_OK,
        responses=error_responses(401, 404, 409, 413),
    )
    async def report_status(self, job_id: FromPath[UUID], data: JSONBody[StatusCallback]) -> Job:
        """Move the job for this attempt: provisioning, running or failed.

        A repeat of the job's current state is answered 200 unchanged; an illegal
        move, another attempt than the current one, or a dispatch other than the one
        the attempt is bound to is 409, with `extra.reason` `invalid_transition`,
        `stale_attempt` or `superseded_dispatch`: the run must stop.
        """
        # Bound before the call: a refusal (409) is logged with the job's fields too.
        bind_job(
            job_id,
            data.attempt,
            dispatch_id=data.dispatch_id,
            workflow_run_id=data.workflow_run_id,
        )
        job = await jobs.update_job_status(
            job_id,
            status=data.status,
            attempt=data.attempt,
            dispatch_id=data.dispatch_id,
            workflow_run_id=data.workflow_run_id,
            error=data.error,
            failed_step=data.failed_step,
            actor=Actor.WORKFLOW,
        )
        log.info(
            "status reported",
            status=job.status,
            workflow_run_id=job.workflow_run_id,
            failed_step=job.failed_step,
            error=job.error,
        )
        return job

    @post(
        "/{job_id:uuid}/steps",
        status_code=HTTP_200_OK,
        responses=error_responses(401, 404, 409, 413, 422),
    )
    async def report_step(self, job_id: FromPath[UUID], data: JSONBody[StepCallback]) -> Job:
        """A step of the plan (JOBS_PROVISION_STEPS) started, succeeded or failed.

        Fenced as a status callback is (409 `stale_attempt`, `superseded_dispatch`, or
        `invalid_transition` when the job is not provisioning or the step would move
        backwards); a step not in the plan is 422, naming the plan's steps; a repeat of
        the step's last report is answered 200 and records nothing.
        """
        bind_job(
            job_id,
            data.attempt,
            dispatch_id=data.dispatch_id,
            workflow_run_id=data.workflow_run_id,
        )
        job = await jobs.report_step(
            job_id,
            attempt=data.attempt,
            step=data.step,
            state=data.state,
            dispatch_id=data.dispatch_id,
            workflow_run_id=data.workflow_run_id,
            detail=data.detail,
        )
        log.info("step reported", step=data.step, state=data.state)
        return job

    @post(
        "/{job_id:uuid}/heartbeat",
        status_code=HTTP_204_NO_CONTENT,
        responses=error_responses(401, 404, 409, 413),
    )
    async def heartbeat(self, job_id: FromPath[UUID], data: JSONBody[Heartbeat]) -> None:
        """A sign of life from the workflow running this attempt."""
        bind_job(job_id, data.attempt, dispatch_id=data.dispatch_id)
        await jobs.record_heartbeat(
            job_id,
            attempt=data.attempt,
            dispatch_id=data.dispatch_id,
            workflow_run_id=data.workflow_run_id,
        )
        log.info("heartbeat")
