"""Dispatch: turn each queued attempt into exactly one provisioning workflow run.

`dispatcher.py` is the loop (claim → provisioner → record), `provisioner.py` the
interface every provisioner implements, `github.py` the GitHub Actions one and
`simulated.py` the dev-mode stand-in. The loop calls the service layer and the
provisioner; neither calls back into it.
"""
