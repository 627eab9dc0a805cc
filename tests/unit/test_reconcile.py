"""The reconciler's pure parts: the diff (desired, observed) -> steps, and per-service backoff."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gardener.backends.base import ServiceSpec, ServiceState, Status
from gardener.backends.reconcile import Backoff, StepKind, plan
from gardener.core.types import DesiredState

A = "IGLA-HYBRID-FP32-WSD-SMOKE-seed500"
B = "IGLA-HYBRID-FP32-WSD-SMOKE-seed501"


def spec(name: str, desired: DesiredState = DesiredState.RUNNING) -> ServiceSpec:
    return ServiceSpec(canon_name=name, account="acc1", desired=desired)


def state(name: str | None, status: Status, *, owned: bool = True, sname: str = "") -> ServiceState:
    return ServiceState(
        canon_name=name, service_name=sname or f"svc-{name}", service_id=f"id-{name}",
        status=status, raw_status=status.value.upper(), owned=owned,
    )


@pytest.mark.parametrize(
    ("desired", "observed", "expected"),
    [
        (DesiredState.RUNNING, None, StepKind.CREATE),
        (DesiredState.RUNNING, Status.STOPPED, StepKind.START),
        (DesiredState.RUNNING, Status.CRASHED, StepKind.RESTART),
        (DesiredState.RUNNING, Status.FAILED, StepKind.REPORT_FAILED),
        (DesiredState.RUNNING, Status.REMOVED, StepKind.CREATE),
        (DesiredState.RUNNING, Status.PENDING, None),
        (DesiredState.RUNNING, Status.BUILDING, None),
        (DesiredState.RUNNING, Status.RUNNING, None),
        (DesiredState.RUNNING, Status.SUCCEEDED, None),
        (DesiredState.STOPPED, Status.RUNNING, StepKind.STOP),
        (DesiredState.STOPPED, Status.PENDING, StepKind.STOP),
        (DesiredState.STOPPED, Status.CRASHED, StepKind.STOP),
        (DesiredState.STOPPED, Status.STOPPED, None),
        (DesiredState.STOPPED, Status.SUCCEEDED, None),
        (DesiredState.STOPPED, None, None),
        (DesiredState.REMOVED, Status.RUNNING, StepKind.REMOVE),
        (DesiredState.REMOVED, Status.STOPPED, StepKind.REMOVE),
        (DesiredState.REMOVED, None, None),
    ],
)
def test_one_step_per_state(
    desired: DesiredState, observed: Status | None, expected: StepKind | None
) -> None:
    obs = [state(A, observed)] if observed is not None else []
    steps = plan([spec(A, desired)], obs)
    assert [s.kind for s in steps] == ([expected] if expected else [])


def test_orphans_reported_and_pruned_only_when_asked() -> None:
    observed = [state(A, Status.RUNNING), state(B, Status.RUNNING)]
    steps = plan([spec(A)], observed)
    assert [(s.kind, s.canon_name) for s in steps] == [(StepKind.REPORT_ORPHAN, B)]
    assert not steps[0].acts
    steps = plan([spec(A)], observed, prune_orphans=True)
    assert [(s.kind, s.canon_name) for s in steps] == [(StepKind.PRUNE_ORPHAN, B)]
    assert steps[0].acts


def test_foreign_services_are_never_touched() -> None:
    foreign = state(None, Status.RUNNING, owned=False, sname="postgres")
    assert plan([], [foreign], prune_orphans=True) == []
    # a foreign service holding our name is a conflict, not something to create over or delete
    held = state(None, Status.RUNNING, owned=False, sname="svc-A")
    steps = plan([spec(A)], [held], name_of=lambda c: "svc-A")
    assert [s.kind for s in steps] == [StepKind.CONFLICT]
    assert not steps[0].acts
    # an owned-looking record of another canon name with owned=False is never an orphan
    other = state(B, Status.RUNNING, owned=False)
    assert plan([], [other], prune_orphans=True) == []


def test_desired_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="desired twice"):
        plan([spec(A), spec(A)], [])


statuses = st.sampled_from(list(Status))
desires = st.sampled_from(list(DesiredState))


@given(st.lists(st.tuples(desires, st.one_of(st.none(), statuses)), max_size=30))
def test_plan_is_stable_and_one_step_per_service(
    rows: list[tuple[DesiredState, Status | None]],
) -> None:
    names = [f"IGLA-NCA-FP32-SMOKE-seed{i}" for i in range(len(rows))]
    desired = [spec(n, d) for n, (d, _) in zip(names, rows, strict=True)]
    observed = [state(n, s) for n, (_, s) in zip(names, rows, strict=True) if s is not None]
    steps = plan(desired, observed)
    assert len({s.canon_name for s in steps}) == len(steps)
    assert steps == plan(desired, list(reversed(observed)))
    # a service already where it should be gets no step
    for step in steps:
        d, s = rows[names.index(step.canon_name)]
        assert not (d is DesiredState.RUNNING and s in (Status.RUNNING, Status.SUCCEEDED))
        assert not (d is DesiredState.REMOVED and s is None)


def test_backoff_grows_caps_and_resets() -> None:
    b = Backoff(base=1.0, cap=10.0, jitter=0.0)
    assert b.ready("x", 0.0)
    assert b.failure("x", 0.0) == 1.0
    assert not b.ready("x", 0.5) and b.ready("x", 1.0)
    assert b.failure("x", 1.0) == 2.0
    assert b.failure("x", 3.0) == 4.0
    assert [b.failure("x", 0.0) for _ in range(3)] == [8.0, 10.0, 10.0]
    assert b.ready("y", 0.0)  # one broken key does not stall another
    b.success("x")
    assert b.ready("x", 0.0) and b.failures("x") == 0


def test_backoff_honours_retry_after_and_jitter_bounds() -> None:
    b = Backoff(base=1.0, cap=100.0, jitter=0.5, rng=random.Random(3))
    assert b.failure("x", 0.0, retry_after=30.0) == 30.0
    d = b.failure("y", 0.0)
    assert 1.0 <= d <= 1.5
    assert b.wait("y", 0.0) == pytest.approx(d)
    assert b.permanent("z", 5.0) == 100.0 and not b.ready("z", 104.0) and b.ready("z", 105.0)
