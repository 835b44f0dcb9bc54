"""The chain is the authority: a held call runs only when chained events prove its approval. The `calls` and
`votes` tables changed behind keyturn's back (as someone with write access to the ledger file can) run nothing,
and the refusal is recorded."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from server.approvals.proof import prove_approval
from server.canonical import canonical_json
from server.gate import Gate
from server.ledger import Store
from server.ledger.chain import event_hash
from server.models import Verdict
from tests.helpers import agent, held_call
from tests.stores import Stores
from tests.test_gate import AGENT, Runs, terminal_kinds, world  # noqa: F401 (a fixture)


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def flip_to_approved(stores: Stores, request_id: str) -> None:
    stores.tamper(f"UPDATE calls SET state = 'approved' WHERE id = {_quoted(request_id)}")


def forge_vote_and_flip(stores: Stores, request_id: str) -> None:
    stores.tamper("INSERT INTO votes(call_id, person, reviewer, verdict, reason, groups, ts) "
                  f"VALUES ({_quoted(request_id)}, 'alice', 'api:alice', 'approve', 'forged', '[]', 0);"
                  f"UPDATE calls SET state = 'approved' WHERE id = {_quoted(request_id)}")


def edit_a_chained_vote(stores: Stores, request_id: str) -> None:
    """A real vote by someone the requester controls... rewritten in the chain to name an eligible reviewer."""
    [(seq, payload)] = stores.tamper(
        f"SELECT seq, payload FROM events WHERE call_id = {_quoted(request_id)} AND kind = 'vote.refused'")
    forged = {**json.loads(payload), "person": "alice", "reviewer": "api:alice", "verdict": "approve"}
    stores.tamper(f"UPDATE events SET kind = 'vote', payload = {_quoted(json.dumps(forged))} WHERE seq = {int(seq)};"
                  f"UPDATE calls SET state = 'approved' WHERE id = {_quoted(request_id)}")


@pytest.mark.parametrize("tamper", [flip_to_approved, forge_vote_and_flip, edit_a_chained_vote])
async def test_an_approval_only_the_tables_show_runs_nothing(world: tuple[Gate, Runs, Store],  # noqa: F811
                                                              tamper: Callable[[Stores, str], None],
                                                              stores: Stores) -> None:
    gate, runs, ledger = world
    async with held_call(gate, gate.tools["write_thing"], {"key": "k"}, AGENT) as call:  # type: ignore[attr-defined]
        request = await call.request()
        if tamper is edit_a_chained_vote:  # a vote the broker refused: chained, but not an approval
            refused = await gate.broker.decide(Verdict(request_id=request.id, reviewer="api:mallory", verdict="approve"))
            assert not refused.accepted, refused
        tamper(stores, request.id)
        result = await call.result(timeout=20)  # the waiting call reads its state again at its next round
    assert result.is_error and "not proven by the ledger's chain" in str(result.content), result
    assert runs.count == 0
    assert await terminal_kinds(ledger) == ["denied"]
    [denied] = [e for e in await ledger.events(request.id) if e.kind == "denied"]
    assert denied.payload["by"] == "keyturn" and denied.payload["code"] == "approval_not_proven"
    assert "execution.started" not in [e.kind for e in await ledger.events(request.id)]


async def test_a_real_approval_is_proven_and_runs(world: tuple[Gate, Runs, Store]) -> None:  # noqa: F811
    gate, runs, ledger = world
    async with held_call(gate, gate.tools["write_thing"], {"key": "k"}, AGENT) as call:  # type: ignore[attr-defined]
        request = await call.request()
        await gate.broker.decide(Verdict(request_id=request.id, reviewer="api:alice", verdict="approve"))
        result = await call.result()
    assert not result.is_error and runs.count == 1
    assert await terminal_kinds(ledger) == ["executed"]


def rewrite_and_rechain(stores: Stores, seq: int, kind: str, payload: dict[str, object],
                        then: tuple[str, str, dict[str, object]]) -> None:
    """Event `seq` rewritten, its hash recomputed, every event after it re-chained, and `then` (kind, call id,
    payload) appended, the head row too: a chain that verifies from end to end, as someone with write access to the
    ledger can make it."""
    rows = stores.tamper(f"SELECT seq, ts, kind, call_id, payload, prev_hash FROM events WHERE seq >= {int(seq)} "
                         "ORDER BY seq")
    statements, prev = [], rows[0][5]
    for at, ts, old_kind, call_id, old_payload, _ in rows:
        if at == seq:
            old_kind, old_payload = kind, canonical_json(payload)
        h = event_hash(prev, at, float(ts), old_kind, call_id, old_payload)
        statements.append(f"UPDATE events SET kind = {_quoted(old_kind)}, payload = {_quoted(old_payload)}, "
                          f"prev_hash = {_quoted(prev)}, hash = {_quoted(h)} WHERE seq = {int(at)}")
        prev = h
    at, ts, body = rows[-1][0] + 1, float(rows[-1][1]) + 1, canonical_json(then[2])
    h = event_hash(prev, at, ts, then[0], then[1], body)
    statements.append(f"INSERT INTO events(seq, ts, kind, call_id, payload, prev_hash, hash) VALUES ({at}, {ts!r}, "
                      f"{_quoted(then[0])}, {_quoted(then[1])}, {_quoted(body)}, {_quoted(prev)}, {_quoted(h)})")
    statements.append(f"UPDATE chain_head SET seq = {at}, hash = {_quoted(h)} WHERE id = 1")
    stores.tamper(";".join(statements))


async def test_a_vote_rewritten_and_rechained_after_it_was_verified_runs_nothing(
        world: tuple[Gate, Runs, Store], stores: Stores) -> None:  # noqa: F811
    """The process proves each approval from the chain it has verified so far, not the whole stretch again: a
    chained event it verified and someone changed afterwards, however consistently re-chained, proves nothing."""
    gate, runs, ledger = world
    write_thing = gate.tools["write_thing"]  # type: ignore[attr-defined]
    async with agent() as calls:
        first = calls.call(gate, write_thing, {"key": "first"}, AGENT)
        first_request = await first.request()
        second = calls.call(gate, write_thing, {"key": "second"}, AGENT)
        request = await second.request()
        refused = await gate.broker.decide(Verdict(request_id=request.id, reviewer="api:mallory", verdict="approve"))
        assert not refused.accepted, refused
        # Proving the first approval verifies the chain, the second request's events (its refused vote) included.
        await gate.broker.decide(Verdict(request_id=first_request.id, reviewer="api:alice", verdict="approve"))
        assert not (await first.result(timeout=20)).is_error and runs.count == 1

        [(seq, payload)] = stores.tamper(
            f"SELECT seq, payload FROM events WHERE call_id = {_quoted(request.id)} AND kind = 'vote.refused'")
        forged = {**json.loads(payload), "person": "alice", "reviewer": "api:alice", "verdict": "approve"}
        [granted] = [e for e in await ledger.events(first_request.id) if e.kind == "approval.granted"]
        view = await ledger.get_call(request.id)
        assert view is not None and view.policy_digest is not None
        grant = {**granted.payload, "args_hash": view.args_hash}
        rewrite_and_rechain(stores, int(seq), "vote", forged, then=("approval.granted", request.id, grant))
        async with stores.new() as fresh:  # the forgery is complete: from scratch, the chain proves the approval
            assert (await fresh.verify()).ok
            assert await prove_approval(fresh, request.id, args_hash=view.args_hash, policy_digest=view.policy_digest,
                                        directory=gate.broker.directory) is None
        flip_to_approved(stores, request.id)
        result = await second.result(timeout=20)
    assert result.is_error and "not proven by the ledger's chain" in str(result.content), result
    assert runs.count == 1
    [denied] = [e for e in await ledger.events(request.id) if e.kind == "denied"]
    assert denied.payload["code"] == "approval_not_proven"
    assert "after it was verified" in denied.payload["reason"], denied.payload
    assert "execution.started" not in [e.kind for e in await ledger.events(request.id)]
