"""tools.sql against a real PostgreSQL server: what was judged read-only runs in a read-only transaction.

The attacker's question is always the same: a statement the decision judged read-only (or that `sql_query` runs)
tries to change something, and must fail, leaving the data, the sequence and the ledger's story as they were.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from server.approvals import ApprovalBroker, ReviewerDirectory
from server.classify import ClassifyContext
from server.errors import InvalidArguments, ToolError
from server.gate import Gate, Identity
from server.guarded import GuardedTool, ToolRegistry, load_pack
from server.ledger import Ledger
from server.models import Verdict
from server.policy import LivePolicy
from tests.helpers import eventually
from tests.pg import Cluster
from tests.tools.test_sql import decide, judged_read_only
from tools.sql import Database

ROOT = Path(__file__).resolve().parents[2]
AGENT = Identity(principal="agent")
_names = itertools.count()

SCHEMA = """
CREATE TABLE orders (id int PRIMARY KEY, customer text NOT NULL, total numeric NOT NULL);
INSERT INTO orders SELECT i, 'c' || i, i * 1.5 FROM generate_series(1, 5) AS i;
CREATE SEQUENCE invoice_no;
-- A function that writes, and a view that hides it: `SELECT * FROM recent` reads as a plain read.
CREATE FUNCTION purge() RETURNS int LANGUAGE sql AS $$ DELETE FROM orders RETURNING 1 $$;
CREATE VIEW recent AS SELECT o.*, purge() AS purged FROM orders o;
"""


@dataclass
class Shop:
    url: str
    tools: dict[str, GuardedTool]

    def one(self, sql: str) -> Any:
        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute(sql).fetchone()
            return row[0] if row else None


@pytest.fixture(scope="module")
def agent_role(postgres: Cluster) -> str:
    postgres.create_role("agent")
    return "agent"


@pytest.fixture
def shop(postgres: Cluster, agent_role: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shop]:
    """A fresh database owned by a role without superuser rights, and the SQL pack pointed at it."""
    monkeypatch.chdir(tmp_path)
    url = postgres.create_database(f"shop{next(_names)}", owner=agent_role)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    reg = ToolRegistry()
    load_pack("tools.sql", reg, {"database": url, "export_dir": str(tmp_path / "exports")})
    yield Shop(url, {t.name: t for t in reg.list()})


async def test_the_pack_reads_and_writes_postgres(shop: Shop) -> None:
    assert shop.tools["sql_query"].classifiers == {"query": "sql:postgres"}
    rows = (await shop.tools["sql_query"].run({"query": "SELECT id, total FROM orders ORDER BY id", "limit": 2}))
    assert rows.structured_content == {"columns": ["id", "total"], "rows": [[1, "1.5"], [2, "3.0"]],
                                       "row_count": 2, "truncated": True}
    done = await shop.tools["sql_execute"].run({"statement": "UPDATE orders SET total = 0 WHERE id IN (1, 2)"})
    assert done.structured_content == {"rows_affected": 2}
    assert shop.one("SELECT count(*) FROM orders WHERE total = 0") == 2


@pytest.mark.parametrize(
    ("statement", "refusal"),
    [
        ("DELETE FROM orders WHERE id = 1", "cannot execute DELETE in a read-only transaction"),
        ("SELECT nextval('invoice_no')", "cannot execute nextval()"),
        ("SELECT setval('invoice_no', 100)", "cannot execute setval()"),
        ("SELECT * FROM orders FOR UPDATE", "cannot execute SELECT FOR UPDATE"),
        ("EXPLAIN ANALYZE DELETE FROM orders", "cannot execute DELETE in a read-only transaction"),
        ("SELECT purge()", "cannot execute DELETE in a read-only transaction"),
        ("SELECT * FROM recent", "cannot execute DELETE in a read-only transaction"),
        ("CREATE TEMP TABLE scratch (x int)", "read-only transaction"),
        ("INSERT INTO orders VALUES (9, 'c9', 1)", "read-only transaction"),
    ],
)
async def test_a_run_judged_read_only_cannot_write(shop: Shop, statement: str, refusal: str) -> None:
    with judged_read_only(), pytest.raises(ToolError, match=refusal):
        await shop.tools["sql_execute"].run({"statement": statement})
    assert shop.one("SELECT count(*) FROM orders") == 5
    assert shop.one("SELECT last_value FROM invoice_no") == 1 and shop.one("SELECT is_called FROM invoice_no") is False
    # The same statement outside a read-only run is the policy's to judge, and runs.
    await shop.tools["sql_execute"].run({"statement": "SELECT nextval('invoice_no')"})
    assert shop.one("SELECT is_called FROM invoice_no") is True


async def test_sql_query_never_writes(shop: Shop) -> None:
    for query in ("SELECT * FROM recent", "SELECT nextval('invoice_no')", "DELETE FROM orders"):
        with pytest.raises(ToolError, match="read-only transaction"):
            await shop.tools["sql_query"].run({"query": query})
    assert shop.one("SELECT count(*) FROM orders") == 5


def test_postgres_runs_one_statement_whatever_the_parser_made_of_it(shop: Shop) -> None:
    # `one_statement` refuses this when sqlglot parses it; the protocol refuses it when sqlglot does not.
    with pytest.raises(InvalidArguments, match="3 statements"):
        shop.tools["sql_query"].validate({"query": "SELECT 1; COMMIT; DELETE FROM orders"})
    db = Database("postgres", shop.url)
    with pytest.raises(psycopg.errors.SyntaxError, match="multiple commands"):
        db.query("SELECT 1; COMMIT; DELETE FROM orders", 10)
    with pytest.raises(psycopg.errors.SyntaxError, match="multiple commands"):
        db.execute("SELECT 1; COMMIT; DELETE FROM orders", read_only=True)
    assert shop.one("SELECT count(*) FROM orders") == 5


# -- through a real gate with the shipped policy ------------------------------------------------------


@pytest.fixture
async def gate(tmp_path: Path) -> AsyncIterator[tuple[Gate, Ledger]]:
    policy = LivePolicy(ROOT / "policies" / "default.yaml")
    policy.load()
    async with Ledger(tmp_path / "ledger.db") as ledger:
        broker = ApprovalBroker(ledger=ledger, directory=ReviewerDirectory(
            identities={"api:alice": "alice"}, groups_of={"alice": frozenset()}), poll_interval_s=0.05)
        yield Gate(ledger=ledger, broker=broker, policy=policy, classify_context=ClassifyContext()), ledger


async def outcomes(ledger: Ledger) -> list[str]:
    terminal = {"executed", "failed", "denied", "expired", "cancelled", "abandoned"}
    return [e.kind for e in await ledger.tail(1000) if e.kind in terminal]


@pytest.mark.parametrize("tool", ["sql_execute", "sql_query"])
async def test_a_write_behind_a_view_is_allowed_as_a_read_and_fails(
    shop: Shop, gate: tuple[Gate, Ledger], tool: str
) -> None:
    # The classifier cannot see that the view calls a function that deletes: `sql-read` allows the call, and
    # the read-only transaction it runs in is what keeps the rows.
    g, ledger = gate
    field = "statement" if tool == "sql_execute" else "query"
    result = await g.call(shop.tools[tool], {field: "SELECT * FROM recent"}, AGENT)
    assert result.is_error
    assert "read-only transaction" in result.content[0].text  # type: ignore[union-attr]
    assert await outcomes(ledger) == ["failed"]
    assert shop.one("SELECT count(*) FROM orders") == 5


async def test_an_allowed_read_runs_through_the_gate(shop: Shop, gate: tuple[Gate, Ledger]) -> None:
    g, ledger = gate
    result = await g.call(shop.tools["sql_execute"], {"statement": "SELECT count(*) FROM orders"}, AGENT)
    assert not result.is_error
    assert await outcomes(ledger) == ["executed"]


@pytest.mark.parametrize(
    ("query", "rule"),
    [
        ("SELECT nextval('invoice_no')", "sql-unclear"),
        ("SELECT purge()", "sql-unclear"),
        ("EXPLAIN ANALYZE DELETE FROM orders WHERE id = 1", "sql-write"),
        ("EXPLAIN ANALYZE DELETE FROM orders", "sql-mass-change"),
        ("SELECT * FROM orders WHERE id = 1 FOR UPDATE", "sql-write"),
    ],
)
def test_writes_the_classifier_sees_are_reviewed_not_allowed(shop: Shop, query: str, rule: str) -> None:
    decision = decide(shop.tools["sql_query"], {"query": query})
    assert decision.outcome == "review" and rule in [r.id for r in decision.rules]
    assert "sql-read" not in [r.id for r in decision.rules]


# -- impact before approval: the count runs read-only, with a timeout, and never runs what it counts -----------------


def test_a_write_is_counted_on_postgres_as_it_would_match(shop: Shop) -> None:
    db = Database("postgres", shop.url)
    facts = db.impact("DELETE FROM orders AS o WHERE o.customer IN ('c1', 'c2') RETURNING o.id")["sql"]
    assert facts == {"impact": "measured", "impact_known": True, "rows_affected": 2, "table_rows": 5,
                     "impact_table": "orders", "impact_verb": "delete", "impact_reason": ""}
    assert db.impact("UPDATE orders SET total = 0")["sql"]["rows_affected"] == 5
    assert db.impact("UPDATE orders SET total = 0 FROM recent r WHERE r.id = orders.id")["sql"]["impact"] == "unknown"
    assert shop.one("SELECT count(*) FROM orders") == 5


def test_a_write_hidden_behind_a_view_in_the_where_does_not_run_while_counting(shop: Shop) -> None:
    # `recent` calls purge(), which deletes every order: the classifier cannot see it, the count reads the view, and
    # the read-only transaction the count runs in refuses the DELETE. The impact is unknown; the rows stay.
    facts = Database("postgres", shop.url).impact("DELETE FROM orders WHERE id IN (SELECT id FROM recent)")["sql"]
    assert facts["impact"] == "unknown" and facts["rows_affected"] is None
    assert "read-only transaction" in str(facts["impact_reason"])
    assert shop.one("SELECT count(*) FROM orders") == 5


@pytest.mark.parametrize(("statement", "why"), [
    ("DELETE FROM orders WHERE id = nextval('invoice_no')", "nextval"),
    ("DELETE FROM orders WHERE id = purge()", "purge"),
    ("DELETE FROM orders WHERE id IN (SELECT id FROM orders FOR UPDATE)", "lock"),
    ("WITH gone AS (DELETE FROM orders RETURNING id) DELETE FROM orders WHERE id IN (SELECT id FROM gone)", "WITH"),
    ("DELETE FROM orders WHERE pg_sleep(30) IS NULL", "pg_sleep"),
])
def test_what_counting_would_run_is_never_counted(shop: Shop, statement: str, why: str) -> None:
    facts = Database("postgres", shop.url).impact(statement)["sql"]
    assert facts["impact"] == "unknown" and why in str(facts["impact_reason"])
    assert shop.one("SELECT count(*) FROM orders") == 5
    assert shop.one("SELECT last_value FROM invoice_no") == 1 and shop.one("SELECT is_called FROM invoice_no") is False


def test_a_count_on_a_large_table_times_out_into_an_unknown_impact(shop: Shop) -> None:
    with psycopg.connect(shop.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE events AS SELECT i AS id, md5(i::text) AS body FROM generate_series(1, 300000) i")
    statement = "DELETE FROM events WHERE md5(body) = md5('x')"  # no index: a full scan with a hash per row
    tiny = Database("postgres", shop.url, impact_timeout=0.001)  # statement_timeout = 1ms
    facts = tiny.impact(statement)["sql"]
    assert facts["impact"] == "unknown" and facts["rows_affected"] is None
    assert facts["impact_reason"] == "counting the rows took longer than 0.001s"
    roomy = Database("postgres", shop.url, impact_timeout=60)
    assert roomy.impact(statement)["sql"]["table_rows"] == 300000
    assert shop.one("SELECT count(*) FROM events") == 300000


async def test_the_shipped_policy_holds_a_large_postgres_change_for_two(shop: Shop, gate: tuple[Gate, Ledger]) -> None:
    g, ledger = gate
    with psycopg.connect(shop.url, autocommit=True) as conn:
        conn.execute("INSERT INTO orders SELECT i, 'bulk', 1 FROM generate_series(100, 1299) AS i")
    results: list[Any] = []

    async def agent() -> None:
        results.append(await g.call(shop.tools["sql_execute"],
                                    {"statement": "UPDATE orders SET total = 0 WHERE customer = 'bulk'"}, AGENT))

    async with anyio.create_task_group() as tg:
        tg.start_soon(agent)
        (view,) = await eventually(lambda: ledger.list_calls(("pending",)))
        assert view.review is not None and view.review.impact == "would update 1,200 of 1,205 rows in orders"
        assert "sql-large-change" in [r["id"] for r in view.rules]
        alone = await g.broker.decide(Verdict(request_id=view.id, reviewer="api:alice", verdict="approve",
                                              reason="looks right", channel="api"))
        assert alone.accepted and alone.state == "pending"  # one of the two people it needs
        no = await g.broker.decide(Verdict(request_id=view.id, reviewer="api:alice", verdict="deny",
                                           reason="on second thought, archive first", channel="api"))
        assert no.accepted
    (result,) = results
    assert result.is_error and "archive first" in result.content[0].text
    assert shop.one("SELECT count(*) FROM orders WHERE total = 0") == 0
