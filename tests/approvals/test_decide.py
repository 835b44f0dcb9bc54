"""`ApprovalBroker.decide`, where every reviewer's verdict is judged: each refusal, each acceptance, and what the
ledger keeps of both. Requests are opened by a real gate (the agent gives up waiting; the request stays pending)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from server.approvals import ApprovalBroker, ReviewerDirectory, directory_from
from server.classify import ClassifyContext
from server.gate import Gate, Identity
from server.guarded import guarded_tool
from server.ledger import Store
from server.models import RequestView, Verdict
from server.policy import LivePolicy
from tests.helpers import agent, held_call, left_pending
from tests.stores import Stores

POLICY = """
version: 1
default: review
review: {timeout: 10m, approvers: [{any: true, quorum: 1}]}
rules:
  - {id: any-one, tool: "write_any", outcome: review, risk: high, reason: one reviewer}
  - id: two-dbas
    tool: "write_db"
    outcome: review
    risk: high
    reason: two DBAs
    review: {approvers: [{group: dba, quorum: 2}]}
  - id: dba-and-security
    tool: "write_both"
    outcome: review
    risk: critical
    reason: a DBA and security
    review: {approvers: [{group: dba}, {group: security}]}
  - id: with-reason
    tool: "write_reason"
    outcome: review
    risk: high
    reason: approvals need a reason
    review: {require_reason: true, approvers: [{any: true}]}
  - {id: short, tool: "write_short", outcome: review, risk: high, reason: short-lived, review: {timeout: 1s}}
"""

AGENT = Identity(principal="agent-1", on_behalf_of="olive")
TOOLS = ("write_any", "write_db", "write_both", "write_reason", "write_short")


def tool(name: str) -> Any:
    @guarded_tool(name=name)
    async def run(key: str) -> str:
        return "done"

    return run


@pytest.fixture
async def world(tmp_path: Path, stores: Stores) -> AsyncIterator[tuple[Gate, Store]]:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    policy = LivePolicy(policy_file)
    policy.load()
    directory = directory_from(
        [("api:alice", "alice"), ("api:carol", "carol"), ("api:sam", "sam"), ("api:olive", "olive"),
         ("api:agent-1", "agent-1")],
        {"alice": ["dba"], "carol": ["dba"], "sam": ["security"]})
    async with stores.new() as ledger:
        broker = ApprovalBroker(ledger=ledger, directory=directory, poll_interval_s=0.05)
        gate = Gate(ledger=ledger, broker=broker, policy=policy, classify_context=ClassifyContext(),
                    progress_interval_s=0.2)
        gate.tools = {name: tool(name) for name in TOOLS}  # type: ignore[attr-defined]
        yield gate, ledger


async def held(gate: Gate, ledger: Store, name: str, key: str = "k") -> RequestView:
    """A request for `name` left pending: the agent's call is held, then the agent stops waiting."""
    request = await left_pending(gate, gate.tools[name], {"key": key}, AGENT)  # type: ignore[attr-defined]
    (view,) = [v for v in await ledger.list_calls(("pending",)) if v.tool == name and v.arguments == {"key": key}]
    assert view.id == request.id
    return view


def vote(request: RequestView, reviewer: str, verdict: str = "approve", reason: str | None = None) -> Verdict:
    return Verdict(request_id=request.id, reviewer=reviewer, verdict=verdict, reason=reason)  # type: ignore[arg-type]


async def refused(gate: Gate, verdict: Verdict) -> str:
    """The code of a refused verdict (the verdict must be refused)."""
    result = await gate.broker.decide(verdict)
    assert not result.accepted and result.status != 200, result
    return result.code


async def kinds(ledger: Store, request: RequestView) -> list[str]:
    return [e.kind for e in await ledger.events(request.id)]


