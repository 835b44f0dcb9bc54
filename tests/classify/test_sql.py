"""SQL classification on the inputs an agent (or an injection) actually sends."""

from __future__ import annotations

import pytest

from server.classify.sql import classify_sql


def facts(sql: str, dialect: str | None = None) -> dict:
    return classify_sql([sql], dialect)


def test_a_plain_select_is_a_read_of_its_tables() -> None:
    f = facts("SELECT o.id, c.name FROM orders o JOIN shop.customers c ON c.id = o.customer_id WHERE o.id = 7")
    assert f["kinds"] == ["select"]
    assert f["tables"] == ["orders", "shop.customers"]
    assert f["read_only"] and not f["writes"] and not f["unparseable"]


def test_a_second_statement_after_a_select_is_seen() -> None:
    f = facts("SELECT 1; DELETE FROM orders")
    assert f["multiple_statements"] and f["statements"] == 2
    assert "delete" in f["kinds"]
    assert f["delete_without_where"]
    assert not f["read_only"]


def test_comments_do_not_hide_a_statement_and_do_not_invent_one() -> None:
    hidden = facts("SELECT * FROM orders /* monthly */; -- note\nDROP TABLE orders")
    assert "drop" in hidden["kinds"] and hidden["destructive"]
    commented_out = facts("SELECT * FROM orders -- ; DROP TABLE orders")
    assert commented_out["kinds"] == ["select"] and commented_out["read_only"]


def test_a_delete_inside_a_cte_makes_the_select_a_delete() -> None:
    f = facts("WITH gone AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM gone", "postgres")
    assert "delete" in f["kinds"]
    assert f["delete_without_where"]
    assert f["write_tables"] == ["orders"]
    assert "gone" not in f["tables"]  # a CTE name is not a table
    assert not f["read_only"]


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM orders",
        "DELETE FROM orders WHERE 1 = 1",
        "delete from orders where true",
        "DELETE FROM t WHERE 'a' = 'a'",
    ],
)
def test_delete_without_a_real_where(sql: str) -> None:
    assert facts(sql)["delete_without_where"]


def test_a_delete_with_a_real_where_is_a_targeted_write() -> None:
    f = facts("DELETE FROM orders WHERE id = 3")
    assert not f["delete_without_where"] and f["writes"] and f["write_tables"] == ["orders"]


def test_update_without_where_and_with_where() -> None:
    assert facts("UPDATE accounts SET balance = 0")["update_without_where"]
    assert not facts("UPDATE accounts SET balance = 0 WHERE id = 1")["update_without_where"]


def test_mysql_executable_comments_are_not_trusted() -> None:
    f = facts("SELECT 1 /*! ; DROP TABLE orders */", "mysql")
    assert f["unparseable"] and not f["read_only"]


def test_gibberish_is_unparseable_not_an_exception() -> None:
    f = facts("SELEC * FRM orders")
    assert f["unparseable"] and not f["read_only"]
    assert f["errors"]


@pytest.mark.parametrize("sql", ["'", "SELECT (((", "\x00\x01", ";;;", "/*", "SELECT " + "(" * 5000])
def test_hostile_input_never_raises(sql: str) -> None:
    f = facts(sql)
    assert f["present"]
    assert not f["read_only"] or f["kinds"] == ["select"]


def test_an_unparseable_statement_still_names_the_write_it_contains() -> None:
    f = facts("REPLACE INTO orders VALUES (1)")
    assert f["unparseable"] and "replace" in f["kinds"] and f["writes"]


def test_explain_analyze_runs_the_statement() -> None:
    f = facts("EXPLAIN ANALYZE DELETE FROM orders", "postgres")
    assert "delete" in f["kinds"] and not f["read_only"]


def test_select_into_creates_a_table() -> None:
    f = facts("SELECT * INTO backup FROM orders")
    assert f["writes"] and not f["read_only"]


def test_side_effecting_functions_are_not_reads() -> None:
    f = facts("SELECT pg_terminate_backend(pid) FROM pg_stat_activity", "postgres")
    assert f["dangerous_functions"] and not f["read_only"]


def test_merge_that_deletes() -> None:
    f = facts("MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE")
    assert {"merge", "delete"} <= set(f["kinds"]) and f["writes"]


@pytest.mark.parametrize(
    ("sql", "flag"),
    [
        ("DROP TABLE orders", "ddl"),
        ("TRUNCATE orders", "destructive"),
        ("ALTER TABLE orders ADD COLUMN note text", "ddl"),
        ("GRANT ALL ON orders TO intern", "privileges"),
    ],
)
def test_schema_and_privilege_changes(sql: str, flag: str) -> None:
    f = facts(sql)
    assert f[flag] and not f["read_only"]


def test_an_empty_statement_is_not_a_read() -> None:
    f = facts("")
    assert f["statements"] == 0 and not f["read_only"]


def test_cached_results_are_independent_copies() -> None:
    first = facts("SELECT * FROM orders")
    first["kinds"].append("delete")
    assert facts("SELECT * FROM orders")["kinds"] == ["select"]


def test_sql_too_long_to_review_is_unparseable() -> None:
    f = facts("SELECT 1 UNION ALL " * 5000 + "SELECT 1")
    assert f["unparseable"] and not f["read_only"] and "not analysed" in f["errors"][0]
