"""The chain is the authority: a held call runs only when chained events prove its approval. The `calls` and
`votes` tables changed behind keyturn's back (as someone with write access to the ledger file can) run nothing,
and the refusal is recorded."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from server.gate import Gate
from server.ledger import Store
from server.models import Verdict
from tests.helpers import held_call
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
