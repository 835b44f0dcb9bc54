"""Standing grants in the ledger, on both stores: made by the broker from a real held request, used by the gate's
own functions, raced for their last use by two processes, ended by revocation and expiry, and refused when their
rows were changed behind keyturn's back. The chain verifies, tables included, after all of it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from server.approvals import ApprovalBroker, directory_from
from server.approvals.grants import (
    GrantRefused,
    GrantSpec,
    ProposedGrant,
    consent,
    covers,
    expire_due,
    find_cover,
    make_grant,
    parse_spec,
    prepare_grant,
    propose,
    revoke,
    use_grant,
)
from server.canonical import args_hash
from server.classify import ClassifyContext
from server.errors import PolicyError
from server.gate import Gate, Identity
from server.guarded import guarded_tool
from server.ledger import Store
from server.metrics import Metrics
from server.models import Decision, RequestView, ToolCall, Verdict
from server.policy import LivePolicy
from server.policy.loader import load_policy
from tests.helpers import left_pending
from tests.stores import Stores

POLICY = """
version: 1
default: review
review: {timeout: 10m, approvers: [{any: true}], grants: {max_for: 1h, max_uses: 5}}
rules:
  - {id: any-one, tool: write_any, outcome: review, risk: high, reason: one reviewer}
  - {id: crit, tool: write_crit, outcome: review, risk: critical, reason: critical}
  - {id: crit-ok, tool: write_crit_ok, outcome: review, risk: critical, grants: true, reason: "critical, allowed"}
  - {id: no-grants, tool: write_never, outcome: review, risk: low, grants: false, reason: never}
