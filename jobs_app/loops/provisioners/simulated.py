"""The simulated provisioner (dev mode): a built-in stand-in for the workflow.

`dispatch` answers OK at once and starts a task that drives the job through the
service's own signed HTTP callbacks, exactly as the real workflow would (through the
same client, jobs_app.workflow.callback_client): `provisioning`, then each step of the
plan (started, a heartbeat, succeeded; a few heartbeats when it has no plan), then
`running`, `interval` seconds apart, so `make run` shows a moving progress bar. It stops
at the first 409. Each run has an HTTP client of its own, as each runner of the real
workflow has. Nothing is provisioned: it says so in the logs and in
every Result (`simulated=True`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import httpx

from jobs_app.core.logs import get_logger
from jobs_app.core.provisioning import DispatchRequest, Outcome, Result
from jobs_app.workflow import callback_client

log = get_logger("jobs_app.provisioners.simulated")


def simulated_run_id(dispatch_id: UUID) -> str:
    return f"sim-{dispatch_id.hex[:12]}"


class SimulatedProvisioner:
    """Drives each dispatched job to `running` through `POST
    {callback_url}/status|heartbeat|steps` signed with `secret` (the service's
    JOBS_CALLBACK_SECRET), one callback every `interval` seconds after `start_delay`."""

    name = "simulated"

    def __init__(
        self,
        *,
        secret: str,
        start_delay: float = 1.0,
        heartbeats: int = 2,
        steps: Sequence[str] = (),
        interval: float = 1.0,
        timeout: float = 10.0,
        retries: int = 3,
    ) -> None:
        if not secret:
            raise ValueError("the simulated workflow signs its callbacks: a secret is required")
        self._secret = secret
        self.start_delay = start_delay
        self.heartbeats = heartbeats
        self.steps = tuple(steps)
        self.interval = interval
        self.retries = retries
        self._timeout = timeout
        self._started: set[str] = set()  # every run id this process started
        self._runs: dict[str, asyncio.Task[None]] = {}  # run id -> its task, while it runs
        self.outcomes: dict[str, list[callback_client.CallbackResult]] = {}
        """What each simulated run's callbacks got (for logs and tests)."""

    async def dispatch(self, request: DispatchRequest) -> Result:
        run_id = simulated_run_id(request.dispatch_id)
        if run_id not in self._started:
            self._started.add(run_id)
            task = asyncio.get_running_loop().create_task(
                self._drive(run_id, request), name=f"simulated-run-{run_id}"
            )
            self._runs[run_id] = task
            task.add_done_callback(lambda _: self._runs.pop(run_id, None))
        log.info(
            "simulated run started: nothing is provisioned",
            workflow_run_id=run_id,
            job_id=str(request.job_id),
            attempt=request.attempt,
        )
        return Result(
            outcome=Outcome.OK,
            workflow_run_id=run_id,
            run_url=None,
            simulated=True,
            message="simulated run: nothing is provisioned",
        )

    async def find_run(self, dispatch_id: UUID, created_since: datetime) -> Result:
        run_id = simulated_run_id(dispatch_id)
        if run_id in self._started:
            return Result(outcome=Outcome.OK, workflow_run_id=run_id, simulated=True)
        return Result(outcome=Outcome.NOT_FOUND, simulated=True)

    async def cancel_run(self, workflow_run_id: str) -> Result:
        if workflow_run_id not in self._started:
            return Result(outcome=Outcome.NOT_FOUND, simulated=True, message="no such run")
        task = self._runs.get(workflow_run_id)
        if task is None:
            return Result(outcome=Outcome.OK, simulated=True, message="the run had finished")
        task.cancel()
        log.info("simulated run cancelled", workflow_run_id=workflow_run_id)
        return Result(outcome=Outcome.OK, simulated=True)

    async def aclose(self) -> None:
        tasks = list(self._runs.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _drive(self, run_id: str, request: DispatchRequest) -> None:
        async with httpx.AsyncClient(timeout=self._timeout) as client:
            await self._callbacks(client, run_id, request)

    def _plan(self) -> list[str | tuple[str, str]]:
        """The run's callbacks in order: a status, "heartbeat", or (step, state)."""
        middle: list[str | tuple[str, str]] = ["heartbeat"] * self.heartbeats
        if self.steps:
            middle = []
            for step in self.steps:
                middle += [(step, "started"), "heartbeat", (step, "succeeded")]
        return ["provisioning", *middle, "running"]

    async def _callbacks(
        self, client: httpx.AsyncClient, run_id: str, request: DispatchRequest
    ) -> None:
        outcomes = self.outcomes.setdefault(run_id, [])
        base = request.callback_url
        await asyncio.sleep(self.start_delay)
        for index, call in enumerate(self._plan()):
            if index:
                await asyncio.sleep(self.interval)
            ids: dict[str, Any] = {
                "attempt": request.attempt,
                "dispatch_id": request.dispatch_id,
                "workflow_run_id": run_id,
                "retries": self.retries,
            }
            if call == "heartbeat":
                result = await callback_client.send_heartbeat(client, base, self._secret, **ids)
            elif isinstance(call, tuple):
                step, state = call
                result = await callback_client.send_step(
                    client, base, self._secret, step=step, state=state, **ids
                )
            else:
                result = await callback_client.send_status(
                    client, base, self._secret, status=call, **ids
                )
            outcomes.append(result)
            if not result.ok:
                log.warning(
                    "simulated run stopped: a callback was refused",
                    workflow_run_id=run_id,
                    callback=str(call),
                    status_code=result.status_code,
                    reason=result.reason or result.detail,
                )
                return
        log.info(
            "simulated run done: the job is running (simulated)",
            workflow_run_id=run_id,
            job_id=str(request.job_id),
        )
