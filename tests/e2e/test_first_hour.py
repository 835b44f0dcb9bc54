"""A newcomer's first hour, through the SDK's client against `keyturn serve` on its embedded defaults (the shipped
policy, the SQL pack on ./data.db, a ledger beside it) in an empty directory: the first read runs, a call the tool
would refuse is denied at once by keyturn (one terminal event, nobody asked), whatever its spelling, and the ledger
tells each end in the agent's own words."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from tests.conftest import ROOT
from tests.helpers import outcome_of

# What sql_query (which runs read-only) refuses, spelled as nobody listed: SQLite compiles each under the run's guard.
QUERY_REFUSED = [
    "ATTACH DATABASE 'x.db' AS x",
    "attach database ':memory:' as m",
    "ATTACH (WITH a AS (SELECT 'x.db' AS f) SELECT f FROM a) AS x",
    "DELETE FROM users",
    "/* report */ dElEtE\nFROM users -- every row",
    "WITH x AS (SELECT 1) DELETE FROM users",
    "WITH gone AS (DELETE FROM users RETURNING *) SELECT 1",
    "INSERT INTO missing_table VALUES (1)",
    "REPLACE INTO users VALUES (1)",
    "UPDATE users SET id = 2",
    "pragma USER_VERSION=7",
    "PRAGMA main.journal_mode = delete",
    "PRAGMA writable_schema = 1",
    "VACUUM",
    "vAcUuM main InTo 'copy.db'",
    "CREATE TEMP TABLE t(x)",
    "BEGIN",
    "SAVEPOINT a",
    "ANALYZE",
    "DROP TABLE users",
]
# What sql_execute refuses whatever the decision.
EXECUTE_REFUSED = [
    "VACUUM INTO 'copy.db'",
    "vacuum   into\n'copy.db'",
    "ATTACH ('x' || '.db') AS y",
    "DETACH main",
    "pragma TEMP_STORE_DIRECTORY = '/tmp'",
    "PRAGMA soft_heap_limit = 1",
]


def text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


@asynccontextmanager
async def fresh_serve(home: Path) -> AsyncIterator[Client]:
    params = StdioServerParameters(command=sys.executable, args=["-m", "server.cli", "serve"],
                                   env={"PYTHONPATH": str(ROOT)}, cwd=str(home))
    with appending(home / "serve.log") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:
            yield client


def appending(log: Path) -> TextIO:
    """The server's stderr, a real file (the child process writes to it)."""
    return open(log, "a", encoding="utf-8")


