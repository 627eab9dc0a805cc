"""The Railway client against the fake server: auth, typed errors, retries, budget, metrics."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import structlog
from prometheus_client import REGISTRY

from gardener.backends.base import (
    BudgetExhausted,
    NameTaken,
    NotAuthorized,
    PermanentBackendError,
    TemporaryBackendError,
)
from gardener.backends.railway.client import RailwayClient, RequestBudget, drop_none
from gardener.backends.railway.documents import DOCUMENTS
from tests.fake_railway import FakeRailway

_tokens = itertools.count()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeRailway]:
    with FakeRailway(timeout_sleep=1.3, retry_after=3) as server:
        yield server


class Env:
    def __init__(self, fake: FakeRailway) -> None:
        self.token = f"secret-token-{next(_tokens)}-{random.random()}"
        self.project_id, self.environment_id = fake.add_project(self.token)
        self.sleeps: list[float] = []

    def client(self, **kw: Any) -> RailwayClient:
        async def sleep(delay: float) -> None:
            self.sleeps.append(delay)
            await asyncio.sleep(0)

        kw.setdefault("timeout", 1.0)
        kw.setdefault("sleep", sleep)
        kw.setdefault("rng", random.Random(1))
        return RailwayClient(self.token, base_url=kw.pop("url"), label="railway-client-test", **kw)


@pytest.fixture
def env(fake: FakeRailway) -> Env:
    return Env(fake)


def list_vars(env: Env) -> dict[str, Any]:
    return {"environmentId": env.environment_id, "first": 10}


async def test_bearer_token_and_a_read(fake: FakeRailway, env: Env) -> None:
    client = env.client(url=fake.url)
    data = await client.execute("ListServices", list_vars(env))
    assert data["environment"]["serviceInstances"]["edges"] == []
    assert fake.auth_headers[-1] == f"Bearer {env.token}"
    assert env.token not in repr(client)
    await client.aclose()


async def test_null_variables_are_left_out(fake: FakeRailway, env: Env) -> None:
    client = env.client(url=fake.url)
    await client.execute("ListServices", {"environmentId": env.environment_id, "after": None})
    op, variables = fake.calls[-1]
    assert op == "ListServices" and "after" not in variables
    assert drop_none({"a": None, "b": {"c": None, "d": 1}, "e": [{"f": None}]}) == {
        "b": {"d": 1}, "e": [{}]
    }
    await client.aclose()


async def test_wrong_token_is_permanent_and_not_retried(fake: FakeRailway, env: Env) -> None:
    client = RailwayClient("not-the-token", base_url=fake.url, timeout=0.2)
    before = fake.requests
    with pytest.raises(NotAuthorized):
        await client.execute("ListServices", list_vars(env))
    assert fake.requests == before + 1
    await client.aclose()


async def test_a_token_of_another_project_is_not_authorized(fake: FakeRailway, env: Env) -> None:
    other = Env(fake)
    client = other.client(url=fake.url)
    with pytest.raises(NotAuthorized):
        await client.execute("ListServices", list_vars(env))
    await client.aclose()


@pytest.mark.parametrize("kind", ["500", "html", "graphql_error", "timeout"])
async def test_temporary_faults_are_retried(fake: FakeRailway, env: Env, kind: str) -> None:
    client = env.client(url=fake.url)
    fake.push_fault(kind, "ListServices", count=2)
    before = fake.requests
    data = await client.execute("ListServices", list_vars(env))
    assert data["environment"]["id"] == env.environment_id
    assert fake.requests == before + 3
    assert len(env.sleeps) == 2 and all(0 <= s <= 1.0 for s in env.sleeps)  # jittered backoff
    await client.aclose()


async def test_retries_give_up_with_a_temporary_error(fake: FakeRailway, env: Env) -> None:
    client = env.client(url=fake.url, max_attempts=3)
    fake.push_fault("500", "ListServices", count=3)
    with pytest.raises(TemporaryBackendError) as info:
        await client.execute("ListServices", list_vars(env))
    assert info.value.maybe_applied
    await client.aclose()


async def test_429_honours_retry_after(fake: FakeRailway, env: Env) -> None:
    client = env.client(url=fake.url)
    fake.push_fault("429", "ListServices")
    await client.execute("ListServices", list_vars(env))
    assert env.sleeps == [3.0]  # the fake's Retry-After
    sample = REGISTRY.get_sample_value(
        "gardener_backend_requests_total",
        {"backend": "railway-client-test", "operation": "ListServices", "outcome": "rate_limited"},
    )
    assert sample is not None and sample >= 1
    await client.aclose()


async def test_a_long_retry_after_is_handed_to_the_caller(fake: FakeRailway, env: Env) -> None:
    client = env.client(url=fake.url, max_inline_wait=1.0)
    fake.push_fault("429", "ListServices")
    with pytest.raises(TemporaryBackendError) as info:
        await client.execute("ListServices", list_vars(env))
    assert info.value.retry_after == 3.0 and not info.value.maybe_applied
    assert env.sleeps == []
    await client.aclose()


async def test_a_create_is_never_repeated_after_a_timeout(fake: FakeRailway, env: Env) -> None:
    client = env.client(url=fake.url)
    fake.push_fault("applied_timeout", "ServiceCreate")
    before = fake.requests_by_operation["ServiceCreate"]
    with pytest.raises(TemporaryBackendError) as info:
        await client.execute("ServiceCreate", {"input": {
            "projectId": env.project_id, "environmentId": env.environment_id, "name": "gd-x-1",
        }})
    assert info.value.maybe_applied
    assert fake.requests_by_operation["ServiceCreate"] == before + 1
    assert fake.service_by_name("gd-x-1") is not None  # it happened on the server all the same
    with pytest.raises(NameTaken, match='A service named "gd-x-1" already exists'):
        await client.execute("ServiceCreate", {"input": {
            "projectId": env.project_id, "environmentId": env.environment_id, "name": "gd-x-1",
        }})
    await client.aclose()


async def test_a_create_after_429_is_retried(fake: FakeRailway, env: Env) -> None:
    client = env.client(url=fake.url)
    fake.push_fault("429", "ServiceCreate")
    data = await client.execute("ServiceCreate", {"input": {
        "projectId": env.project_id, "environmentId": env.environment_id, "name": "gd-y-1",
    }})
    assert data["serviceCreate"]["name"] == "gd-y-1"
    assert env.sleeps == [3.0]
    await client.aclose()


async def test_names_over_32_characters_are_refused(fake: FakeRailway, env: Env) -> None:
    client = env.client(url=fake.url)
    with pytest.raises(PermanentBackendError, match="32"):
        await client.execute("ServiceCreate", {"input": {
            "projectId": env.project_id, "name": "IGLA-HYBRID-FP32-WSD-E0005-seed200",
        }})
    await client.aclose()


async def test_the_fake_rejects_documents_that_do_not_validate(fake: FakeRailway) -> None:
    assert set(DOCUMENTS) >= {op for op, _ in fake.calls}  # the client sent only known documents
    async with httpx.AsyncClient() as http:
        resp = await http.post(fake.url, json={
            "query": 'mutation { deploymentRollback(id: "x") { id } }', "variables": {},
        }, headers={"Authorization": "Bearer x"})
    assert resp.status_code == 400
    assert "must not have a selection" in resp.json()["errors"][0]["message"]


async def test_the_budget_is_never_exceeded(fake: FakeRailway, env: Env) -> None:
    now = [0.0]
    budget = RequestBudget(3, clock=lambda: now[0])
    client = env.client(url=fake.url, budget=budget)
    for _ in range(3):
        await client.execute("ListServices", list_vars(env))
    before = fake.requests
    with pytest.raises(BudgetExhausted) as info:
        await client.execute("ListServices", list_vars(env))
    assert fake.requests == before  # refused without sending
    assert info.value.retry_after == pytest.approx(3600.0)
    now[0] = 3600.5
    assert budget.remaining == 3
    await client.execute("ListServices", list_vars(env))
    assert client.requests_sent == 4
    await client.aclose()


async def test_retries_count_against_the_budget(fake: FakeRailway, env: Env) -> None:
    budget = RequestBudget(2, clock=lambda: 0.0)
    client = env.client(url=fake.url, budget=budget)
    fake.push_fault("500", "ListServices", count=2)
    with pytest.raises(BudgetExhausted):
        await client.execute("ListServices", list_vars(env))
    assert budget.remaining == 0
    await client.aclose()


async def test_the_token_never_reaches_the_logs(fake: FakeRailway, env: Env) -> None:
    client = env.client(url=fake.url, max_attempts=2)
    fake.push_fault("500", "ListServices", count=2)
    with structlog.testing.capture_logs() as logs, pytest.raises(TemporaryBackendError):
        await client.execute("ListServices", list_vars(env))
    assert logs, "the give-up is logged"
    assert env.token not in repr(logs)
    await client.aclose()


async def test_the_per_second_rate_is_kept(fake: FakeRailway, env: Env) -> None:
    now = [0.0]
    budget = RequestBudget(1000, per_second=2, clock=lambda: now[0])

    async def sleep(delay: float) -> None:
        env.sleeps.append(delay)
        now[0] += delay

    client = env.client(url=fake.url, budget=budget, sleep=sleep)
    for _ in range(5):
        await client.execute("ListServices", list_vars(env))
    assert env.sleeps == [1.0, 1.0]  # requests 3 and 5 waited for the window to move on
    await client.aclose()


async def test_make_backend_builds_a_working_railway_backend(fake: FakeRailway, env: Env) -> None:
    from gardener.backends import make_backend
    from gardener.errors import ConfigError

    backend = make_backend("railway", "acc1", railway_token=env.token, project_id=env.project_id,
                           environment_id=env.environment_id, base_url=fake.url, timeout=1.0)
    assert backend.kind == "railway" and backend.account == "acc1"
    assert await backend.observe() == []
    await backend.aclose()
    with pytest.raises(ConfigError, match="railway_token"):
        make_backend("railway", "acc1", project_id="p", environment_id="e")
    with pytest.raises(ConfigError, match="unknown backend"):
        make_backend("k8s", "acc1")


@pytest.mark.parametrize(
    ("message", "kind", "maybe_applied"),
    [
        ("Not Authorized", NotAuthorized, None),
        ('A service named "x" already exists in this project', NameTaken, None),
        ("Service not found", PermanentBackendError, None),
        ("You have hit the rate limit", "retry", False),
        ("Internal server error, try again", "retry", True),
        ("Cannot query field 'nope' on type 'Query'.", PermanentBackendError, None),
    ],
)
def test_graphql_errors_are_typed_by_message(
    message: str, kind: object, maybe_applied: object
) -> None:
    from gardener.backends.railway.client import _graphql_error, _Retryable

    err = _graphql_error("Op", [{"message": message}])
    if kind == "retry":
        assert isinstance(err, _Retryable) and err.maybe_applied is maybe_applied
    else:
        assert isinstance(err, kind)  # type: ignore[arg-type]
