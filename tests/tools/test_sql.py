"""tools.sql against a real SQLite database in a temporary directory."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import sqlite3
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from server.classify import ClassifyContext, extract_facts
from server.errors import ConfigError, InvalidArguments, ToolError
from server.execution import PackContext, RunLimits, running_under
from server.guarded import GuardedTool, ToolRegistry, load_pack
from server.models import Decision
from server.policy.loader import load_policy
from server.policy.testing import call_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sql(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, GuardedTool]:
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, total REAL, note BLOB)")
        conn.execute("CREATE INDEX orders_customer ON orders (customer)")
        conn.executemany(
            "INSERT INTO orders (customer, total, note) VALUES (?, ?, ?)",
            [(f"c{i}", i * 1.5, b"\x00\xff" if i == 1 else None) for i in range(1, 26)],
        )
    conn.close()
    reg = ToolRegistry()
    load_pack("tools.sql", reg, {"database": "shop.db", "max_rows": 20})
    return {t.name: t for t in reg.list()}


def judged_read_only() -> AbstractContextManager[None]:
    """What the gate sets around a run when the classifiers judged the call read-only."""
    return running_under(RunLimits(read_only=True))


def decide(tool: GuardedTool, arguments: dict[str, Any]) -> Decision:
    """The shipped policy's decision on a call to this tool, with the facts its own classifiers extract."""
    policy = load_policy(ROOT / "policies" / "default.yaml")
    call = call_for(tool.name, arguments, annotations=tool.annotations)
    return policy.decide(call, extract_facts(tool.name, arguments, tool.classifiers, tool.annotations,
                                             ClassifyContext()))


def rows(db: Path, sql: str) -> list[Any]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_the_pack_declares_its_tools(sql: dict[str, GuardedTool], tmp_path: Path) -> None:
    assert sql["sql_export"].roots == (tmp_path / "exports",)
    assert sorted(sql) == ["sql_execute", "sql_export", "sql_query"]
    assert sql["sql_query"].classifiers == {"query": "sql:sqlite"}
    assert sql["sql_query"].annotations["readOnlyHint"] is True
    assert sql["sql_execute"].classifiers == {"statement": "sql:sqlite"}
    assert sql["sql_execute"].annotations["destructiveHint"] is True
    assert sql["sql_export"].classifiers == {"query": "sql:sqlite", "path": "path"}
    assert sql["sql_export"].input_schema["properties"]["format"]["enum"] == ["csv", "jsonl"]


async def test_query_returns_rows_as_json(sql: dict[str, GuardedTool]) -> None:
    result = await sql["sql_query"].run({"query": "SELECT id, customer, note FROM orders ORDER BY id", "limit": 2})
    data = result.structured_content
    assert data == {
        "columns": ["id", "customer", "note"],
        "rows": [[1, "c1", "base64:AP8="], [2, "c2", None]],
        "row_count": 2,
        "truncated": True,
    }
    assert json.loads(result.content[0].text) == data  # type: ignore[union-attr]


async def test_max_rows_caps_whatever_limit_asks(sql: dict[str, GuardedTool]) -> None:
    data = (await sql["sql_query"].run({"query": "SELECT id FROM orders", "limit": 1000})).structured_content
    assert data["row_count"] == 20 and data["truncated"] is True


async def test_a_write_labelled_as_a_query_fails(sql: dict[str, GuardedTool], tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="runs read-only: SQLite refused delete on orders"):
        await sql["sql_query"].run({"query": "DELETE FROM orders"})
    assert rows(tmp_path / "shop.db", "SELECT count(*) FROM orders") == [(25,)]


async def test_execute_changes_data_and_reports_rows_affected(sql: dict[str, GuardedTool], tmp_path: Path) -> None:
    result = await sql["sql_execute"].run({"statement": "UPDATE orders SET total = 0 WHERE id <= 3"})
    assert result.structured_content == {"rows_affected": 3}
    assert rows(tmp_path / "shop.db", "SELECT count(*) FROM orders WHERE total = 0") == [(3,)]
    await sql["sql_execute"].run({"statement": "CREATE TABLE audit (x TEXT)"})
    assert rows(tmp_path / "shop.db", "SELECT name FROM sqlite_master WHERE name = 'audit'") == [("audit",)]
    await sql["sql_execute"].run({"statement": "VACUUM"})  # attaches a private temporary database, no file