def ledger(home: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(home / "keyturn.db") as conn:
        rows = conn.execute("SELECT kind, call_id, payload FROM events ORDER BY seq").fetchall()
    return [{"kind": k, "call_id": c, "payload": json.loads(p)} for k, c, p in rows]


def states(home: Path) -> dict[str, str]:
    with sqlite3.connect(home / "keyturn.db") as conn:
        return dict(conn.execute("SELECT id, state FROM calls"))


async def test_a_fresh_install_answers_its_first_read(tmp_path: Path) -> None:
    assert not (tmp_path / "data.db").exists()
    with anyio.fail_after(120):
        async with fresh_serve(tmp_path) as client:
            first = await client.call_tool("sql_query", {"query": "SELECT 1 AS one"})
    assert not first.is_error, text(first)
    assert first.structured_content == {"columns": ["one"], "rows": [[1]], "row_count": 1, "truncated": False}
    assert (tmp_path / "data.db").exists()
    assert [e["kind"] for e in ledger(tmp_path) if e["call_id"]] == ["call.received", "decision", "executed"]


async def test_a_call_the_tool_would_refuse_is_denied_before_anyone_is_asked(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "data.db") as conn:
        conn.executescript("CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT); INSERT INTO users(name) VALUES ('a');")
    calls = [("sql_query", {"query": q}) for q in QUERY_REFUSED]
    calls += [("sql_execute", {"statement": s}) for s in EXECUTE_REFUSED]
    calls += [("sql_export", {"path": "out.csv", "query": "DELETE FROM users"})]
    results = []
    with anyio.fail_after(300):  # (a held call would wait here for 15 minutes: the bound fails it first)
        async with fresh_serve(tmp_path) as client:
            for tool, arguments in calls:
                results.append(await client.call_tool(tool, arguments))
            # Still served as before: a read runs, an EXPLAIN (which the check cannot prefix) is judged by the policy.
            read = await client.call_tool("sql_query", {"query": "SELECT count(*) AS n FROM users"})
            plan = await client.call_tool("sql_query", {"query": "EXPLAIN QUERY PLAN SELECT * FROM users"})
    assert not read.is_error and not plan.is_error, (text(read), text(plan))

    events = ledger(tmp_path)
    ended = states(tmp_path)
    for (tool, arguments), result in zip(calls, results, strict=True):
        details = outcome_of(result)
        assert result.is_error and details["outcome"] == "denied" and details["by"] == "keyturn", (arguments, details)
        assert details["code"] == "tool_refuses", (arguments, details)
        assert text(result).startswith(f"Denied by keyturn: {tool} would refuse it: "), text(result)
        mine = [e for e in events if e["call_id"] == details["call_id"]]
        # Exactly one terminal event, no decision asked of the policy, nobody asked to approve.
        assert [e["kind"] for e in mine] == ["call.received", "denied"], (arguments, mine)
        assert mine[1]["payload"] == {"by": "keyturn", "code": "tool_refuses", "reason": details["reason"]}
        kept = mine[0]["payload"]["arguments"]  # what was refused is kept (normalised and redacted like any call)
        sql = "statement" if tool == "sql_execute" else "query"
        assert kept[sql] == arguments[sql], kept
        assert ended[details["call_id"]] == "denied"
    assert not any(e["kind"] == "approval.requested" for e in events)
    with sqlite3.connect(tmp_path / "data.db") as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (1,)
        assert conn.execute("PRAGMA user_version").fetchone() == (0,)
    assert not (tmp_path / "copy.db").exists() and not (tmp_path / "x.db").exists()


async def test_every_end_reads_the_same_to_the_agent_and_in_the_ledger(tmp_path: Path) -> None:
    """The agent's `outcome` is the ledger's terminal event, for a run, a failure, a policy's denial, invalid
    arguments and a refusal; `audit tail` and `audit show` print each without a placeholder."""
    calls = [
        ("sql_query", {"query": "SELECT 1"}),  # executed
        ("sql_query", {"query": "SELECT * FROM no_such_table"}),  # allowed, then failed
        ("sql_execute", {"statement": "DROP TABLE IF EXISTS t; DROP TABLE u"}),  # invalid: two statements
        ("sql_query", {"query": 42}),  # invalid arguments
        ("sql_query", {"query": "DELETE FROM users"}),  # refused: the tool runs read-only
    ]
    with anyio.fail_after(120):
        async with fresh_serve(tmp_path) as client:
            results = [await client.call_tool(tool, arguments) for tool, arguments in calls]
    events = ledger(tmp_path)
    terminal = {"executed", "failed", "denied", "expired", "cancelled", "abandoned"}
    told = [outcome_of(r).get("outcome", "executed") for r in results]
    ends = [next(e["kind"] for e in events if e["call_id"] == call_id and e["kind"] in terminal)
            for call_id in [e["call_id"] for e in events if e["kind"] == "call.received"]]
    assert told == ends == ["executed", "failed", "denied", "denied", "denied"], (told, ends)

    tail = await anyio.run_process([sys.executable, "-m", "server.cli", "audit", "tail", "-n", "50"], cwd=tmp_path,
                                   env={"PYTHONPATH": str(ROOT)})
    shown = tail.stdout.decode()
    assert "None" not in shown and "«unclassified»" not in shown, shown
    assert "no result: ToolError" in shown and "by keyturn: invalid arguments" in shown, shown
    assert "[tool_refuses]" in shown, shown
    for result in results[2:]:
        show = await anyio.run_process([sys.executable, "-m", "server.cli", "audit", "show",
                                        outcome_of(result)["call_id"]], cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
        story = show.stdout.decode()
        assert "None" not in story and "«unclassified»" not in story, story
        assert "decision: none: denied by keyturn before the policy was asked" in story, story
        assert "outcome: denied: " in story, story


@pytest.mark.parametrize("query", ["SELECT 1", "SELECT name FROM sqlite_master LIMIT 5"])
async def test_the_demo_agents_first_read_runs_on_a_fresh_install(tmp_path: Path, query: str) -> None:
    with anyio.fail_after(120):
        async with fresh_serve(tmp_path) as client:
            result = await client.call_tool("sql_query", {"query": query})
    assert not result.is_error, text(result)
