"""Replay: which recorded calls would a candidate policy decide differently?"""

from __future__ import annotations

import io
from pathlib import Path

from server.classify import ClassifyContext, extract_facts
from server.config import Settings
from server.policy import parse_policy
from server.policy.replay import cmd_replay, replay, summarise
from server.policy.testing import call_for

STRICT = (
    "version: 1\ndefault: review\nrules:\n  - {id: reads, tool: sql_query, when: facts.sql.read_only, outcome: allow}\n"
)


def recorded(tool: str, args: dict, outcome: str) -> tuple:
    call = call_for(tool, args)
    return call, extract_facts(tool, args, {"query": "sql"}, {}, ClassifyContext()), outcome


def test_only_changed_decisions_are_reported_with_their_direction() -> None:
    calls = [
        recorded("sql_query", {"query": "SELECT 1"}, "allow"),  # unchanged
        recorded("sql_query", {"query": "DELETE FROM t"}, "allow"),  # was allowed, now reviewed
        recorded("shell_run", {"command": "ls"}, "deny"),  # was denied, now reviewed
    ]
    changes = replay(parse_policy(STRICT), calls)
    assert [(c["tool"], c["before"], c["after"], c["direction"]) for c in changes] == [
        ("sql_query", "allow", "review", "stricter"),
        ("shell_run", "deny", "review", "looser"),
    ]
    assert summarise(changes, len(calls)).startswith("3 call(s) replayed: 2 would change (1 looser, 1 stricter)")


def test_nothing_changes_under_the_same_policy() -> None:
    policy = parse_policy(STRICT)
    calls = [recorded("sql_query", {"query": q}, "") for q in ("SELECT 1", "DELETE FROM t")]
    calls = [(c, f, policy.decide(c, f).outcome) for c, f, _ in calls]
    assert replay(policy, calls) == []


async def test_cmd_replay_reads_decided_calls_from_the_ledger(tmp_path: Path) -> None:
    from server.ledger import Ledger

    db = tmp_path / "keyturn.db"
    ledger = await Ledger(db).open()
    try:
        for call_id, query, outcome in [("c1", "SELECT 1", "allow"), ("c2", "DELETE FROM t", "allow")]:
            call, facts, _ = recorded("sql_query", {"query": query}, outcome)
            received = {
                "tool": call.tool,
                "arguments": call.arguments,
                "args_hash": call.args_hash,
                "principal": "agent",
            }
            await ledger.append("call.received", call_id, received)
            await ledger.append("decision", call_id, {"outcome": outcome, "facts": facts})
    finally:
        await ledger.close()
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(STRICT)
    out = io.StringIO()
    assert await cmd_replay(candidate, Settings(db=db), out=out) == 0
    text = out.getvalue()
    assert text.startswith("2 call(s) replayed: 1 would change (0 looser, 1 stricter)")
    assert "c2  sql_query  allow -> review" in text
