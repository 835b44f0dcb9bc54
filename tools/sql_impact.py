"""What a SQL write would touch, measured before anyone is asked: the rows it matches and the size of its table.

For `UPDATE`, `DELETE` and `INSERT ... SELECT`, keyturn builds a counting query from the statement's parse tree
(sqlglot's AST, never by pasting text): `SELECT count(*) FROM <target> [AS alias] WHERE <the same WHERE>`, or
`SELECT count(*) FROM (<the same SELECT>)` for an insert, and `SELECT count(*) FROM <target>` for the table's size
(an exact count, not the engine's estimate). Only a statement whose count can be written faithfully is measured:
one target table, no join, `USING`/`FROM`, `LIMIT`/`ORDER BY`, `WITH` or `ON CONFLICT`/`OR REPLACE`; and the counting
query must itself be judged read-only by the SQL classifier (no function outside the known-pure list, no nested write,
no lock). Anything else is *unknown*, with the reason, never zero.

The counts run read-only with a short timeout, on their own connection: SQLite opens the file `mode=ro` with
`query_only`, the run's read-only authorizer and a progress handler that interrupts the count at its deadline;
PostgreSQL runs a `READ ONLY` transaction with a local `statement_timeout` and `lock_timeout`, rolled back. A timeout
or any database error is not the call's error: the impact is unknown and says why. MySQL is not measured.

The facts (merged into `facts.sql`): `impact` (`"measured"`, `"unknown"`, or `""` when not measured),
`impact_known`, `rows_affected` and `table_rows` (integers, null unless measured), `impact_table`, `impact_verb`
(`delete`, `update`, `insert`) and `impact_reason` (why unknown).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from server.classify.sql import classify_sql

__all__ = ["CountPlan", "impact_facts", "measure", "plan_counts"]

_DELETE_ARGS = frozenset({"this", "where", "returning", "hint"})
_UPDATE_ARGS = frozenset({"this", "expressions", "where", "returning", "hint"})
_INSERT_ARGS = frozenset({"this", "expression", "returning", "hint", "into"})
_MEASURED_KINDS = frozenset({"update", "delete", "insert"})
_PROGRESS_OPS = 1000
_CACHE_MAX_CHARS = 16384  # SQLite VM instructions between deadline checks


@dataclass(frozen=True)
class CountPlan:
    """The two counting queries for one write, in the database's dialect."""

    verb: str
    table: str
    matched: str
    total: str
    query: str
    """Both counts in one SELECT (one statement, one snapshot): `SELECT (<matched>), (<total>)`."""


Connect = Callable[[float], Any]
"""Opens the database read-only for counting, given the timeout: SQLite `mode=ro`, `query_only` and the run's read-only
authorizer; PostgreSQL a `READ ONLY` (not autocommit) connection. The counting adds its own deadline."""


def plan_counts(sql: str, dialect: str) -> CountPlan | str | None:
    """The counting queries for `sql`; a reason (str) when it is a write that cannot be counted faithfully; None when
    it is not a statement keyturn measures (a read, DDL, `INSERT ... VALUES`). Agents repeat statements, and an edit
    or a run judges one again: plans of short statements are cached."""
    return _cached_plan(sql, dialect) if len(sql) <= _CACHE_MAX_CHARS else _plan(sql, dialect)


@functools.lru_cache(maxsize=256)
def _cached_plan(sql: str, dialect: str) -> CountPlan | str | None:
    return _plan(sql, dialect)


def _plan(sql: str, dialect: str) -> CountPlan | str | None:
    try:
        parsed = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except (SqlglotError, RecursionError, ValueError):
        return None  # unparseable: the classifier's facts (and the policy's `sql-unclear`) already say so
    if len(parsed) != 1:
        return None
    stmt = parsed[0]
    if isinstance(stmt, exp.Delete):
        verb, allowed = "delete", _DELETE_ARGS
    elif isinstance(stmt, exp.Update):
        verb, allowed = "update", _UPDATE_ARGS
    elif isinstance(stmt, exp.Insert):
        if not isinstance(stmt.expression, (exp.Query, exp.Subquery)):
            return None  # VALUES, DEFAULT VALUES: nothing to count in the database
        verb, allowed = "insert", _INSERT_ARGS
    else:
        return None
    extra = sorted(k.rstrip("_") for k, v in stmt.args.items() if k not in allowed and v not in (None, [], False))
    if extra:
        return f"{'an' if verb == 'update' else 'a'} {verb.upper()} with {', '.join(extra).upper()} is not estimated"
    target = stmt.this.this if isinstance(stmt.this, exp.Schema) else stmt.this
    if not isinstance(target, exp.Table) or not target.name or target.args.get("joins"):
        return f"the {verb.upper()}'s target is not one table"
    table = ".".join(p for p in (target.catalog, target.db, target.name) if p)
    bare = exp.Table(this=target.this.copy(), db=target.args.get("db"), catalog=target.args.get("catalog"))
    count = exp.Count(this=exp.Star())
    if verb == "insert":
        source = stmt.expression.unnest().copy()
        matched = exp.select(count).from_(exp.Subquery(this=source, alias=exp.TableAlias(this=exp.to_identifier("k"))))
    else:
        matched = exp.select(count).from_(target.copy())
        where = stmt.args.get("where")
        if where is not None:
            matched = matched.where(where.this.copy())
    total = exp.select(count.copy()).from_(bare)
    matched_sql, total_sql = (q.sql(dialect=dialect, comments=False) for q in (matched, total))
    query = exp.select(exp.Subquery(this=matched), exp.Subquery(this=total)).sql(dialect=dialect, comments=False)
    facts = classify_sql([query], dialect)
    if not facts["read_only"]:
        why = facts["unknown_functions"] or facts["kinds"]
        return f"counting its rows would call or run what keyturn does not know to be read-only ({', '.join(why)})"
    return CountPlan(verb, table, matched_sql, total_sql, query)


