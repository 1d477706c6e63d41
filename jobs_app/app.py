"""ASGI entry point: `litestar --app jobs_app.app:app run`, and what `jobs-app serve` runs."""

from jobs_app.http.app import create_app

app = create_app()
