"""Impact before approval, end to end: a real `keyturn serve --http` with the shipped policy, the SDK's client as the
agent, reviewers through the HTTP API and the CLI. keyturn counts what a SQL write would touch before anyone is
asked, the reviewers see it, the shipped policy asks two people for a large change (or one it could not measure), and
the ledger keeps the real count beside the estimate, flagged when they differ."""

from __future__ import annotations

import sqlite3
from typing import Any

from server.config import default_policy_path
from tests.conftest import TOKENS, Home, ReviewerAPI, agent_client
from tests.helpers import client_call


def text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def add_pears(home: Home, n: int) -> None:
    with sqlite3.connect(home.data_db) as conn:
        conn.executemany("INSERT INTO orders(item, qty) VALUES ('pear', ?)", [(i,) for i in range(n)])


def event(home: Home, call_id: str, kind: str) -> dict[str, Any]:
    return next(e["payload"] for e in home.ledger_events(call_id) if e["kind"] == kind)


async def test_a_large_delete_shows_its_count_needs_two_people_and_records_the_real_count(home: Home) -> None:
    home.write_config(policy=str(default_policy_path()))
    add_pears(home, 1500)  # 1,501 pears of 1,503 orders
    base = home.serve_http()
    api = ReviewerAPI(base)
    statement = {"statement": "DELETE FROM orders WHERE item = 'pear'"}  # a real WHERE: not a "mass change"
    async with agent_client(base) as client:
        async with client_call(client, "sql_execute", statement) as call:
            req = await api.wait_pending("sql_execute")
            # Every reviewer surface says what it would touch before anyone says yes.
            assert req["impact"] == "would delete 1,501 of 1,503 rows in orders"
            assert [r["id"] for r in req["rules"]] == ["sql-write", "sql-large-change"]
            assert req["needs"]["text"].startswith("2 approvals")
            pending = home.keyturn("pending", token=TOKENS["alice"], url=base)
            assert "would touch: would delete 1,501 of 1,503 rows in orders" in pending.stdout, pending.stderr
            # The table changes while the request waits: the run's real count will differ from the estimate.
            add_pears(home, 2)
            one = await api.vote(req["id"], "approve", "alice", "stale pears")
            assert one.status_code == 200 and one.json()["state"] == "pending", one.text
            assert home.rows("SELECT count(*) FROM orders WHERE item = 'pear'") == [(1503,)]
            two = await api.vote(req["id"], "approve", "bob", "agreed")
            assert two.json()["state"] == "approved", two.text
    result = await call.result()
    assert not result.is_error, text(result)
    assert result.structured_content == {"rows_affected": 1503}
    decided = event(home, req["id"], "decision")
    assert decided["facts"]["sql"]["rows_affected"] == 1501 and decided["facts"]["sql"]["table_rows"] == 1503
    assert decided["review"]["impact"] == "would delete 1,501 of 1,503 rows in orders"
    assert event(home, req["id"], "executed")["impact"] == {
        "estimated_rows": 1501, "actual_rows": 1503, "table": "orders", "differs": True}
    shown = home.keyturn("audit", "show", req["id"], "--config", str(home.config))
    assert "estimated 1501 rows in orders, actually 1503 (DIFFERS from the estimate)" in shown.stdout, shown.stderr
    assert "would touch (measured before the decision): would delete 1,501 of 1,503 rows in orders" in shown.stdout


async def test_a_small_targeted_change_needs_one_person_and_its_count_matches(home: Home) -> None:
    home.write_config(policy=str(default_policy_path()))
    add_pears(home, 97)  # 100 orders: one apple is 1%
    base = home.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        async with client_call(client, "sql_execute", {"statement": "UPDATE orders SET qty = 0 WHERE item = 'apple'"}
                               ) as call:
            req = await api.wait_pending("sql_execute")
            assert req["impact"] == "would update 1 of 100 rows in orders"
            assert [r["id"] for r in req["rules"]] == ["sql-write"]
            r = await api.vote(req["id"], "approve", "alice", "fine")
            assert r.json()["state"] == "approved", r.text
    result = await call.result()
    assert not result.is_error, text(result)
    assert event(home, req["id"], "executed")["impact"] == {
        "estimated_rows": 1, "actual_rows": 1, "table": "orders", "differs": False}


async def test_an_agent_cannot_lower_the_bar_by_making_the_count_impossible(home: Home) -> None:
    """A statement keyturn cannot count faithfully (a WITH, a join) or a count that times out is an unknown impact:
    two people, never a small change; and the count never runs anything the statement would."""
    home.write_config(policy=str(default_policy_path()),
                      tools=[{"module": "tools.sql", "options": {"database": str(home.data_db),
                                                                 "impact_timeout": 0.000001}}])
    with sqlite3.connect(home.data_db) as conn:
        conn.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, v TEXT)")
        conn.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000) "
                     "INSERT INTO big(v) SELECT hex(i) FROM n")
    base = home.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        for statement, why in [
            ("WITH x AS (SELECT 1) DELETE FROM orders WHERE item = 'pear'", "a DELETE with WITH is not estimated"),
            ("DELETE FROM big WHERE v = 'ff'", "counting the rows took longer than"),
        ]:
            async with client_call(client, "sql_execute", {"statement": statement}) as call:
                req = await api.wait_pending("sql_execute")
                assert req["impact"].startswith("impact unknown: ") and why in req["impact"], req["impact"]
                assert "sql-impact-unknown" in [r["id"] for r in req["rules"]]
                one = await api.vote(req["id"], "approve", "alice", "looks small")
                assert one.json()["state"] == "pending", one.text  # one person is not enough
                no = await api.vote(req["id"], "deny", "bob", "count it first")
                assert no.json()["state"] == "denied"
            result = await call.result()
            assert result.is_error and "count it first" in text(result)
    assert home.rows("SELECT count(*) FROM orders") == [(3,)]
    assert home.rows("SELECT count(*) FROM big") == [(200000,)]