def impact_facts(plan: CountPlan | str, counts: tuple[int, int] | str | None = None) -> dict[str, Any]:
    """`facts.sql` fields for a plan and its counts (or why they are unknown)."""
    if isinstance(plan, str) or not isinstance(counts, tuple):
        reason = plan if isinstance(plan, str) else str(counts or "not measured")
        return {"impact": "unknown", "impact_known": False, "rows_affected": None, "table_rows": None,
                "impact_table": "" if isinstance(plan, str) else plan.table,
                "impact_verb": "" if isinstance(plan, str) else plan.verb, "impact_reason": reason}
    return {"impact": "measured", "impact_known": True, "rows_affected": counts[0], "table_rows": counts[1],
            "impact_table": plan.table, "impact_verb": plan.verb, "impact_reason": ""}


def measure(dialect: str, connect: Connect, sql: str, timeout: float) -> dict[str, Any]:
    """`{"sql": {...}}` facts for `sql` ({} when it is not a write keyturn measures). Never raises for what the
    database says: a timeout, a lock or a missing table is an unknown impact with its reason."""
    if dialect not in ("sqlite", "postgres"):
        return {}
    seen = classify_sql([sql], dialect)  # (cached: the classifier has just read the same statement)
    if seen["statements"] != 1 or not set(seen["kinds"]) & _MEASURED_KINDS:
        return {}  # a read, DDL, several statements: nothing to count, and no second parse on the gate's path
    plan = plan_counts(sql, dialect)
    if plan is None:
        return {}
    if isinstance(plan, str):
        return {"sql": impact_facts(plan)}
    try:
        counts: tuple[int, int] | str = _count(dialect, connect, plan, timeout)
    except _TimedOut:
        counts = f"counting the rows took longer than {timeout:g}s"
    except PermissionError as e:
        counts = str(e)
    except Exception as e:  # the database's own error (no such table, a lock, a type error): unknown, with why
        counts = f"the database could not count the rows: {_first_line(e)}"
    return {"sql": impact_facts(plan, counts)}


class _TimedOut(Exception):
    pass


def _count(dialect: str, connect: Connect, plan: CountPlan, timeout: float) -> tuple[int, int]:
    if dialect == "sqlite":
        with _sqlite(connect, timeout) as conn:
            row = conn.execute(plan.query).fetchone()
    else:
        with _postgres(connect, timeout) as conn:
            cur = conn.cursor()
            cur.execute(plan.query, prepare=True)  # one statement, as the run's own
            row = cur.fetchone()
    return int(row[0]), int(row[1])


@contextlib.contextmanager
def _sqlite(connect: Connect, timeout: float) -> Iterator[sqlite3.Connection]:
    conn = connect(timeout)
    deadline = time.monotonic() + timeout
    interrupted = False

    def progress() -> int:
        nonlocal interrupted
        interrupted = time.monotonic() >= deadline
        return 1 if interrupted else 0

    try:
        conn.set_progress_handler(progress, _PROGRESS_OPS)
        try:
            yield conn
        except sqlite3.OperationalError as e:
            if interrupted:
                raise _TimedOut() from e
            raise
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.rollback()
        conn.close()


@contextlib.contextmanager
def _postgres(connect: Connect, timeout: float) -> Iterator[Any]:
    psycopg = importlib.import_module("psycopg")
    conn = connect(timeout)
    try:
        ms = str(max(1, int(timeout * 1000)))
        cur = conn.cursor()
        cur.execute("SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true)",
                    (ms, ms))
        try:
            yield conn
        except psycopg.errors.QueryCanceled as e:
            raise _TimedOut() from e
        except psycopg.errors.LockNotAvailable as e:
            raise _TimedOut() from e
    finally:
        with contextlib.suppress(Exception):
            conn.rollback()
        conn.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
