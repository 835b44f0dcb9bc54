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
        # Predicates that mention a column but do not narrow the rows.
        "DELETE FROM users WHERE id = id",
        "DELETE FROM users WHERE users.id = users.id",
        "DELETE FROM users WHERE email IS NOT NULL",
        "DELETE FROM users WHERE NOT email IS NULL",
        "DELETE FROM users WHERE rowid > 0",
        "DELETE FROM users WHERE id >= -9223372036854775808",
        "DELETE FROM users WHERE id BETWEEN 0 AND 9223372036854775807",
        "DELETE FROM users WHERE true OR id = 3",
        "DELETE FROM users WHERE id = 3 OR true",
        "DELETE FROM users WHERE NOT false",
        "DELETE FROM users WHERE x = x AND 1",
        "DELETE FROM users WHERE (1 = 1) AND (2 > 1)",
        "DELETE FROM users WHERE id = 3 OR name LIKE '%'",
        "DELETE FROM users WHERE id <> 3",
        "DELETE FROM users WHERE id NOT IN (3)",
        "DELETE FROM users WHERE coalesce(1, id) = 1",
        "DELETE FROM users WHERE id IN (SELECT id FROM users)",
        "DELETE FROM users WHERE EXISTS (SELECT 1)",
        "DELETE FROM users WHERE id = NULL OR id IS NULL OR id IS NOT NULL",
    ],
)
def test_delete_without_a_real_where(sql: str) -> None:
    assert facts(sql)["delete_without_where"]


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM orders WHERE id = 3",
        "DELETE FROM orders WHERE 3 = id",
        "DELETE FROM orders WHERE id IN (3, 4)",
        "DELETE FROM orders WHERE id = 3 OR id = 4",
        "DELETE FROM orders WHERE id = 3 AND total > 0",
        "DELETE FROM orders WHERE 1 = 1 AND id = 3",
        "DELETE FROM orders WHERE NOT (id <> 3)",
        "DELETE FROM orders WHERE id = ?",
        "DELETE FROM orders WHERE id = -1",
        "DELETE FROM orders AS o WHERE o.id = 3",
        "DELETE FROM orders WHERE status = 'cancelled' AND created < '2020-01-01'",
    ],
)
def test_a_delete_with_a_real_where_is_a_targeted_write(sql: str) -> None:
    f = facts(sql)
    assert not f["delete_without_where"] and f["writes"] and f["write_tables"] == ["orders"]


@pytest.mark.parametrize(
    ("sql", "dialect"),
    [
        # Narrowing another table of the statement leaves every row of the target in play.
        ("DELETE FROM orders USING customers WHERE customers.id = 7", "postgres"),
        ("DELETE FROM orders USING customers WHERE id = 7", "postgres"),
        ("DELETE orders FROM orders JOIN customers ON orders.cid = customers.id WHERE customers.id = 7", "mysql"),
        # SQLite reads an unknown double-quoted name as a string: "x" = 'x' is true for every row.
        ('DELETE FROM orders WHERE "x" = \'x\'', "sqlite"),
    ],
)
def test_a_where_on_something_other_than_the_target_is_no_real_where(sql: str, dialect: str) -> None:
    assert facts(sql, dialect)["delete_without_where"]


def test_a_join_delete_that_pins_the_target_is_targeted() -> None:
    assert not facts("DELETE FROM orders USING customers WHERE orders.id = 7", "postgres")["delete_without_where"]


def test_update_without_where_and_with_where() -> None:
    assert facts("UPDATE accounts SET balance = 0")["update_without_where"]
    assert not facts("UPDATE accounts SET balance = 0 WHERE id = 1")["update_without_where"]
    assert facts("UPDATE accounts SET balance = 0 WHERE id = id")["update_without_where"]
    assert facts("UPDATE accounts SET balance = 0 FROM users WHERE users.id = 1", "postgres")["update_without_where"]


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


