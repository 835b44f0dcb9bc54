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
from tests.helpers import left_pending
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