async def test_an_unknown_request_is_an_error_and_records_nothing(world: tuple[Gate, Store]) -> None:
    gate, ledger = world
    head = len(await ledger.tail(1000))
    result = await gate.broker.decide(Verdict(request_id="no-such-request", reviewer="api:alice", verdict="approve"))
    assert (result.accepted, result.code, result.status) == (False, "unknown", 404)
    assert len(await ledger.tail(1000)) == head


async def test_one_approval_from_any_reviewer_approves_and_binds_the_call(world: tuple[Gate, Store]) -> None:
    gate, ledger = world
    request = await held(gate, ledger, "write_any")
    result = await gate.broker.decide(vote(request, "api:alice"))
    assert result.accepted and result.state == "approved" and result.code == "approved"
    assert "waiting for the agent to come back" in result.message  # nobody waits: it runs when the agent retries
    events = await ledger.events(request.id)
    granted = next(e for e in events if e.kind == "approval.granted")
    assert granted.payload["approvers"] == ["alice"]
    # Bound to this request's tool, arguments and policy, and it expires.
    assert granted.payload["tool"] == "write_any" and granted.payload["args_hash"] == request.args_hash
    assert granted.payload["policy_digest"] == request.policy_digest and granted.payload["expires"] > 0
    assert [e.kind for e in events if e.kind in ("vote", "approval.granted")] == ["vote", "approval.granted"]
    view = await ledger.get_call(request.id)
    assert view is not None and view.state == "approved"


async def test_the_requester_cannot_decide_its_own_request(world: tuple[Gate, Store]) -> None:
    gate, ledger = world
    request = await held(gate, ledger, "write_any")
    # The agent's principal, the person it acts for, either verdict: all refused and recorded as such.
    assert await refused(gate, vote(request, "api:agent-1")) == "self_approval"
    assert await refused(gate, vote(request, "api:olive")) == "self_approval"
    assert await refused(gate, vote(request, "api:olive", "deny", "mine")) == "self_approval"
    assert (await kinds(ledger, request)).count("vote.refused") == 3
    view = await ledger.get_call(request.id)
    assert view is not None and view.state == "pending" and view.votes == []


async def test_someone_who_is_not_a_reviewer_is_refused(world: tuple[Gate, Store]) -> None:
    gate, ledger = world
    request = await held(gate, ledger, "write_any")
    assert await refused(gate, vote(request, "slack:U-STRANGER")) == "unknown_reviewer"
    refusal = next(e for e in await ledger.events(request.id) if e.kind == "vote.refused")
    assert refusal.payload["code"] == "unknown_reviewer" and refusal.payload["person"] is None


async def test_two_of_a_group_needs_two_distinct_members(world: tuple[Gate, Store]) -> None:
    gate, ledger = world
    request = await held(gate, ledger, "write_db")
    assert await refused(gate, vote(request, "api:sam")) == "not_eligible"  # not a DBA
    first = await gate.broker.decide(vote(request, "api:alice"))
    assert first.accepted and first.state == "pending"
    assert await refused(gate, vote(request, "api:alice")) == "duplicate"  # the same person twice fills one slot
    view = await ledger.get_call(request.id)
    assert view is not None and view.state == "pending"
    second = await gate.broker.decide(vote(request, "api:carol"))
    assert second.state == "approved"
    granted = next(e for e in await ledger.events(request.id) if e.kind == "approval.granted")
    assert sorted(granted.payload["approvers"]) == ["alice", "carol"]


async def test_every_group_must_be_filled(world: tuple[Gate, Store]) -> None:
    gate, ledger = world
    request = await held(gate, ledger, "write_both")
    assert (await gate.broker.decide(vote(request, "api:alice"))).state == "pending"
    assert (await gate.broker.decide(vote(request, "api:carol"))).state == "pending"  # a second DBA: still no security
    assert (await gate.broker.decide(vote(request, "api:sam"))).state == "approved"


