"""The provisioner `JOBS_PROVISIONER` names, built from the settings."""

from __future__ import annotations

from jobs_app.dispatch.provisioner import Provisioner
from jobs_app.settings import Settings


def make_provisioner(settings: Settings) -> Provisioner | None:
    """None for `none`: nothing is dispatched (runs are started elsewhere)."""
    kind = settings.check_dispatch().effective_provisioner
    if kind == "none":
        return None
    if kind == "simulated":
        from jobs_app.dispatch.simulated import SimulatedProvisioner

        return SimulatedProvisioner(secret=settings.callback_secret)
    from jobs_app.dispatch.github import GitHubProvisioner

    return GitHubProvisioner(
        repository=settings.github_repository,
        workflow=settings.github_workflow,
        ref=settings.github_ref,
        api_url=settings.github_api_url,
        app_id=settings.github_app_id or None,
        private_key=settings.github_app_private_key or None,
        installation_id=int(settings.github_installation_id)
        if settings.github_installation_id
        else None,
        token=settings.github_token or None,
        timeout=settings.github_timeout_seconds,
    )