"""

AGENT = Identity(principal="agent-1", on_behalf_of="olive")
TOOLS = ("write_any", "write_crit", "write_crit_ok", "write_never")


def tool(name: str) -> Any:
    @guarded_tool(name=name)
    async def run(key: str) -> str:
        return "done"

    return run


@pytest.fixture
async def world(tmp_path: Path, stores: Stores) -> AsyncIterator[tuple[Gate, Store, Stores]]:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    policy = LivePolicy(policy_file)
    policy.load()
    directory = directory_from([("api:alice", "alice"), ("api:carol", "carol"), ("api:olive", "olive"),
                                ("api:agent-1", "agent-1")], {})  # an agent principal that is also a reviewer
    async with stores.new() as ledger:
        broker = ApprovalBroker(ledger=ledger, directory=directory, poll_interval_s=0.05)
        gate = Gate(ledger=ledger, broker=broker, policy=policy, classify_context=ClassifyContext(),
                    progress_interval_s=0.2)
        gate.tools = {name: tool(name) for name in TOOLS}  # type: ignore[attr-defined]
        yield gate, ledger, stores


async def held(gate: Gate, ledger: Store, name: str, key: str = "k") -> RequestView:
    request = await left_pending(gate, gate.tools[name], {"key": key}, AGENT)  # type: ignore[attr-defined]
    view = await ledger.get_call(request.id)
    assert view is not None and view.state == "pending"
    return view


async def judged(gate: Gate, ledger: Store, view: RequestView, spec: GrantSpec) -> ProposedGrant | GrantRefused:
    events, broken = await ledger.call_chain(view.id)
    assert broken is None
    return prepare_grant(gate.policy.current, view, events, spec)


async def granted(gate: Gate, ledger: Store, name: str = "write_any", uses: int = 2, key: str = "k") -> str:
    """A grant made by alice approving a held request for `name` with a grant: its id."""
    view = await held(gate, ledger, name, key)
    proposed = await judged(gate, ledger, view, GrantSpec(for_s=600, uses=uses))
    assert isinstance(proposed, ProposedGrant), proposed
    result = await gate.broker.decide(Verdict(request_id=view.id, reviewer="api:alice", verdict="approve",
                                              reason="ok"), grant=proposed)
    assert result.accepted and "standing grant" in result.message, result
    (row,) = await ledger.grants()
    assert row["request_id"] == view.id
    return str(row["id"])


def later_call(name: str = "write_any", key: str = "k", who: Identity = AGENT) -> ToolCall:
    arguments = {"key": key}
    return ToolCall(call_id=uuid.uuid4().hex, tool=name, arguments=arguments, args_hash=args_hash(arguments),
                    principal=who.principal, on_behalf_of=who.on_behalf_of)


def decided(gate: Gate, call: ToolCall) -> Decision:
    return gate.policy.current.decide(call, {})


async def test_the_last_use_raced_by_two_processes_is_won_once(world: tuple[Gate, Store, Stores]) -> None:
    gate, ledger, stores = world
    grant_id = await granted(gate, ledger, uses=1)
    row = await ledger.grant(grant_id)
    assert row is not None
    calls = [later_call(), later_call()]
    won: list[Any] = []
    async with stores.new() as other:  # a second keyturn process on the same ledger
        async def use(store: Store, call: ToolCall) -> None:
            won.append(await use_grant(store, row, call, dict(call.arguments), decided(gate, call), "proc",
                                       gate.broker.directory))

        async with anyio.create_task_group() as tg:
            tg.start_soon(use, ledger, calls[0])
            tg.start_soon(use, other, calls[1])
    assert sum(1 for w in won if w is not None) == 1
    used = [e for e in await ledger.events(grant_id)]
    assert [e.kind for e in used] == ["grant.created", "grant.used", "grant.expired"]
    assert used[2].payload["reason"] == "its uses ran out"
    winner = used[1].payload["call_id"]
    assert (await ledger.get_call(winner)).state == "running"  # type: ignore[union-attr]
    loser = next(c for c in calls if c.call_id != winner)
    assert await ledger.get_call(loser.call_id) is None  # nothing recorded for the loser: it is held as usual
    assert await find_cover(ledger, later_call(), decided(gate, later_call())) is None
    result, _ = await ledger.audit()
    assert result.ok, result.message


async def test_a_covered_call_runs_through_the_gate_once_and_metrics_count_the_use(
        world: tuple[Gate, Store, Stores]) -> None:
    gate, ledger, _ = world
    metrics = Metrics(ledger, held_now=lambda: 0)
    try:
        grant_id = await granted(gate, ledger, uses=2)
        with anyio.fail_after(10):
            result = await gate.call(gate.tools["write_any"], {"key": "k"}, AGENT)  # type: ignore[attr-defined]
        assert not result.is_error and grant_id in result.content[0].text  # type: ignore[union-attr]
        assert b'keyturn_grant_uses_total{tool="write_any"} 1.0' in metrics.exposition()
        assert b"agent-1" not in metrics.exposition() and b"alice" not in metrics.exposition()
    finally:
        metrics.close()
    used = next(e for e in await ledger.events(grant_id) if e.kind == "grant.used")
    assert [e.kind for e in await ledger.events(used.payload["call_id"])] == [
        "call.received", "decision", "execution.started", "executed"]
    result_, _ = await ledger.audit()
    assert result_.ok, result_.message


async def test_a_grant_never_covers_another_principal_tool_argument_or_decision(
        world: tuple[Gate, Store, Stores]) -> None:
    gate, ledger, _ = world
    grant_id = await granted(gate, ledger)
    row = await ledger.grant(grant_id)
    assert row is not None
    now = row["created"] + 1
    same = later_call()
    assert covers(row, same, decided(gate, same), now)
    for other in (later_call(key="other"), later_call(who=Identity("agent-2", "olive")),
                  later_call(who=Identity("agent-1")), later_call(who=Identity("agent-1", "alice"))):
        assert not covers(row, other, decided(gate, other), now), other
    crit = later_call("write_crit")
    assert not covers(row, crit.model_copy(update={"tool": "write_any"}), decided(gate, crit), now)
    denied = decided(gate, same).model_copy(update={"outcome": "deny"})
    assert not covers(row, same, denied, now)
    other_policy = decided(gate, same).model_copy(update={"policy_digest": "x" * 64})
    assert not covers(row, same, other_policy, now)
    assert not covers(row, same, decided(gate, same), row["expires"])  # its time has passed


async def test_revoked_expired_or_tampered_grants_are_not_used(world: tuple[Gate, Store, Stores]) -> None:
    gate, ledger, stores = world
    grant_id = await granted(gate, ledger, uses=5)
    row = await ledger.grant(grant_id)
    assert row is not None
    call = later_call()
    # A row changed behind keyturn's back (more uses, a later expiry) is not used: the chain disagrees.
    stores.tamper(f"UPDATE grants SET uses = 50 WHERE id = '{grant_id}'")
    tampered = await ledger.grant(grant_id)
    assert await use_grant(ledger, tampered, call, dict(call.arguments), decided(gate, call), "p",
                            gate.broker.directory) is None  # type: ignore[arg-type]
    stores.tamper(f"UPDATE grants SET uses = 5 WHERE id = '{grant_id}'")
    # A grant forged as a row alone (no chained grant.created) is never used.
    stores.tamper("INSERT INTO grants(id, request_id, principal, on_behalf_of, tool, spec, created, expires, uses, "
                  f"used, state) SELECT 'gforged', request_id, principal, on_behalf_of, tool, spec, created, "
                  f"expires + 1000, 100, 0, 'live' FROM grants WHERE id = '{grant_id}'")
    forged = await ledger.grant("gforged")
    assert forged is not None
    assert await use_grant(ledger, forged, call, dict(call.arguments), decided(gate, call), "p",
                            gate.broker.directory) is None
    stores.tamper("DELETE FROM grants WHERE id = 'gforged'")

    assert await revoke(ledger, grant_id, person="carol", reviewer="api:carol", reason="done", channel="api") is None
    again = await revoke(ledger, grant_id, person="carol", reviewer="api:carol", reason="twice", channel="api")
    assert again is not None and again.code == "not_live"
    assert (await revoke(ledger, "gnone", person="carol", reviewer="api:carol", reason="x", channel="api")).code == \
        "unknown"  # type: ignore[union-attr]
    assert await find_cover(ledger, call, decided(gate, call)) is None
    # Reviving the revoked row by hand does not revive the grant.
    stores.tamper(f"UPDATE grants SET state = 'live' WHERE id = '{grant_id}'")
    revived = await ledger.grant(grant_id)
    assert await use_grant(ledger, revived, call, dict(call.arguments), decided(gate, call), "p",
                            gate.broker.directory) is None  # type: ignore[arg-type]
    stores.tamper(f"UPDATE grants SET state = 'revoked' WHERE id = '{grant_id}'")

    # Expiry by time, at housekeeping.
    second = await granted_again(gate, ledger)
    row2 = await ledger.grant(second)
    assert await expire_due(ledger, now=row2["created"] + 1) == 0  # type: ignore[index]
    assert await expire_due(ledger, now=row2["expires"] + 1) == 1  # type: ignore[index]
    ended = [e for e in await ledger.events(second) if e.kind == "grant.expired"]
    assert [e.payload["reason"] for e in ended] == ["its time passed"]
    kinds = [e.kind for e in await ledger.events(grant_id)]
    assert kinds == ["grant.created", "grant.revoked"]
    result, _ = await ledger.audit()
    assert result.ok, result.message


async def granted_again(gate: Gate, ledger: Store) -> str:
    before = {r["id"] for r in await ledger.grants(live_only=False)}
    view = await held(gate, ledger, "write_any", "k2")
    proposed = await judged(gate, ledger, view, GrantSpec(for_s=60, uses=1))
    assert isinstance(proposed, ProposedGrant)
    result = await gate.broker.decide(Verdict(request_id=view.id, reviewer="api:alice", verdict="approve"),
                                      grant=proposed)
    assert result.accepted
    (new,) = [r["id"] for r in await ledger.grants(live_only=False) if r["id"] not in before]
    return str(new)


async def test_what_the_policy_forbids_or_caps_is_refused_and_the_request_stays_pending(
        world: tuple[Gate, Store, Stores]) -> None:
    gate, ledger, _ = world
    for name, allowed in (("write_crit", False), ("write_never", False), ("write_crit_ok", True)):
        view = await held(gate, ledger, name)
        proposed = await judged(gate, ledger, view, GrantSpec(for_s=60, uses=1))
        assert isinstance(proposed, ProposedGrant) is allowed, (name, proposed)
        if not allowed:
            assert isinstance(proposed, GrantRefused) and proposed.code == "grants_forbidden"
            result = await gate.broker.decide(Verdict(request_id=view.id, reviewer="api:alice", verdict="approve"),
                                              grant=proposed)
            assert not result.accepted and result.status == 400
            assert (await ledger.get_call(view.id)).state == "pending"  # type: ignore[union-attr]
    view = await held(gate, ledger, "write_any")
    for spec, cap in ((GrantSpec(for_s=3601, uses=1), "max_for"), (GrantSpec(for_s=60, uses=6), "max_uses")):
        refused = await judged(gate, ledger, view, spec)
        assert isinstance(refused, GrantRefused) and refused.code == "over_limit" and cap in refused.message
    # The requester (the person it acts for) cannot make a grant for its own agent.
    proposed = await judged(gate, ledger, view, GrantSpec(for_s=60, uses=1))
    selfie = await gate.broker.decide(Verdict(request_id=view.id, reviewer="api:olive", verdict="approve"),
                                      grant=proposed)
    assert not selfie.accepted and selfie.code == "self_approval"
    itself = await gate.broker.decide(Verdict(request_id=view.id, reviewer="api:agent-1", verdict="approve"),
                                      grant=proposed)
    assert not itself.accepted and itself.code == "self_approval"
    assert await ledger.grants(live_only=False) == []


def test_grant_specs_are_strict() -> None:
    assert parse_spec({"for": "1h", "uses": 5, "when": "args.x == 1"}) == GrantSpec(3600.0, 5, "args.x == 1")
    for body, code in (({"for": "1h"}, "bad_request"), ({"uses": 1}, "bad_request"), ([], "bad_request"),
                       ({"for": "1h", "uses": 0}, "bad_request"), ({"for": "1h", "uses": True}, "bad_request"),
                       ({"for": "-1s", "uses": 1}, "bad_request"), ({"for": "1h", "uses": 1, "when": ""}, "bad_request"),
                       ({"for": "1h", "uses": 1, "forever": True}, "unknown_field")):
        refused = parse_spec(body)
        assert isinstance(refused, GrantRefused) and refused.code == code, body
    unknown = parse_spec({"for": "1h", "uses": 1, "principal": "*", "tool": "*"})
    assert isinstance(unknown, GrantRefused) and unknown.fields == ("grant.principal", "grant.tool")


def test_the_proposal_binds_what_the_call_acts_on() -> None:
    sql = {"sql": {"present": True, "tables": ["orders"], "kinds": ["delete"]}}
    assert propose({"statement": "x"}, sql) == 'facts.sql.tables == ["orders"] && facts.sql.kinds == ["delete"]'
    measured = {"sql": {**sql["sql"], "rows_affected": 12}}
    assert propose({}, measured).endswith("facts.sql.rows_affected <= 12")
    assert propose({"key": "k", "n": 1}, {}) == 'args == {"key": "k", "n": 1}'


def test_grants_in_the_policy_file_are_checked(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("version: 1\nreview: {grants: false}\nrules: [{id: r, tool: t, outcome: review}]\n")
    policy = load_policy(f)
    assert policy.grant_limits is None
    assert "forbids standing grants" in str(policy.grant_refusal(Decision(
        outcome="review", risk="low", reason="", policy_digest=policy.digest)))
    for text, fragment in (
            ("rules: [{id: r, tool: t, outcome: allow, grants: true}]", "only applies to outcome review"),
            ("rules: [{id: r, tool: t, outcome: review, review: {grants: {max_uses: 2}}}]", "top-level review"),
            ("review: {grants: {max_for: 1h, max_uses: 0}}", "max_uses"),
            ("review: {grants: {max_for: 1h, forever: true}}", "forever")):
        f.write_text(f"version: 1\n{text}\n")
        with pytest.raises(PolicyError, match=fragment):
            load_policy(f)


async def test_a_grant_chained_without_the_approvals_that_make_one_is_never_used(
        world: tuple[Gate, Store, Stores]) -> None:
    """Someone who can write the ledger appends a well-hashed grant.created (and its row) for a request nobody
    approved, or approved without agreeing to a grant: the chain of that request does not prove it, so it runs
    nothing."""
    gate, ledger, _ = world
    view = await held(gate, ledger, "write_any")
    proposed = await judged(gate, ledger, view, GrantSpec(for_s=600, uses=5))
    assert isinstance(proposed, ProposedGrant)
    row = await ledger.transaction(lambda tx: tx.call_row(view.id))
    forged = await ledger.transaction(lambda tx: make_grant(tx, row, proposed, [consent(proposed)], ["alice"],
                                                            person="alice", reviewer="api:alice", reason=None,
                                                            channel="api"))
    call = later_call()
    grant_row = await ledger.grant(forged)
    assert grant_row is not None and covers(grant_row, call, decided(gate, call), grant_row["created"] + 1)
    assert await use_grant(ledger, grant_row, call, dict(call.arguments), decided(gate, call), "p",
                           gate.broker.directory) is None
    # Approved for the call alone, then a grant chained beside it: still not proven.
    result = await gate.broker.decide(Verdict(request_id=view.id, reviewer="api:alice", verdict="approve"))
    assert result.accepted and "standing grant" not in result.message
    assert await use_grant(ledger, grant_row, call, dict(call.arguments), decided(gate, call), "p",
                           gate.broker.directory) is None
    assert not [e for e in await ledger.events(forged) if e.kind == "grant.used"]