@pytest.mark.parametrize("tool", ["sql_query", "sql_execute"])
async def test_one_statement_per_call(sql: dict[str, GuardedTool], tool: str, tmp_path: Path) -> None:
    field = "query" if tool == "sql_query" else "statement"
    with pytest.raises(InvalidArguments, match="2 statements") as info:
        await sql[tool].run({field: "SELECT 1; DROP TABLE orders"})
    assert info.value.field == field
    with pytest.raises(InvalidArguments, match="empty"):
        sql[tool].validate({field: "   "})
    assert rows(tmp_path / "shop.db", "SELECT count(*) FROM orders") == [(25,)]


@pytest.mark.parametrize("statement", ["ATTACH DATABASE 'other.db' AS o", "VACUUM INTO 'copy.db'", "DETACH temp"])
async def test_attach_and_vacuum_into_cannot_reach_other_files(
    sql: dict[str, GuardedTool], tmp_path: Path, statement: str
) -> None:
    with pytest.raises(ToolError, match="refuses ATTACH"):
        await sql["sql_execute"].run({"statement": statement})
    assert not (tmp_path / "other.db").exists() and not (tmp_path / "copy.db").exists()


# -- what was judged read-only runs read-only ------------------------------------------------------------


def snapshot(db: Path) -> tuple[Any, ...]:
    """Everything a statement could change that a reader of the file would see."""
    return (
        rows(db, "SELECT * FROM orders ORDER BY id"),
        rows(db, "SELECT type, name, sql FROM sqlite_master ORDER BY name"),
        rows(db, "PRAGMA user_version"),
        rows(db, "PRAGMA journal_mode"),
        db.stat().st_size,
    )


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM orders WHERE id = 1",
        "UPDATE orders SET total = 0",
        "INSERT INTO orders (customer) VALUES ('x')",
        "CREATE TABLE audit (x)",
        "DROP INDEX orders_customer",
        "CREATE TEMP TABLE scratch (x)",
        "PRAGMA user_version = 5",
        "PRAGMA journal_mode = wal",
        "PRAGMA query_only = 0",
        "PRAGMA wal_checkpoint(TRUNCATE)",
        "PRAGMA optimize",
        "VACUUM",
        "REINDEX",
        "ANALYZE",
        "BEGIN IMMEDIATE",
    ],
)
async def test_a_run_judged_read_only_cannot_write(sql: dict[str, GuardedTool], tmp_path: Path, statement: str) -> None:
    db = tmp_path / "shop.db"
    before = snapshot(db)
    with judged_read_only(), pytest.raises(ToolError, match="runs read-only"):
        await sql["sql_execute"].run({"statement": statement})
    assert snapshot(db) == before
    assert not (tmp_path / "shop.db-wal").exists()


@pytest.mark.parametrize(
    "statement",
    ["SELECT count(*) FROM orders", "PRAGMA table_info(orders)", "PRAGMA user_version", "EXPLAIN QUERY PLAN "
     "SELECT * FROM orders WHERE customer = 'c1'", "WITH t AS (SELECT 1 AS x) SELECT x FROM t"],
)
async def test_a_run_judged_read_only_still_reads(sql: dict[str, GuardedTool], statement: str) -> None:
    with judged_read_only():
        result = await sql["sql_execute"].run({"statement": statement})
    assert result.structured_content == {"rows_affected": 0}


@pytest.mark.parametrize("pragma", ["soft_heap_limit = 1", "hard_heap_limit = 1", "temp_store_directory = '/tmp'"])
async def test_pragmas_that_change_the_whole_process_are_refused(sql: dict[str, GuardedTool], pragma: str) -> None:
    # They would reach keyturn's own ledger connections in this process; never, read-only or not.
    for tool, field in (("sql_execute", "statement"), ("sql_query", "query")):
        with pytest.raises(ToolError, match="changes the whole process"):
            await sql[tool].run({field: f"PRAGMA {pragma}"})


def test_a_where_that_selects_every_row_is_a_mass_change(sql: dict[str, GuardedTool]) -> None:
    for statement in ("DELETE FROM users WHERE id = id", "DELETE FROM users WHERE rowid > 0",
                      "UPDATE users SET admin = 1 WHERE name IS NOT NULL", 'DELETE FROM users WHERE "id" = 3'):
        decision = decide(sql["sql_execute"], {"statement": statement})
        assert decision.risk == "critical" and "sql-mass-change" in [r.id for r in decision.rules], statement
    targeted = decide(sql["sql_execute"], {"statement": "DELETE FROM users WHERE id = 3"})
    assert targeted.risk == "medium" and [r.id for r in targeted.rules] == ["sql-write"]