@pytest.mark.parametrize(
    "sql",
    [
        "EXPLAIN ANALYZE DELETE FROM orders",
        "explain analyse delete from orders",
        "EXPLAIN ANALYZE VERBOSE DELETE FROM orders",
        "EXPLAIN (ANALYZE) DELETE FROM orders",
        "EXPLAIN (FORMAT JSON, ANALYZE true, BUFFERS) DELETE FROM orders",
        "EXPLAIN (ANALYZE false) DELETE FROM orders",  # a mistake here costs a review, never a key
    ],
)
def test_explain_analyze_runs_the_statement(sql: str) -> None:
    f = facts(sql, "postgres")
    assert {"delete", "explain_analyze"} <= set(f["kinds"]) and f["writes"] and not f["read_only"]
    assert f["delete_without_where"] and f["write_tables"] == ["orders"]


def test_explain_analyze_of_a_read_is_a_read_and_a_plain_explain_only_plans() -> None:
    assert facts("EXPLAIN ANALYZE SELECT * FROM orders WHERE id = 1", "postgres")["read_only"]
    plan = facts("EXPLAIN DELETE FROM orders", "postgres")
    assert plan["kinds"] == ["explain"] and plan["read_only"] and plan["tables"] == ["orders"]
    assert not facts("EXPLAIN ANALYZE SELECT nextval('s')", "postgres")["read_only"]


def test_unreadable_explain_options_are_unparseable() -> None:
    f = facts("EXPLAIN (ANALYZE, FORMAT 'x)') DELETE FROM orders", "postgres")
    assert f["unparseable"] and not f["read_only"]


def test_a_locking_read_is_not_a_read() -> None:
    for sql in ("SELECT * FROM orders WHERE id = 1 FOR UPDATE", "SELECT * FROM orders FOR SHARE NOWAIT"):
        f = facts(sql, "postgres")
        assert "lock" in f["kinds"] and f["writes"] and not f["read_only"], sql


@pytest.mark.parametrize(
    ("sql", "unknown"),
    [
        ("SELECT nextval('orders_id_seq')", "nextval"),
        ("SELECT setval('orders_id_seq', 1)", "setval"),
        ("SELECT pg_reload_conf()", "pg_reload_conf"),
        ("SELECT pg_advisory_lock(1)", "pg_advisory_lock"),
        ("SELECT * FROM dblink('dbname=x', 'DELETE FROM t') AS t(x int)", "dblink"),
        ("SELECT lo_unlink(1234)", "lo_unlink"),
        ("SELECT archive_orders(30)", "archive_orders"),
        ("SELECT id FROM orders WHERE id = my_schema_fn(id)", "my_schema_fn"),
        ("SELECT * FROM refresh_stats()", "refresh_stats"),
    ],
)
def test_a_function_not_known_to_be_pure_is_not_a_read(sql: str, unknown: str) -> None:
    f = facts(sql, "postgres")
    assert unknown in f["unknown_functions"] and not f["read_only"]


@pytest.mark.parametrize(
    ("sql", "dialect"),
    [
        ("SELECT count(*), sum(total), avg(total), max(created) FROM orders", None),
        ("SELECT lower(name), upper(name), length(name), substr(name, 1, 2), trim(name) FROM users", "sqlite"),
        ("SELECT coalesce(note, ''), nullif(a, b), greatest(a, b), abs(a), round(a, 2) FROM t", "postgres"),
        ("SELECT now(), date_trunc('day', created), extract(year FROM created) FROM orders", "postgres"),
        ("SELECT string_agg(name, ','), row_number() OVER (ORDER BY id) FROM users GROUP BY id", "postgres"),
        ("SELECT pg_typeof(1), pg_size_pretty(pg_relation_size('orders'))", "postgres"),
        ("SELECT strftime('%Y', created), ifnull(a, 0), json_extract(doc, '$.a') FROM t", "sqlite"),
        ("SELECT date_format(created, '%Y'), ifnull(a, 0), concat_ws(',', a, b) FROM t", "mysql"),
        ("SELECT id FROM t WHERE a = 1 AND (b = 2 OR c = 3) AND x LIKE 'a%' AND doc ->> 'k' = 'v'", "postgres"),
    ],
)
def test_known_pure_functions_keep_a_select_a_read(sql: str, dialect: str | None) -> None:
    f = facts(sql, dialect)
    assert f["unknown_functions"] == [] and f["read_only"], f


def test_a_dialects_own_pure_function_is_unknown_elsewhere() -> None:
    assert facts("SELECT pg_typeof(1)", "postgres")["read_only"]
    assert not facts("SELECT pg_typeof(1)", "sqlite")["read_only"]


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
