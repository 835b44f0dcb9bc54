"""tools.sql against a real SQLite database in a temporary directory."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from server.errors import ConfigError, InvalidArguments, ToolError
from server.registry import GuardedTool, ToolRegistry, load_pack


@pytest.fixture
def sql(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, GuardedTool]:
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, total REAL, note BLOB)")
        conn.executemany(
            "INSERT INTO orders (customer, total, note) VALUES (?, ?, ?)",
            [(f"c{i}", i * 1.5, b"\x00\xff" if i == 1 else None) for i in range(1, 26)],
        )
    conn.close()
    reg = ToolRegistry()
    load_pack("tools.sql", reg, {"database": "shop.db", "max_rows": 20})
    return {t.name: t for t in reg.list()}


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


@pytest.mark.parametrize("tool", ["sql_query", "sql_execute"])
async def test_one_statement_per_call(sql: dict[str, GuardedTool], tool: str, tmp_path: Path) -> None:
    field = "query" if tool == "sql_query" else "statement"
    with pytest.raises(InvalidArguments, match="2 statements") as info:
        await sql[tool].run({field: "SELECT 1; DROP TABLE orders"})
    assert info.value.field == field
    with pytest.raises(InvalidArguments, match="empty"):
        sql[tool].validate({field: "   "})
    assert rows(tmp_path / "shop.db", "SELECT count(*) FROM orders") == [(25,)]


@pytest.mark.parametrize("statement", ["ATTACH DATABASE 'other.db' AS o", "VACUUM INTO 'copy.db'"])
async def test_attach_and_vacuum_into_cannot_reach_other_files(
    sql: dict[str, GuardedTool], tmp_path: Path, statement: str
) -> None:
    with pytest.raises(ToolError, match="refuses ATTACH"):
        await sql["sql_execute"].run({"statement": statement})
    assert not (tmp_path / "other.db").exists() and not (tmp_path / "copy.db").exists()


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