# -- keyturn's own files are not a database ---------------------------------------------------------------


@pytest.fixture
def keyturn_state(tmp_path: Path) -> tuple[PackContext, Path]:
    state = tmp_path / "state"
    state.mkdir()
    ledger = state / "keyturn.db"
    with contextlib.closing(sqlite3.connect(ledger)) as conn:
        conn.execute("PRAGMA journal_mode = wal")
        conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, body TEXT)")
        conn.execute("INSERT INTO events (body) VALUES ('genesis')")
        conn.commit()
    (state / "keyturn.db.checkpoint-key").write_text("secret")
    (state / "policy.yaml").write_text("version: 1\n")
    context = PackContext.for_state([ledger, state / "policy.yaml"], ledger=ledger)
    return context, ledger


@pytest.mark.parametrize(
    "spelling",
    ["{ledger}", "sqlite:///{ledger}", "{ledger}-wal", "{ledger}-shm", "{ledger}-journal", "{ledger}.checkpoint-key",
     "{state}/policy.yaml", "{state}/../state/./keyturn.db", "link.db", "hard.db"],
)
def test_the_ledger_is_not_a_database_a_tool_may_open(
    keyturn_state: tuple[PackContext, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    context, ledger = keyturn_state
    monkeypatch.chdir(tmp_path)
    os.symlink(ledger, tmp_path / "link.db")
    os.link(ledger, tmp_path / "hard.db")
    database = spelling.format(ledger=ledger, state=ledger.parent)
    with pytest.raises(ConfigError, match="one of keyturn's own files"):
        load_pack("tools.sql", ToolRegistry(), {"database": database}, context)


async def test_a_link_to_the_ledger_made_after_load_is_refused(
    keyturn_state: tuple[PackContext, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context, ledger = keyturn_state
    monkeypatch.chdir(tmp_path)
    reg = ToolRegistry()
    load_pack("tools.sql", reg, {"database": "data.db"}, context)
    execute = reg.get("sql_execute")
    assert execute is not None
    await execute.run({"statement": "CREATE TABLE t (x)"})
    # The agent (through another tool) swaps the configured file for a link to the ledger.
    for link in (os.symlink, os.link):
        (tmp_path / "data.db").unlink()
        link(ledger, tmp_path / "data.db")
        with pytest.raises(ToolError, match="refuses"):
            await execute.run({"statement": "DELETE FROM events"})
    assert rows(ledger, "SELECT body FROM events") == [("genesis",)]


async def test_export_a_table_to_csv(sql: dict[str, GuardedTool], tmp_path: Path) -> None:
    args = sql["sql_export"].validate({"path": "orders.csv", "table": "orders"})
    # The table export's query is spelled out, so classifier and reviewer see what will run.
    assert args["query"] == 'SELECT * FROM "orders"'
    assert args["path"] == str(tmp_path / "exports" / "orders.csv")
    result = (await sql["sql_export"].run(args)).structured_content
    out = tmp_path / "exports" / "orders.csv"
    assert result == {"path": str(out), "rows": 25, "bytes": out.stat().st_size}
    with out.open(newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["id", "customer", "total", "note"] and table[2] == ["2", "c2", "3.0", ""]
    assert len(table) == 26


async def test_export_a_query_to_jsonl_in_a_subdirectory(sql: dict[str, GuardedTool], tmp_path: Path) -> None:
    q = "SELECT customer, total FROM orders WHERE id <= 2 ORDER BY id"
    result = (await sql["sql_export"].run({"path": "q1/top.jsonl", "format": "jsonl", "query": q})).structured_content
    lines = (tmp_path / "exports" / "q1" / "top.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"customer": "c1", "total": 1.5}, {"customer": "c2", "total": 3.0}]
    assert result["rows"] == 2


async def test_export_never_overwrites(sql: dict[str, GuardedTool], tmp_path: Path) -> None:
    (tmp_path / "exports").mkdir()
    keep = tmp_path / "exports" / "orders.csv"
    keep.write_text("precious")
    with pytest.raises(ToolError, match="File exists"):
        await sql["sql_export"].run({"path": "orders.csv", "table": "orders"})
    assert keep.read_text() == "precious"


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"path": "../escape.csv", "table": "orders"}, "path"),
        ({"path": "/tmp/elsewhere.csv", "table": "orders"}, "path"),
        ({"path": "link/x.csv", "table": "orders"}, "path"),
        ({"path": ".", "table": "orders"}, "path"),
        ({"path": "x.csv", "table": "orders; DROP TABLE orders"}, "table"),
        ({"path": "x.csv", "table": 'or"ders'}, "table"),
        ({"path": "x.csv"}, "table"),
        ({"path": "x.csv", "table": "orders", "query": "SELECT 1"}, "query"),
        ({"path": "x.csv", "query": "SELECT 1; SELECT 2"}, "query"),
    ],
)
def test_export_refusals_happen_in_validate(
    sql: dict[str, GuardedTool], tmp_path: Path, arguments: dict[str, Any], field: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "exports").mkdir()
    os.symlink(outside, tmp_path / "exports" / "link")
    with pytest.raises(InvalidArguments) as info:
        sql["sql_export"].validate(arguments)
    assert info.value.field == field
    assert list(outside.iterdir()) == []


async def test_query_on_a_missing_database_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    reg = ToolRegistry()
    load_pack("tools.sql", reg, {"database": "sqlite:///new/data.db"})
    with pytest.raises(ToolError, match="does not exist yet"):
        await reg.get("sql_query").run({"query": "SELECT 1"})  # type: ignore[union-attr]
    (tmp_path / "new").mkdir()
    await reg.get("sql_execute").run({"statement": "CREATE TABLE t (x)"})  # type: ignore[union-attr]
    assert (tmp_path / "new" / "data.db").exists()


def test_another_database_beside_the_ledger_loads(keyturn_state: tuple[PackContext, Path]) -> None:
    context, ledger = keyturn_state
    load_pack("tools.sql", ToolRegistry(), {"database": str(ledger.parent / "shop.db")}, context)


def test_defaults_load_without_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    reg = ToolRegistry()
    load_pack("tools.sql", reg, {})
    assert len(reg) == 3
    assert not (tmp_path / "data.db").exists()  # nothing is created until a tool runs


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"databse": "x.db"}, "databse"),
        ({"max_rows": 0}, "max_rows"),
        ({"database": "oracle://db"}, "not sqlite, postgresql or mysql"),
        ({"database": "sqlite://x.db"}, "sqlite:///"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        load_pack("tools.sql", ToolRegistry(), options)
    assert "tools.sql" in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("psycopg") is not None, reason="psycopg is installed")