async def test_a_denial_needs_a_reason_and_ends_the_request(world: tuple[Gate, Store]) -> None:
    gate, ledger = world
    request = await held(gate, ledger, "write_db")
    assert await refused(gate, vote(request, "api:alice", "deny")) == "reason_required"
    assert await refused(gate, vote(request, "api:alice", "deny", "   ")) == "reason_required"
    result = await gate.broker.decide(vote(request, "api:alice", "deny", "not on a Friday"))
    assert result.accepted and result.state == "denied"
    denied = next(e for e in await ledger.events(request.id) if e.kind == "denied")
    assert denied.payload["person"] == "alice" and denied.payload["reason"] == "not on a Friday"
    # One denial ends it: a later approval is refused, the request stays denied.
    assert await refused(gate, vote(request, "api:carol")) == "not_pending"
    view = await ledger.get_call(request.id)
    assert view is not None and view.state == "denied"


async def test_a_policy_can_require_a_reason_with_every_approval(world: tuple[Gate, Store]) -> None:
    gate, ledger = world
    request = await held(gate, ledger, "write_reason")
    assert await refused(gate, vote(request, "api:alice")) == "reason_required"
    result = await gate.broker.decide(vote(request, "api:alice", reason="ticket OPS-12"))
    assert result.state == "approved"
    approved = next(e for e in await ledger.events(request.id) if e.kind == "vote")
    assert approved.payload["reason"] == "ticket OPS-12" and approved.payload["verdict"] == "approve"


async def test_a_decided_request_takes_no_more_votes(world: tuple[Gate, Store]) -> None:
    gate, ledger = world
    request = await held(gate, ledger, "write_any")
    await gate.broker.decide(vote(request, "api:alice"))
    assert await refused(gate, vote(request, "api:carol")) == "not_pending"
    assert await refused(gate, vote(request, "api:carol", "deny", "too late")) == "not_pending"
    view = await ledger.get_call(request.id)
    assert view is not None and view.state == "approved" and [v["person"] for v in view.votes] == ["alice"]


async def test_an_expired_request_takes_no_votes(world: tuple[Gate, Store]) -> None:
    gate, ledger = world
    request = await held(gate, ledger, "write_short")
    assert request.expires is not None
    # Past its expiry, before any sweep has marked it expired (nothing sweeps in this world).
    with anyio.fail_after(10):
        while time.time() <= request.expires:
            await anyio.sleep(request.expires - time.time() + 0.01)
    assert await refused(gate, vote(request, "api:alice")) == "expired"
    view = await ledger.get_call(request.id)
    assert view is not None and view.state == "pending" and view.votes == []


async def test_a_reviewer_directory_maps_identities_to_people() -> None:
    directory = ReviewerDirectory(identities={"slack:U1": "alice", "api:alice": "alice"},
                                  groups_of={"alice": frozenset({"dba"})})
    assert directory.person("slack:U1") == directory.person("api:alice") == "alice"
    assert directory.person("slack:U2") is None


# -- an approver changes their mind ------------------------------------------------------------------------


async def test_an_approver_may_deny_while_the_request_waits_for_more_votes(world: tuple[Gate, Store]) -> None:
    gate, ledger = world
    request = await held(gate, ledger, "write_db")
    assert (await gate.broker.decide(vote(request, "api:alice"))).state == "pending"
    assert await refused(gate, vote(request, "api:alice", "deny")) == "reason_required"  # a denial needs a reason
    changed = await gate.broker.decide(vote(request, "api:alice", "deny", "wrong table"))
    assert changed.accepted and changed.state == "denied" and "who had approved" in changed.message
    votes = [e.payload for e in await ledger.events(request.id) if e.kind == "vote"]
    assert [(v["verdict"], v.get("changed_from")) for v in votes] == [("approve", None), ("deny", "approve")]
    view = await ledger.get_call(request.id)
    assert view is not None and view.state == "denied"
    assert [(v["person"], v["verdict"], v["reason"]) for v in view.votes] == [("alice", "deny", "wrong table")]
    # A deny stays final: neither alice nor anyone else turns it back.
    assert await refused(gate, vote(request, "api:alice")) == "not_pending"
    assert await refused(gate, vote(request, "api:carol")) == "not_pending"
    # The changed vote row agrees with the chain (the latest vote event), so the audit is clean.
    result, _ = await ledger.audit()
    assert result.ok, result.message
    assert (await kinds(ledger, request)).count("denied") == 1


