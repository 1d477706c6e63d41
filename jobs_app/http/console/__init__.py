"""The support console at /admin/console/: one search box and one page per job, its whole
story in order and live, with the operator's actions (README, "The support console").

A room of the HTTP floor with its own templates (Jinja, server-rendered, a little plain
JavaScript). It reads through `jobs_app.services.console`, acts through the admin's
operator actions (`jobs_app.http.admin`), and is behind the admin's own login
(`session.py`): anyone without a staff session is sent to the admin's login page before
a route runs.
"""

from jobs_app.http.console.routes import CONSOLE_PATH, console_router, template_config

__all__ = ["CONSOLE_PATH", "console_router", "template_config"]
