"""Replay: which recorded calls would a candidate policy decide differently?"""

from __future__ import annotations

from server.classify import ClassifyContext, extract_facts
from server.policy import parse_policy
from server.policy.replay import replay, summarise
from server.policy.testing import call_for

STRICT = "version: 1\ndefault: review\nrules:\n  - {id: reads, tool: sql_query, when: facts.sql.read_only, outcome: allow}\n"


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