async def test_an_approval_can_be_taken_back_until_the_call_is_claimed(world: tuple[Gate, Store]) -> None:
    gate, ledger = world
    request = await held(gate, ledger, "write_any")
    assert (await gate.broker.decide(vote(request, "api:alice"))).state == "approved"
    assert await refused(gate, vote(request, "api:carol", "deny", "not mine to take back")) == "not_pending"
    assert await refused(gate, vote(request, "api:alice")) == "not_pending"  # approving twice is not a change
    taken_back = await gate.broker.decide(vote(request, "api:alice", "deny", "I misread the table"))
    assert taken_back.accepted and taken_back.state == "denied" and "withdrawn" in taken_back.message
    denied = next(e for e in await ledger.events(request.id) if e.kind == "denied")
    assert denied.payload["person"] == "alice" and denied.payload["changed_vote"] is True
    # The agent comes back for its approved call: nothing runs, it is told who denied and why.
    ran: list[str] = []

    @guarded_tool(name="write_any")
    async def write_any(key: str) -> str:
        ran.append(key)
        return "done"

    async with agent() as calls:
        retry = calls.call(gate, write_any, {"key": "k"}, AGENT)
        second = await retry.request()
        assert second.id != request.id and second.state == "pending"  # a denied request is never rejoined
        calls.stop()
    assert ran == []
    assert [e.kind for e in await ledger.events(request.id)].count("execution.started") == 0
    result, _ = await ledger.audit()
    assert result.ok, result.message


async def test_once_the_call_is_claimed_to_run_an_approval_stands(world: tuple[Gate, Store]) -> None:
    gate, ledger = world
    running, release = anyio.Event(), anyio.Event()

    @guarded_tool(name="write_any")
    async def write_any(key: str) -> str:
        running.set()
        await release.wait()
        return "done"

    async with held_call(gate, write_any, {"key": "slow"}, AGENT) as call:
        request = await call.request()
        assert (await gate.broker.decide(vote(request, "api:alice"))).state == "approved"
        with anyio.fail_after(10):
            await running.wait()  # claimed (execution.started) and running
        result = await gate.broker.decide(vote(request, "api:alice", "deny", "too late"))
        assert (result.accepted, result.code) == (False, "not_pending") and "claimed to run" in result.message
        release.set()
        assert not (await call.result()).is_error
    view = await ledger.get_call(request.id)
    assert view is not None and view.state == "executed" and view.votes[0]["verdict"] == "approve"


async def test_a_denial_and_the_claim_to_run_race_and_exactly_one_wins(world: tuple[Gate, Store]) -> None:
    gate, ledger = world
    for key in ("first", "second"):
        request = await held(gate, ledger, "write_any", key)
        assert (await gate.broker.decide(vote(request, "api:alice"))).state == "approved"
        results: dict[str, object] = {}

        async def claim(request_id: str = request.id, results: dict[str, object] = results) -> None:
            results["claim"] = await ledger.transition(request_id, ("approved",), "running", "execution.started",
                                                       {"holder": "test"}, holder="test")

        async def deny(request_id: str = request.id, results: dict[str, object] = results) -> None:
            results["deny"] = (await gate.broker.decide(Verdict(request_id=request_id, reviewer="api:alice",
                                                                verdict="deny", reason="stop"))).accepted

        async with anyio.create_task_group() as tg:
            for step in ((claim, deny) if key == "first" else (deny, claim)):
                tg.start_soon(step)
        assert sorted([results["claim"], results["deny"]]) == [False, True], results
        view = await ledger.get_call(request.id)
        assert view is not None and view.state == ("running" if results["claim"] else "denied")
        ends = [e.kind for e in await ledger.events(request.id) if e.kind in ("denied", "execution.started")]
        assert len(ends) == 1
