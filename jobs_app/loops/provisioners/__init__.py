"""Provisioners: what starts the provisioning workflow for a dispatch.

`github.py` dispatches GitHub Actions runs (githubkit), `simulated.py` stands in for the
workflow in dev mode; the interface they implement is `jobs_app.core.provisioning`.
`make_provisioner` builds the one `JOBS_PROVISIONER` names.
"""

from __future__ import annotations

from jobs_app.core.provisioning import Provisioner
from jobs_app.core.settings import Settings


def make_provisioner(settings: Settings) -> Provisioner | None:
    """None for `none`: nothing is dispatched (runs are started elsewhere)."""
    kind = settings.check_dispatch().effective_provisioner
    if kind == "none":
        return None
    if kind == "simulated":
        from jobs_app.loops.provisioners.simulated import SimulatedProvisioner

        return SimulatedProvisioner(
            secret=settings.callback_secret,
            steps=[step.name for step in settings.provision_steps],
        )
    from jobs_app.loops.provisioners.github import GitHubProvisioner

    return GitHubProvisioner.from_config(settings.github_config())
