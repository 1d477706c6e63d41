"""The GitHub stand-in answers the way GitHub does (plain httpx against it), so tests
that use it prove something about GitHub's behaviour, not the stand-in's leniency."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest

from tests.github_standin import Fault, FaultKind, GitHubStandIn, generate_private_key

StartStandIn = Callable[..., GitHubStandIn]
DISPATCHES = "/repos/acme/vm-provisioning/actions/workflows/provision.yml/dispatches"
RUNS = "/repos/acme/vm-provisioning/actions/workflows/provision.yml/runs"


def inputs(**over: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "job_id": str(uuid.uuid4()),
        "attempt": "1",
        "dispatch_id": str(uuid.uuid4()),
        "agent_id": str(uuid.uuid4()),
        "user_id": str(uuid.uuid4()),
        "region": "us-east",
        "callback_url": "https://jobs.example.com/api/callbacks/jobs/x",
    }
    values.update(over)
    return {k: v for k, v in values.items() if v is not None}


def app_jwt(standin: GitHubStandIn, key: str | None = None, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": str(standin.app_id), "iat": now - 60, "exp": now + 540, **claims}
    return jwt.encode(payload, key or standin.private_key, algorithm="RS256")


def token_request(standin: GitHubStandIn, bearer: str, installation: Any = None) -> httpx.Response:
    installation = standin.installation_id if installation is None else installation
    return httpx.post(
        f"{standin.url}/app/installations/{installation}/access_tokens",
        headers={"Authorization": f"Bearer {bearer}"},
    )


def client(standin: GitHubStandIn, version: str = "2026-03-10") -> httpx.Client:
    return httpx.Client(
        base_url=standin.url,
        headers={
            "Authorization": f"token {standin.issue_token()}",
            "X-GitHub-Api-Version": version,
        },
    )


def test_installation_tokens_need_a_valid_app_jwt(github_standin: GitHubStandIn) -> None:
    ok = token_request(github_standin, app_jwt(github_standin))
    assert ok.status_code == 201
    body = ok.json()
    assert body["token"].startswith("ghs_")
    expires = datetime.strptime(body["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)

    now = int(time.time())
    for bad in (
        app_jwt(github_standin, key=generate_private_key()),  # not the App's key
        app_jwt(github_standin, iss="999"),  # another App
        app_jwt(github_standin, exp=now - 120),  # expired
        app_jwt(github_standin, exp=now + 3600),  # GitHub allows ten minutes at most
        "not-a-jwt",
    ):
        assert token_request(github_standin, bad).status_code == 401
    assert token_request(github_standin, app_jwt(github_standin), installation=1).status_code == 404


def test_every_other_call_needs_a_live_token(start_github_standin: StartStandIn) -> None:
    standin = start_github_standin(token_ttl=0.5)
    assert httpx.get(f"{standin.url}{RUNS}").status_code == 401
    wrong = httpx.get(f"{standin.url}{RUNS}", headers={"Authorization": "token x"})
    assert wrong.status_code == 401
    with client(standin) as c:
        assert c.get(RUNS).status_code == 200
        deadline = time.monotonic() + 5
        while c.get(RUNS).status_code == 200:  # the token expires half a second after issue
            assert time.monotonic() < deadline
            time.sleep(0.05)  # polling with a bound
        assert c.get(RUNS).status_code == 401


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"ref": "main", "inputs": inputs(extra="x")}, "Unexpected inputs provided: ['extra']"),
        ({"ref": "main", "inputs": inputs(region=None)}, "Required input 'region' not provided"),
        (
            {"ref": "main", "inputs": inputs(attempt=1)},
            "For 'properties/attempt', 1 is not a string.",
        ),
        ({"ref": "nope", "inputs": inputs()}, "No ref found for: nope"),
    ],
    ids=["unknown", "missing", "not-a-string", "ref"],
)
def test_dispatches_with_wrong_inputs_are_422(
    github_standin: GitHubStandIn, body: dict[str, Any], message: str
) -> None:
    with client(github_standin) as c:
        answer = c.post(DISPATCHES, json=body)
    assert answer.status_code == 422
    assert answer.json()["message"] == message
    assert github_standin.runs() == []


def test_an_unknown_workflow_is_404(github_standin: GitHubStandIn) -> None:
    with client(github_standin) as c:
        path = DISPATCHES.replace("provision.yml", "other.yml")
        assert c.post(path, json={"ref": "main", "inputs": inputs()}).status_code == 404


def test_run_details_come_with_the_new_api_version_or_when_asked(
    github_standin: GitHubStandIn,
) -> None:
    with client(github_standin, "2022-11-28") as old:
        assert old.post(DISPATCHES, json={"ref": "main", "inputs": inputs()}).status_code == 204
        asked = old.post(
            DISPATCHES, json={"ref": "main", "inputs": inputs(), "return_run_details": True}
        )
    with client(github_standin) as new:
        answer = new.post(DISPATCHES, json={"ref": "main", "inputs": inputs()})
    for response in (asked, answer):
        assert response.status_code == 200
        assert set(response.json()) == {"workflow_run_id", "run_url", "html_url"}
    assert len(github_standin.runs()) == 3
    assert all(r.display_title == f"provision {r.dispatch_id}" for r in github_standin.runs())


def test_listing_filters_and_pages_like_github(github_standin: GitHubStandIn) -> None:
    with client(github_standin) as c:
        for _ in range(5):
            assert c.post(DISPATCHES, json={"ref": "main", "inputs": inputs()}).status_code == 200
        first = c.get(RUNS, params={"event": "workflow_dispatch", "per_page": 2})
        assert first.json()["total_count"] == 5
        assert [r["id"] for r in first.json()["workflow_runs"]] == sorted(
            (r.id for r in github_standin.runs()), reverse=True
        )[:2]  # newest first
        assert set(first.links) == {"next", "last"}
        assert "page=3" in first.links["last"]["url"]
        middle = c.get(first.links["next"]["url"])
        assert set(middle.links) == {"prev", "first", "next", "last"}
        last = c.get(first.links["last"]["url"])
        assert len(last.json()["workflow_runs"]) == 1 and "next" not in last.links

        assert c.get(RUNS, params={"event": "push"}).json()["total_count"] == 0
        future = (datetime.now(UTC) + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert c.get(RUNS, params={"created": f">={future}"}).json()["total_count"] == 0


def test_seeded_fault_plans_are_deterministic_per_dispatch_id(
    start_github_standin: StartStandIn,
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(60)]
    kinds = [Fault(FaultKind.ERROR_500), Fault(FaultKind.CREATED_502)]
    seen: list[dict[str, Any]] = []
    for order in (ids, list(reversed(ids))):  # arrival order doesn't matter
        standin = start_github_standin()
        standin.faults.plan("dispatch", rate=0.3, kinds=kinds, seed=7)
        with client(standin) as c:
            for dispatch_id in order:
                c.post(DISPATCHES, json={"ref": "main", "inputs": inputs(dispatch_id=dispatch_id)})
        seen.append({r.dispatch_id: (r.fault, r.status) for r in standin.records("dispatch")})
    assert seen[0] == seen[1]
    faulted = [v for v in seen[0].values() if v[0] is not None]
    assert 5 <= len(faulted) <= 35  # a share, neither none nor all
    assert {status for _, status in faulted} <= {500, 502}


def test_queued_faults_hit_the_next_requests_and_are_recorded(
    github_standin: GitHubStandIn,
) -> None:
    github_standin.faults.push("dispatch", Fault(FaultKind.CREATED_DROP))
    github_standin.faults.push("dispatch", Fault(FaultKind.RATE_LIMIT_429, retry_after=3))
    with client(github_standin) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            c.post(DISPATCHES, json={"ref": "main", "inputs": inputs()})
        limited = c.post(DISPATCHES, json={"ref": "main", "inputs": inputs()})
        ok = c.post(DISPATCHES, json={"ref": "main", "inputs": inputs()})
    assert limited.status_code == 429 and limited.headers["retry-after"] == "3"
    assert ok.status_code == 200
    records = github_standin.records("dispatch")
    assert [(r.fault, r.status) for r in records] == [
        (FaultKind.CREATED_DROP, None),
        (FaultKind.RATE_LIMIT_429, 429),
        (None, 200),
    ]
    assert all(r.dispatch_id and r.answered and r.answered >= r.received for r in records)
    assert len(github_standin.runs()) == 2  # the dropped one exists, the limited one doesn't
