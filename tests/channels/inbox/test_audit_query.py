"""The audit search (`Ledger.search_calls`), its filter parsing, the CSV export's cells and the timeline's words."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from server.approvals import ApprovalBroker, directory_from
from server.channels.inbox.audit import AuditQuery, BadFilter, csv_cell, parse_time
from server.channels.inbox.render import classify_argument, describe
from server.ledger import CallFilter, Ledger
from server.models import Event, ReviewSpec, Verdict


async def seeded(tmp_path: Path) -> tuple[Ledger, ApprovalBroker]:
    ledger = await Ledger(tmp_path / "l.db").open()
    broker = ApprovalBroker(ledger=ledger, directory=directory_from(
        [("api:alice", "alice"), ("api:carol", "carol")], {}))
    for i, (tool, principal, state) in enumerate([
        ("sql_query", "agent-a", "executed"), ("sql_execute", "agent-a", "pending"),
        ("shell_run", "agent-b", "pending"), ("sql_execute", "agent-b", "denied"),
    ]):
        await ledger.open_call(call_id=f"c{i}", tool=tool, principal=principal, on_behalf_of="bob" if i == 2 else None,
                               model=None, args_hash=f"h{i}", redacted_arguments={"i": i}, state=state, holder=None,
                               review=ReviewSpec(), events=[("call.received", {"i": i})])
    await broker.decide(Verdict(request_id="c1", reviewer="api:alice", verdict="approve", reason="ok"))
    await broker.decide(Verdict(request_id="c2", reviewer="api:carol", verdict="deny", reason="no"))
    return ledger, broker


async def ids(ledger: Ledger, **where: object) -> list[str]:
    return [v.id for v in await ledger.search_calls(CallFilter(**where))]  # type: ignore[arg-type]


async def test_each_filter_narrows_and_together_they_and(tmp_path: Path) -> None:
    ledger, _ = await seeded(tmp_path)
    try:
        assert await ids(ledger) == ["c3", "c2", "c1", "c0"]  # newest first
        assert await ids(ledger, tool="sql") == ["c3", "c1", "c0"]  # a substring of the tool name
        assert await ids(ledger, tool="sql_execute", principal="agent-b") == ["c3"]
        assert await ids(ledger, principal="bob") == ["c2"]  # the person an agent acts for
        assert await ids(ledger, reviewer="alice") == ["c1"]
        assert await ids(ledger, reviewer="api:carol") == ["c2"]
        assert await ids(ledger, state="denied") == ["c3", "c2"]
        assert await ids(ledger, state="approved") == ["c1"]
        assert await ids(ledger, since=time.time() + 60) == []
        assert await ids(ledger, until=time.time() + 60, since=time.time() - 60) == ["c3", "c2", "c1", "c0"]
        # hostile text is a value, never SQL
        assert await ids(ledger, tool="' OR 1=1 --") == []
        assert await ids(ledger, reviewer="x') OR ('1'='1") == []
        first = await ledger.search_calls(CallFilter(), limit=2)
        rest = await ledger.search_calls(CallFilter(), limit=2, before=(first[-1].created, first[-1].id))
        assert [v.id for v in first + rest] == ["c3", "c2", "c1", "c0"]
        votes = {v.id: v.votes for v in await ledger.search_calls(CallFilter())}
        assert [x["person"] for x in votes["c1"]] == ["alice"] and votes["c0"] == []
        facets = await ledger.call_facets()
        assert facets == {"tools": ["shell_run", "sql_execute", "sql_query"], "principals": ["agent-a", "agent-b"],
                          "reviewers": ["alice", "carol"]}
    finally:
        await ledger.close()


def test_filters_parse_from_the_query_string() -> None:
    q = AuditQuery.parse({"tool": " sql ", "outcome": "denied", "since": "2025-01-02", "until": "2025-01-02"})
    assert q.where.tool == "sql" and q.where.state == "denied"
    assert q.where.until is not None and q.where.since is not None and q.where.until - q.where.since == 86400
    assert q.link("/audit/export.csv") == "/audit/export.csv?tool=sql&outcome=denied&since=2025-01-02&until=2025-01-02"
    assert AuditQuery.parse({}).where == CallFilter()
    assert parse_time("2025-01-02T03:04", end=False) == parse_time("2025-01-02T03:04:00+00:00", end=False)
    for bad in ({"outcome": "maybe"}, {"since": "yesterday"}, {"before": "x:y"}):
        with pytest.raises(BadFilter):
            AuditQuery.parse(bad)


def test_csv_cells_never_start_a_formula() -> None:
    assert csv_cell("=HYPERLINK(\"x\")") == "'=HYPERLINK(\"x\")"
    assert [csv_cell(v) for v in ("+1", "-1", "@a", "plain", None, {"a": 1})] == [
        "'+1", "'-1", "'@a", "plain", "", '{"a": 1}']


def test_arguments_render_as_sql_shell_or_text() -> None:
    assert classify_argument("statement", "DELETE FROM t", None).kind == "sql"
    assert classify_argument("x", "rm -rf /", "shell").kind == "shell"
    argv = classify_argument("argv", ["ls", "-l", "a b"], "argv")
    assert (argv.kind, argv.text) == ("shell", "ls -l 'a b'")
    assert classify_argument("path", "/tmp/x", "path").kind == "text"
    assert classify_argument("limit", 5, None).kind == "json"


def event(kind: str, payload: dict[str, object]) -> Event:
    return Event(seq=1, ts=0.0, kind=kind, call_id="c", payload=payload, prev_hash="0", hash="1")


def test_timeline_entries_say_what_happened() -> None:
    assert describe(event("vote", {"person": "alice", "verdict": "approve", "channel": "web"})).title == "alice approved"
    assert describe(event("denied", {"by": "reviewer", "person": "carol", "reason": "no"})).title == "Denied by carol"
    assert describe(event("denied", {"by": "policy", "reason": "r"})).title == "Denied by policy"
    assert describe(event("expired", {"reason": "timeout"})).title == "Expired"
    executed = describe(event("executed", {"result_digest": "abc"}))
    assert (executed.title, executed.digest, executed.tone) == ("Executed", "abc", "good")
    decision = describe(event("decision", {"outcome": "review", "rules": [{"id": "r1"}], "policy_digest": "d"}))
    assert decision.rules == [{"id": "r1"}] and decision.tone == "warn"
    assert describe(event("something.new", {})).title == "something.new"
