"""The GitHub provisioner against the GitHub stand-in, a real HTTP server on loopback.

No database here: the provisioner never touches it. Each test gets a stand-in of its
own; each provisioner has its own rate-limit gate, so no test inherits another's limit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from jobs_app.core.provisioning import DispatchRequest, Outcome
from jobs_app.loops.provisioners.github import GitHubProvisioner
from tests.conftest import free_port
from tests.github_standin import (
    WORKFLOW_INPUTS,
    Fault,
    FaultKind,
    GitHubStandIn,
    generate_private_key,
)

StartStandIn = Callable[..., GitHubStandIn]


def request(**over: Any) -> DispatchRequest:
    job_id = uuid.uuid4()
    values: dict[str, Any] = {
        "job_id": job_id,
        "attempt": 1,
        "dispatch_id": uuid.uuid4(),
        "agent_id": uuid.uuid4(),
        "user_id": uuid.uuid4(),
        "region": "eu-west",
        "callback_url": f"https://jobs.example.com/api/callbacks/jobs/{job_id}",
    }
    values.update(over)
    return DispatchRequest(**values)


def app_provisioner(standin: GitHubStandIn, **over: Any) -> GitHubProvisioner:
    args: dict[str, Any] = {
        "api_url": standin.url,
        "repository": standin.repository,
        "workflow": "provision.yml",
        "app_id": standin.app_id,
        "private_key": standin.private_key,
        "installation_id": standin.installation_id,
        "timeout": 2.0,
    }
    args.update(over)
    return GitHubProvisioner(**args)


@pytest.fixture
async def provisioners() -> AsyncIterator[list[GitHubProvisioner]]:
    """Provisioners a test made, closed afterwards."""
    made: list[GitHubProvisioner] = []
    yield made
    for provisioner in made:
        await provisioner.aclose()


@pytest.fixture
def make(provisioners: list[GitHubProvisioner]) -> Callable[..., GitHubProvisioner]:
    def build(standin: GitHubStandIn, **over: Any) -> GitHubProvisioner:
        provisioner = app_provisioner(standin, **over)
        provisioners.append(provisioner)
        return provisioner

    return build


# --------------------------------------------------------------------------- dispatch


async def test_dispatch_sends_every_input_as_a_string_and_records_the_run(
    github_standin: GitHubStandIn, make: Callable[..., GitHubProvisioner]
) -> None:
    provisioner = make(github_standin)
    req = request(attempt=3)

    result = await provisioner.dispatch(req)

    assert result.outcome is Outcome.OK, result
    assert result.status_code == 200
    [run] = github_standin.runs()
    assert result.workflow_run_id == str(run.id)
    assert result.run_url == run.html_url
    assert result.simulated is False
    assert run.inputs == req.inputs()
    assert set(run.inputs) == WORKFLOW_INPUTS
    assert all(isinstance(v, str) for v in run.inputs.values())
    assert run.inputs["attempt"] == "3"
    assert run.display_title == f"provision {req.dispatch_id}"
    assert run.ref == "main"
    [record] = github_standin.records("dispatch")
    assert record.status == 200
    assert record.dispatch_id == str(req.dispatch_id)


async def test_a_204_from_github_enterprise_is_ok_without_a_run_id(
    start_github_standin: StartStandIn, make: Callable[..., GitHubProvisioner]
) -> None:
    standin = start_github_standin(ghes=True)
    result = await make(standin).dispatch(request())
    assert result.outcome is Outcome.OK, result
    assert result.status_code == 204
    assert result.workflow_run_id is None and result.run_url is None
    assert len(standin.runs()) == 1  # the run exists; its id comes from a callback later


async def test_a_fine_grained_token_works_and_a_wrong_one_is_misconfigured(
    start_github_standin: StartStandIn, provisioners: list[GitHubProvisioner]
) -> None:
    standin = start_github_standin(fine_grained_token="github_pat_right")
    good = GitHubProvisioner(
        api_url=standin.url, repository=standin.repository, workflow="provision.yml",
        token="github_pat_right", timeout=2.0,
    )  # fmt: skip
    bad = GitHubProvisioner(
        api_url=standin.url, repository=standin.repository, workflow="provision.yml",
        token="github_pat_wrong", timeout=2.0,
    )  # fmt: skip
    provisioners += [good, bad]

    assert (await good.dispatch(request())).outcome is Outcome.OK
    refused = await bad.dispatch(request())
    assert refused.outcome is Outcome.MISCONFIGURED
    assert refused.status_code == 401
    assert standin.token_requests() == 0
    assert len(standin.runs()) == 1


def answer(status: int, message: str, *headers: tuple[str, str]) -> Fault:
    return Fault(FaultKind.ANSWER, status=status, message=message, headers=headers)


@pytest.mark.parametrize(
    ("fault", "outcome", "status", "run_created"),
    [
        (Fault(FaultKind.ERROR_500), Outcome.UNKNOWN, 500, False),
        (Fault(FaultKind.CREATED_502), Outcome.UNKNOWN, 502, True),
        (Fault(FaultKind.CREATED_DROP), Outcome.UNKNOWN, None, True),
        (Fault(FaultKind.CREATED_HOLD, hold=5.0), Outcome.UNKNOWN, None, True),
        (Fault(FaultKind.RATE_LIMIT_429, retry_after=7), Outcome.RATE_LIMITED, 429, False),
        (Fault(FaultKind.SECONDARY_403, retry_after=9), Outcome.RATE_LIMITED, 403, False),
        (Fault(FaultKind.PRIMARY_403, retry_after=30), Outcome.RATE_LIMITED, 403, False),
        (
            Fault(FaultKind.REJECT_422, message="Workflow has no 'workflow_dispatch' trigger"),
            Outcome.REJECTED,
            422,
            False,
        ),
        (answer(400, "Problems parsing JSON"), Outcome.REJECTED, 400, False),
        (answer(410, "Gone"), Outcome.REJECTED, 410, False),
        (answer(403, "Resource not accessible by integration"), Outcome.MISCONFIGURED, 403, False),
        (answer(403, "over", ("x-ratelimit-remaining", "0")), Outcome.RATE_LIMITED, 403, False),
        (answer(401, "Bad credentials"), Outcome.MISCONFIGURED, 401, False),
        (answer(503, "Unavailable"), Outcome.UNKNOWN, 503, False),
    ],
    ids=lambda v: f"{v.kind.value}-{v.status}" if isinstance(v, Fault) else None,
)
async def test_each_fault_comes_back_as_its_outcome(
    github_standin: GitHubStandIn,
    make: Callable[..., GitHubProvisioner],
    fault: Fault,
    outcome: Outcome,
    status: int | None,
    run_created: bool,
) -> None:
    provisioner = make(github_standin, timeout=1.0)
    github_standin.faults.push("dispatch", fault)

    result = await provisioner.dispatch(request())

    assert result.outcome is outcome, result
    assert result.status_code == status
    assert len(github_standin.runs()) == (1 if run_created else 0)
    assert len(github_standin.records("dispatch")) == 1  # never retried by the library
    if fault.kind is FaultKind.CREATED_DROP:
        assert "disconnected" in (result.message or "")
    if fault.kind is FaultKind.CREATED_HOLD:
        assert "Timeout" in (result.message or "")
    if outcome is Outcome.RATE_LIMITED:
        assert result.retry_after is not None
        if fault.kind is FaultKind.PRIMARY_403:  # x-ratelimit-reset - now
            assert 25 <= result.retry_after <= 30
        elif fault.kind is FaultKind.ANSWER:  # neither header: a minute
            assert result.retry_after == 60
        else:
            assert result.retry_after == fault.retry_after
    if outcome in (Outcome.REJECTED, Outcome.MISCONFIGURED):
        assert result.message == fault.message


async def test_inputs_github_refuses_are_rejected_with_its_message(
    start_github_standin: StartStandIn, make: Callable[..., GitHubProvisioner]
) -> None:
    standin = start_github_standin(refs=("main",))
    result = await make(standin, ref="no-such-branch").dispatch(request())
    assert result.outcome is Outcome.REJECTED
    assert result.status_code == 422
    assert result.message == "No ref found for: no-such-branch"
    assert standin.runs() == []


async def test_an_unknown_workflow_or_repository_is_misconfigured(
    github_standin: GitHubStandIn, make: Callable[..., GitHubProvisioner]
) -> None:
    for provisioner in (
        make(github_standin, workflow="nope.yml"),
        make(github_standin, repository="acme/elsewhere"),
    ):
        result = await provisioner.dispatch(request())
        assert result.outcome is Outcome.MISCONFIGURED, result
        assert result.status_code == 404
    assert github_standin.runs() == []


async def test_nothing_sent_when_the_connection_is_refused_or_the_name_unknown(
    provisioners: list[GitHubProvisioner],
) -> None:
    key = generate_private_key()
    for api_url in (f"http://127.0.0.1:{free_port()}", "http://github.invalid"):
        for auth in ({"token": "t"}, {"app_id": 1, "private_key": key, "installation_id": 2}):
            provisioner = GitHubProvisioner(
                api_url=api_url, repository="a/b", workflow="w.yml", timeout=2.0, **auth
            )
            provisioners.append(provisioner)
            result = await provisioner.dispatch(request())
            assert result.outcome is Outcome.NOT_SENT, (api_url, auth, result)


# --------------------------------------------------------------------------- App auth


async def test_the_installation_token_is_reused_across_calls(
    github_standin: GitHubStandIn, make: Callable[..., GitHubProvisioner]
) -> None:
    provisioner = make(github_standin)
    # Started together on a fresh provisioner: still one token request.
    results = list(await asyncio.gather(*(provisioner.dispatch(request()) for _ in range(5))))
    results += [await provisioner.dispatch(request()) for _ in range(3)]
    since = datetime.now(UTC) - timedelta(minutes=5)
    results.append(await provisioner.find_run(uuid.uuid4(), since))
    results.append(await provisioner.cancel_run(str(github_standin.runs()[0].id)))

    assert [r.outcome for r in results] == [Outcome.OK] * 8 + [Outcome.NOT_FOUND, Outcome.OK]
    assert github_standin.token_requests() == 1
    assert [r.status for r in github_standin.records("token")] == [201]


async def test_the_installation_token_is_refreshed_before_it_expires(
    start_github_standin: StartStandIn, make: Callable[..., GitHubProvisioner]
) -> None:
    # GitHub's tokens live an hour; githubkit stops using one a minute before it expires.
    standin = start_github_standin(token_ttl=61.0)
    provisioner = make(standin)
    assert (await provisioner.dispatch(request())).outcome is Outcome.OK
    assert standin.token_requests() == 1
    issued = standin.records("token")[0].answered
    assert issued is not None
    # Wait (bounded) until the token is within a minute of its expiry.
    await standin.wait_until(lambda: time.monotonic() > issued + 1.5, within=5)

    assert (await provisioner.dispatch(request())).outcome is Outcome.OK
    assert standin.token_requests() == 2
    assert len(standin.runs()) == 2


async def test_a_wrong_key_or_installation_is_misconfigured(
    github_standin: GitHubStandIn, make: Callable[..., GitHubProvisioner]
) -> None:
    wrong_key = make(github_standin, private_key=generate_private_key())
    wrong_app = make(github_standin, app_id=github_standin.app_id + 1)
    wrong_installation = make(github_standin, installation_id=github_standin.installation_id + 1)
    not_a_key = make(github_standin, private_key="-----BEGIN RSA PRIVATE KEY-----\nnope\n")

    for provisioner, status in (
        (wrong_key, 401),
        (wrong_app, 401),
        (wrong_installation, 404),
        (not_a_key, None),
    ):
        result = await provisioner.dispatch(request())
        assert result.outcome is Outcome.MISCONFIGURED, result
        assert result.status_code == status
        if status is not None:
            assert "installation token request refused" in (result.message or "")
    assert github_standin.records("dispatch") == []  # the dispatch itself was never sent
    assert github_standin.runs() == []


async def test_a_failing_token_request_means_the_dispatch_was_not_sent(
    github_standin: GitHubStandIn, make: Callable[..., GitHubProvisioner]
) -> None:
    github_standin.faults.push("token", Fault(FaultKind.ERROR_500))
    provisioner = make(github_standin)
    result = await provisioner.dispatch(request())
    assert result.outcome is Outcome.NOT_SENT, result
    assert github_standin.records("dispatch") == []
    assert (await provisioner.dispatch(request())).outcome is Outcome.OK


def test_the_constructor_wants_exactly_one_kind_of_credentials() -> None:
    base = {"repository": "a/b", "workflow": "w.yml"}
    with pytest.raises(ValueError, match="a GitHub App"):
        GitHubProvisioner(**base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        GitHubProvisioner(**base, token="t", app_id=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a GitHub App"):
        GitHubProvisioner(**base, app_id=1, private_key="k")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="owner/name"):
        GitHubProvisioner(repository="nope", workflow="w.yml", token="t")


# --------------------------------------------------------------------------- find_run, cancel_run


async def test_find_run_pages_through_every_page(
    github_standin: GitHubStandIn, make: Callable[..., GitHubProvisioner]
) -> None:
    provisioner = make(github_standin, per_page=2)
    since = datetime.now(UTC) - timedelta(seconds=5)
    requests = [request() for _ in range(5)]
    for req in requests:
        assert (await provisioner.dispatch(req)).outcome is Outcome.OK

    # Newest first: the first dispatch is on the last of three pages.
    found = await provisioner.find_run(requests[0].dispatch_id, since)
    assert found.outcome is Outcome.OK, found
    [run] = github_standin.runs_for(requests[0].dispatch_id)
    assert found.workflow_run_id == str(run.id)
    assert found.run_url == run.html_url
    listed = github_standin.records("list")
    assert [r.query.count("page=") for r in listed] == [2, 2, 2]  # per_page= and page=
    assert all("event=workflow_dispatch" in r.query and "created=%3E%3D" in r.query for r in listed)

    missing = await provisioner.find_run(uuid.uuid4(), since)
    assert missing.outcome is Outcome.NOT_FOUND
    assert len(github_standin.records("list")) == 6

    later = await provisioner.find_run(requests[0].dispatch_id, datetime.now(UTC) + timedelta(1))
    assert later.outcome is Outcome.NOT_FOUND  # `created` filters the window


async def test_find_run_sees_a_run_github_lists_late(
    github_standin: GitHubStandIn, make: Callable[..., GitHubProvisioner]
) -> None:
    provisioner = make(github_standin)
    since = datetime.now(UTC) - timedelta(seconds=5)
    github_standin.faults.push("dispatch", Fault(FaultKind.CREATED_DROP, list_delay=1.0))
    req = request()
    assert (await provisioner.dispatch(req)).outcome is Outcome.UNKNOWN
    [run] = github_standin.runs()

    first = await provisioner.find_run(req.dispatch_id, since)
    if time.monotonic() < run.visible_at:
        assert first.outcome is Outcome.NOT_FOUND
    results = []

    async def found() -> bool:
        results.append(await provisioner.find_run(req.dispatch_id, since))
        return results[-1].outcome is Outcome.OK

    deadline = time.monotonic() + 10
    while not await found():
        assert time.monotonic() < deadline, results[-1]
        await asyncio.sleep(0.1)  # polling with a bound
    assert results[-1].workflow_run_id == str(run.id)


async def test_find_run_errors_are_classified(
    github_standin: GitHubStandIn, make: Callable[..., GitHubProvisioner]
) -> None:
    provisioner = make(github_standin)
    github_standin.faults.push("list", Fault(FaultKind.ERROR_500))
    since = datetime.now(UTC)
    assert (await provisioner.find_run(uuid.uuid4(), since)).outcome is Outcome.UNKNOWN
    wrong = make(github_standin, workflow="gone.yml")
    assert (await wrong.find_run(uuid.uuid4(), since)).outcome is Outcome.MISCONFIGURED


async def test_cancel_a_run(
    github_standin: GitHubStandIn, make: Callable[..., GitHubProvisioner]
) -> None:
    provisioner = make(github_standin)
    dispatched = await provisioner.dispatch(request())
    assert dispatched.workflow_run_id is not None

    cancelled = await provisioner.cancel_run(dispatched.workflow_run_id)
    assert cancelled.outcome is Outcome.OK and cancelled.status_code == 202
    assert github_standin.run(dispatched.workflow_run_id).cancelled

    again = await provisioner.cancel_run(dispatched.workflow_run_id)  # completed by now
    assert again.outcome is Outcome.OK and again.status_code == 409
    assert "completed" in (again.message or "")

    assert (await provisioner.cancel_run("123")).outcome is Outcome.NOT_FOUND
    not_github = await provisioner.cancel_run("sim-abc")
    assert not_github.outcome is Outcome.REJECTED
    assert [r.path.rsplit("/", 2)[-2] for r in github_standin.records("cancel")] == [
        dispatched.workflow_run_id,
        dispatched.workflow_run_id,
        "123",
    ]


# --------------------------------------------------------------------------- the rate-limit gate


@pytest.mark.parametrize("kind", [FaultKind.RATE_LIMIT_429, FaultKind.SECONDARY_403])
async def test_after_a_rate_limit_no_request_reaches_github_until_retry_after(
    github_standin: GitHubStandIn,
    make: Callable[..., GitHubProvisioner],
    provisioners: list[GitHubProvisioner],
    kind: FaultKind,
) -> None:
    provisioner = make(github_standin)
    assert (await provisioner.dispatch(request())).outcome is Outcome.OK  # token fetched
    github_standin.faults.push("dispatch", Fault(kind, retry_after=2))

    limited = await provisioner.dispatch(request())
    assert limited.outcome is Outcome.RATE_LIMITED and limited.retry_after == 2

    held: list[Any] = []
    deadline = time.monotonic() + 10
    while True:
        result = await provisioner.dispatch(request())
        if result.outcome is Outcome.OK:
            break
        assert result.outcome is Outcome.RATE_LIMITED and result.status_code is None, result
        assert result.retry_after is not None and 0 < result.retry_after <= 2
        held.append(result)
        if result.retry_after > 0.5:  # well before the gate opens: none of these is sent
            held.append(await provisioner.find_run(uuid.uuid4(), datetime.now(UTC)))
            held.append(await provisioner.cancel_run("1"))
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)  # polling with a bound

    assert len(held) >= 3 and all(r.outcome is Outcome.RATE_LIMITED for r in held)
    records = github_standin.records()
    limited_at = next(i for i, r in enumerate(records) if r.fault is kind)
    after = records[limited_at + 1 :]
    # Exactly one request reached the stand-in after the limit: the one that succeeded,
    # received at least retry-after seconds after the limited answer left (its own clock).
    assert [(r.endpoint, r.status) for r in after] == [("dispatch", 200)]
    answered = records[limited_at].answered
    assert answered is not None
    assert after[0].received - answered >= 2.0


async def test_the_gate_belongs_to_its_provisioner_and_ends_with_it(
    github_standin: GitHubStandIn,
    make: Callable[..., GitHubProvisioner],
) -> None:
    """A limit learnt by one provisioner never holds back another on the same API URL (a
    process's next provisioner, or a later test's on a reused port)."""
    limited = make(github_standin)
    assert (await limited.dispatch(request())).outcome is Outcome.OK  # token fetched
    github_standin.faults.push("dispatch", Fault(FaultKind.RATE_LIMIT_429, retry_after=60))
    assert (await limited.dispatch(request())).outcome is Outcome.RATE_LIMITED
    assert limited.gate.remaining() > 50
    await limited.aclose()

    fresh = make(github_standin)
    assert fresh.gate.remaining() == 0
    result = await fresh.dispatch(request())
    assert result.outcome is Outcome.OK, result
    assert github_standin.records("dispatch")[-1].status == 200
