"""What a SQL write would touch, counted before anyone is asked (tools.sql_impact), on SQLite.

The counting query is built from the statement's parse tree and must say exactly what the write would match; what
cannot be rewritten faithfully, and a count that takes too long, is an unknown impact with its reason, never zero.
The count runs read-only: nothing the statement (or its WHERE) would do happens while counting.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from server.classify import empty_facts
from server.classify.impact import describe_impact, with_measured
from server.execution import RunLimits, running_under
from server.guarded import ToolRegistry, load_pack
from tools.sql import Database
from tools.sql_impact import CountPlan, plan_counts


@pytest.fixture
def shop(tmp_path: Path) -> Database:
    path = tmp_path / "shop.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "CREATE TABLE orders(id INTEGER PRIMARY KEY, item TEXT, qty INTEGER);"
            "CREATE TABLE archive(id INTEGER PRIMARY KEY, item TEXT, qty INTEGER);"
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500) "
            "INSERT INTO orders(item, qty) SELECT CASE WHEN i % 5 = 0 THEN 'pear' ELSE 'apple' END, i FROM n;")
    return Database("sqlite", str(path))


def sql_facts(db: Database, statement: str) -> dict[str, object]:
    measured = db.impact(statement)
    return dict(measured.get("sql", {}))


@pytest.mark.parametrize(("statement", "rows", "verb"), [
    ("DELETE FROM orders WHERE item = 'pear'", 100, "delete"),
    ("delete from orders as o where o.qty <= 10", 10, "delete"),
    ("UPDATE orders SET qty = 0 WHERE item = 'pear' AND qty > 250", 50, "update"),
    ("UPDATE orders SET qty = 0", 500, "update"),
    ("DELETE FROM orders", 500, "delete"),
    ("DELETE FROM orders WHERE id IN (SELECT id FROM orders WHERE qty < 4)", 3, "delete"),
    ("DELETE FROM orders WHERE 1 = 1", 500, "delete"),
    ("INSERT INTO archive(item, qty) SELECT item, qty FROM orders WHERE item = 'pear'", 100, "insert"),
])
def test_a_write_is_counted_as_it_would_match(shop: Database, statement: str, rows: int, verb: str) -> None:
    facts = sql_facts(shop, statement)
    assert facts["impact"] == "measured" and facts["impact_known"] is True
    assert facts["rows_affected"] == rows and facts["impact_verb"] == verb
    assert facts["table_rows"] == (0 if verb == "insert" else 500)  # the target's size (archive is empty)
    # ... and the statement, run, touches exactly that many rows.
    assert shop.execute(statement) == rows


def test_a_returning_clause_does_not_change_the_count(shop: Database) -> None:
    facts = sql_facts(shop, "DELETE FROM orders AS o WHERE o.qty <= 10 RETURNING o.id, o.item")
    assert facts["rows_affected"] == 10 and facts["table_rows"] == 500


def test_reads_and_plain_inserts_are_not_measured(shop: Database) -> None:
    assert shop.impact("SELECT * FROM orders") == {}
    assert shop.impact("INSERT INTO orders(item, qty) VALUES ('fig', 1)") == {}
    assert shop.impact("CREATE TABLE t(x)") == {}


@pytest.mark.parametrize(("statement", "why"), [
    ("WITH x AS (SELECT 1) DELETE FROM orders WHERE item = 'pear'", "a DELETE with WITH is not estimated"),
    ("UPDATE orders SET qty = 1 WHERE item = 'pear' LIMIT 3", "an UPDATE with LIMIT is not estimated"),
    ("DELETE FROM orders WHERE item = 'pear' ORDER BY id LIMIT 3", "is not estimated"),
    ("UPDATE orders SET qty = a.qty FROM archive a WHERE a.id = orders.id", "an UPDATE with FROM is not estimated"),
    ("INSERT OR REPLACE INTO archive SELECT * FROM orders", "is not estimated"),
    ("INSERT INTO archive SELECT * FROM orders ON CONFLICT DO NOTHING", "is not estimated"),
    ("DELETE FROM orders WHERE load_extension('x') = 1", "does not know to be read-only (load_extension)"),
    ("DELETE FROM orders WHERE my_udf(id) = 1", "does not know to be read-only (my_udf)"),
    ("DELETE FROM nowhere WHERE id = 1", "no such table: nowhere"),
])
def test_what_cannot_be_counted_faithfully_is_unknown_never_zero(shop: Database, statement: str, why: str) -> None:
    facts = sql_facts(shop, statement)
    assert facts["impact"] == "unknown" and facts["impact_known"] is False
    assert facts["rows_affected"] is None and facts["table_rows"] is None
    assert why in str(facts["impact_reason"])
    assert describe_impact(with_measured(empty_facts(), {"sql": facts})) == f"impact unknown: {facts['impact_reason']}"


def test_a_count_that_takes_too_long_is_unknown(tmp_path: Path) -> None:
    path = tmp_path / "big.db"
    with sqlite3.connect(path) as conn:
        conn.executescript("CREATE TABLE big(id INTEGER PRIMARY KEY, v TEXT);"
                           "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000) "
                           "INSERT INTO big(v) SELECT hex(i) FROM n;")
    db = Database("sqlite", str(path), impact_timeout=0.000001)  # trips at the first progress check
    facts = db.impact("DELETE FROM big WHERE v = hex(1000)")["sql"]
    assert facts["impact"] == "unknown" and facts["rows_affected"] is None
    assert facts["impact_reason"] == "counting the rows took longer than 1e-06s"
    # With time to count, the same statement is measured.
    assert Database("sqlite", str(path)).impact("DELETE FROM big WHERE v = hex(1000)")["sql"]["rows_affected"] == 1


def test_a_locked_database_is_an_unknown_impact_not_a_wait(shop: Database) -> None:
    locker = sqlite3.connect(shop.target, isolation_level=None)
    try:
        locker.execute("PRAGMA journal_mode = DELETE")
        locker.execute("BEGIN EXCLUSIVE")
        db = Database("sqlite", shop.target, timeout=30, impact_timeout=0.05)
        facts = db.impact("DELETE FROM orders WHERE item = 'pear'")["sql"]
        assert facts["impact"] == "unknown" and "locked" in str(facts["impact_reason"])
    finally:
        locker.execute("ROLLBACK")
        locker.close()


def test_the_count_is_built_from_the_parse_tree_not_pasted() -> None:
    # A comment or a string that looks like the end of the WHERE cannot smuggle anything into the count.
    plan = plan_counts("DELETE FROM orders WHERE item = 'x''); DROP TABLE orders; --' -- trailing", "sqlite")
    assert isinstance(plan, CountPlan)
    assert plan.matched == "SELECT COUNT(*) FROM orders WHERE item = 'x''); DROP TABLE orders; --'"
    assert plan.total == "SELECT COUNT(*) FROM orders"
    # Two statements are never counted (the pack refuses them before anything else).
    assert plan_counts("DELETE FROM orders; DELETE FROM archive", "sqlite") is None


def test_counting_never_writes(shop: Database) -> None:
    """The counting connection is read-only, whatever the count reads: a write that reached it would fail."""
    for statement in ["DELETE FROM orders WHERE item = 'pear'", "UPDATE orders SET qty = 0",
                      "INSERT INTO archive SELECT * FROM orders", "DELETE FROM orders"]:
        shop.impact(statement)
    with sqlite3.connect(shop.target) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (500,)
        assert conn.execute("SELECT count(*) FROM archive").fetchone() == (0,)
        assert conn.execute("SELECT sum(qty) FROM orders").fetchone() == (sum(range(1, 501)),)


async def test_the_pack_measures_sql_execute_and_reports_the_rows_it_changed(shop: Database, tmp_path: Path) -> None:
    reg = ToolRegistry()
    load_pack("tools.sql", reg, {"database": shop.target, "export_dir": str(tmp_path / "exports"),
                                 "impact_timeout": 5})
    execute, query = reg.get("sql_execute"), reg.get("sql_query")
    assert execute is not None and query is not None
    measured = await execute.measure({"statement": "DELETE FROM orders WHERE item = 'pear'"})
    assert measured["sql"]["rows_affected"] == 100 and measured["sql"]["table_rows"] == 500
    assert await query.measure({"query": "SELECT 1", "limit": 10}) == {}  # only writes are measured
    with running_under(RunLimits()) as report:
        await execute.run({"statement": "DELETE FROM orders WHERE item = 'pear'"})
    assert report.rows == 100


def test_the_line_every_card_shows() -> None:
    def line(**sql: object) -> str | None:
        return describe_impact(with_measured(empty_facts(), {"sql": sql}))

    assert line(impact="measured", rows_affected=1204, table_rows=50311, impact_table="orders",
                impact_verb="delete") == "would delete 1,204 of 50,311 rows in orders"
    assert line(impact="measured", rows_affected=1, table_rows=1, impact_table="t",
                impact_verb="update") == "would update 1 of 1 row in t"
    assert line(impact="measured", rows_affected=3, table_rows=0, impact_table="archive",
                impact_verb="insert") == "would insert 3 rows into archive (it has 0)"
    assert line(impact="unknown", impact_reason="counting the rows took longer than 2s") == (
        "impact unknown: counting the rows took longer than 2s")
    assert describe_impact(empty_facts()) is None