def test_postgres_without_the_extra_says_what_to_install() -> None:
    with pytest.raises(ConfigError, match=r"keyturn\[postgres\]"):
        load_pack("tools.sql", ToolRegistry(), {"database": "postgresql://u@localhost/db"})


@pytest.mark.skipif(importlib.util.find_spec("pymysql") is not None, reason="pymysql is installed")
def test_mysql_without_the_extra_says_what_to_install() -> None:
    with pytest.raises(ConfigError, match=r"keyturn\[mysql\]"):
        load_pack("tools.sql", ToolRegistry(), {"database": "mysql://u@localhost/db"})


# -- what the tools declare they would refuse, found without running anything ------------------------------------


@pytest.mark.parametrize("statement", [
    "DELETE FROM orders", "  /* all */ dElEtE FROM orders -- every row", "WITH x AS (SELECT 1) DELETE FROM orders",
    "WITH gone AS (DELETE FROM orders RETURNING *) SELECT 1", "UPDATE orders SET total = 0", "pragma USER_VERSION = 9",
    "VACUUM", "ATTACH 'other.db' AS other", "CREATE TEMP TABLE t(x)", "BEGIN", "DROP TABLE orders",
    "INSERT INTO not_yet_a_table VALUES (1)",
])
async def test_the_read_only_tools_refuse_a_write_before_it_runs(
        sql: dict[str, GuardedTool], tmp_path: Path, statement: str) -> None:
    for tool, arguments in (("sql_query", {"query": statement}),
                            ("sql_export", {"path": "out.csv", "query": statement})):
        reason = await sql[tool].refusal(sql[tool].validate(arguments))
        assert reason, (tool, statement)
    assert rows(tmp_path / "shop.db", "SELECT count(*), sum(total) FROM orders") == [(25, 487.5)]
    assert rows(tmp_path / "shop.db", "PRAGMA user_version") == [(0,)]
    assert not (tmp_path / "other.db").exists() and not (tmp_path / "exports" / "out.csv").exists()


