"""The process's background work, built and started in one place.

`jobs-app serve` (each worker, through the app's lifespan) and `jobs-app dispatch` both
run a `BackgroundLoops`: the sweeper (fails stale jobs), the dispatcher (when a
provisioner is configured) and the listener (live-update notifications; it also wakes
the dispatcher the moment a job is queued anywhere). One `start()`, one `stop()`:

    loops = BackgroundLoops(settings)
    await loops.start()
    ...
    await loops.stop()   # the dispatcher gives its leases back first, the listener last
"""

from __future__ import annotations

import asyncio
import contextlib

from jobs_app.core.settings import Settings
from jobs_app.db.connector import database_url
from jobs_app.loops import sweeper
from jobs_app.loops.dispatcher import Dispatcher
from jobs_app.loops.listener import Listener
from jobs_app.loops.provisioners import make_provisioner


class BackgroundLoops:
    """What runs beside the requests in one process (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        sweep: bool = True,
        dispatch: bool = True,
        listen: bool = True,
    ) -> None:
        self.settings = settings
        provisioner = make_provisioner(settings) if dispatch else None
        self.dispatcher = None if provisioner is None else Dispatcher(provisioner, settings)
        self.listener = Listener(database_url(settings)) if listen else None
        self._sweep = sweep
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.listener is not None:
            await self.listener.start()
            if self.dispatcher is not None:
                # A job enqueued or retried is dispatched now, not at the next poll.
                dispatcher = self.dispatcher
                self.listener.add_observer(lambda n: dispatcher.wake() if n.queued else None)
        if self._sweep:
            self._sweeper = asyncio.create_task(
                sweeper.run_forever(self.settings.sweep_interval_seconds), name="jobs_app sweeper"
            )
        if self.dispatcher is not None:
            self.dispatcher.start()

    async def stop(self) -> None:
        """Dispatcher first (its leases go back, so another replica takes its dispatches
        at once), then the sweeper, then the listener."""
        if self.dispatcher is not None:
            await self.dispatcher.stop()
            await self.dispatcher.provisioner.aclose()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self.listener is not None:
            await self.listener.stop()
