"""jobs_app: the source of truth for hosted-agent VM provisioning jobs."""