@pytest.mark.parametrize("statement", [
    "VACUUM INTO 'copy.db'", "vacuum main\ninto 'copy.db'", "ATTACH ('other' || '.db') AS o", "DETACH main",
    "PRAGMA temp_store_directory = '/tmp'", "pragma Soft_Heap_Limit = 1",
])
async def test_sql_execute_refuses_what_it_never_runs_and_nothing_runs_to_find_out(
        sql: dict[str, GuardedTool], tmp_path: Path, statement: str) -> None:
    tool = sql["sql_execute"]
    assert await tool.refusal(tool.validate({"statement": statement}))
    assert not (tmp_path / "copy.db").exists() and not (tmp_path / "other.db").exists()


@pytest.mark.parametrize("statement", [
    "DELETE FROM orders WHERE id = 1", "UPDATE orders SET total = 0", "VACUUM", "CREATE TABLE notes(x)",
    "DROP TABLE not_yet_a_table", "PRAGMA user_version = 3", "INSERT INTO not_yet_a_table VALUES (1)",
])
async def test_sql_execute_leaves_its_writes_to_the_policy_and_checking_them_writes_nothing(
        sql: dict[str, GuardedTool], tmp_path: Path, statement: str) -> None:
    tool = sql["sql_execute"]
    assert await tool.refusal(tool.validate({"statement": statement})) is None
    assert rows(tmp_path / "shop.db", "SELECT count(*), sum(total) FROM orders") == [(25, 487.5)]
    assert rows(tmp_path / "shop.db", "PRAGMA user_version") == [(0,)]
    assert rows(tmp_path / "shop.db", "SELECT count(*) FROM sqlite_master WHERE name = 'notes'") == [(0,)]


@pytest.mark.parametrize("query", [
    "SELECT * FROM orders", "EXPLAIN QUERY PLAN SELECT * FROM orders", "PRAGMA table_info(orders)",
    "PRAGMA user_version", "WITH a AS (SELECT 1) SELECT * FROM a", "SELECT * FROM not_yet_a_table",
])
async def test_reads_are_not_refused(sql: dict[str, GuardedTool], query: str) -> None:
    assert await sql["sql_query"].refusal(sql["sql_query"].validate({"query": query})) is None


async def test_a_fresh_database_is_created_empty_by_its_first_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    reg = ToolRegistry()
    load_pack("tools.sql", reg, {})
    assert not (tmp_path / "data.db").exists()
    result = await reg.get("sql_query").run({"query": "SELECT 1 AS one"})  # type: ignore[union-attr]
    assert result.structured_content == {"columns": ["one"], "rows": [[1]], "row_count": 1, "truncated": False}
    assert (tmp_path / "data.db").stat().st_size == 0  # an empty file is an empty database: nothing else was written


@pytest.mark.parametrize(("present", "absent", "tool"), [
    ("DELETE FROM orders", "DELETE FROM no_such_table", "sql_query"),
    ("UPDATE orders SET total = 0 WHERE id = 1", "UPDATE no_such_table SET total = 0 WHERE id = 1", "sql_query"),
    ("INSERT INTO orders(customer) SELECT customer FROM orders", "INSERT INTO nope(c) SELECT c FROM nope", "sql_query"),
    ("ATTACH (SELECT customer FROM orders LIMIT 1) AS x", "ATTACH (SELECT c FROM no_such_table) AS x", "sql_query"),
    ("ATTACH (SELECT customer FROM orders LIMIT 1) AS x", "ATTACH (SELECT c FROM no_such_table) AS x", "sql_execute"),
])
async def test_a_refusal_does_not_tell_whether_a_table_exists(
        sql: dict[str, GuardedTool], present: str, absent: str, tool: str) -> None:
    """The refusal is asked before the policy, which may deny this agent every read: what it says must not depend on
    the schema, or it would answer what the policy refuses to."""
    field = "statement" if tool == "sql_execute" else "query"
    said = [await sql[tool].refusal(sql[tool].validate({field: q})) for q in (present, absent)]
    assert said[0] and said[0] == said[1], said
    assert "orders" not in said[0] and "no_such_table" not in said[0]
