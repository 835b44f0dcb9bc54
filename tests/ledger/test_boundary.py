"""Only `server/ledger/` speaks SQL to the ledger: every other module asks the store by name (`finish`,
`record a vote`, `get_call` ...), so a second store (PostgreSQL) replaces one package, not SQL strewn about.

The SQL tool pack (`tools/sql.py`, with its impact count `tools/sql_impact.py`) and its classifier
(`server/classify/sql.py`) handle the user's own databases, not the ledger, and are not held to this."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXEMPT = ("server/ledger/", "tools/sql.py", "tools/sql_impact.py", "server/classify/sql.py")
LEDGER_TABLES = ("events", "calls", "votes", "instances", "chain_head", "web_sessions", "checkpoints",
                 "schema_version")
LEDGER_SQL = re.compile(
    r"\b(?:FROM|INTO|UPDATE|JOIN|TABLE|INDEX\s+\w+\s+ON)\s+(?:" + "|".join(LEDGER_TABLES) + r")\b"
    r"|^\s*(?:PRAGMA|BEGIN|COMMIT|ROLLBACK|SAVEPOINT)\b",
    re.IGNORECASE)
SQL_METHODS = {"execute", "executemany", "executescript"}
PRIVATE_DRIVER = {"_query", "_execute", "_conn"}  # anywhere
PRIVATE_STORE = {"_read", "_unit", "_run", "_db", "_listeners"}  # on a ledger or a store
DRIVERS = {"sqlite3", "aiosqlite"}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _text(node: ast.AST) -> str | None:
    """The text of a string literal (an f-string's literal parts joined), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return " ".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
    return None


def violations(source: str) -> list[str]:
    """Where `source` speaks to the ledger's database itself: SQL naming a ledger table (outside docstrings), a
    statement passed to `execute`, a transaction's raw connection, the store's private parts, a database driver."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if id(node) not in docstrings and isinstance(node, ast.Constant | ast.JoinedStr):
            text = _text(node)
            if text is not None and LEDGER_SQL.search(text):
                found.append(f"{line}: ledger SQL {text[:60]!r}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SQL_METHODS:
            if node.args and _text(node.args[0]) is not None:
                found.append(f"{line}: a statement passed to .{node.func.attr}()")
        if isinstance(node, ast.Attribute) and (
                node.attr == "conn" or node.attr in PRIVATE_DRIVER
                or (node.attr in PRIVATE_STORE and ast.unparse(node.value).lower().endswith(("ledger", "store")))):
            found.append(f"{line}: .{node.attr}")
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in DRIVERS]
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in DRIVERS:
            found.append(f"{line}: from {node.module} import")
    return found


BAD = [
    'rows = tx.conn.execute("SELECT kind, payload FROM events WHERE call_id = ?", (cid,))',
    'ledger.transaction(lambda tx: tx.conn.execute("DELETE FROM instances WHERE id = ?", (i,)))',
    'rows = await self.ledger._query("SELECT holder FROM calls WHERE id = ?", (request_id,))',
    'sql = f"UPDATE calls SET state = ? WHERE id IN ({marks})"',
    'conn.execute("INSERT OR IGNORE INTO checkpoints(seq) VALUES (?)", (1,))',
    'cur.execute(f"select * from {table}")',
    'PRAGMA = "PRAGMA journal_mode = WAL"',
    'import sqlite3',
    'from aiosqlite import connect',
    'await ledger._db.read(fn)',
    'await self.ledger._unit(lambda c: c)',
]
GOOD = [
    '"""Someone can `UPDATE calls SET state = \'approved\'` behind keyturn\'s back."""',
    'def f():\n    """Reads `SELECT * FROM calls`."""\n    return self.program.execute(context)',
    'await ledger.finish(call_id, "expired", {"reason": reason}, reason=reason)',
    'message = "the calls from this agent are held for review"',
    'args = {"query": "SELECT * FROM orders WHERE id = 1"}',
    'return await self._run(tool, call, decision)',
]


@pytest.mark.parametrize("source", BAD)
def test_the_rule_catches_sql_against_the_ledger(source: str) -> None:
    assert violations(source), source


@pytest.mark.parametrize("source", GOOD)
def test_the_rule_lets_plain_code_and_docstrings_be(source: str) -> None:
    assert violations(source) == [], source


def test_no_module_outside_the_ledger_package_speaks_sql_to_the_ledger() -> None:
    files = sorted(p for d in ("server", "tools") for p in (ROOT / d).rglob("*.py"))
    checked = [p for p in files if not p.relative_to(ROOT).as_posix().startswith(EXEMPT)]
    assert len(checked) > 50 and ROOT / "server" / "gate.py" in checked  # the scan covers the code, not nothing
    assert not any(p.relative_to(ROOT).as_posix().startswith("server/ledger/") for p in checked)
    problems = {p.relative_to(ROOT).as_posix(): found
                for p in checked if (found := violations(p.read_text(encoding="utf-8")))}
    assert problems == {}
    # and the package it exempts does speak SQL: the rule has something to tell apart
    assert violations((ROOT / "server" / "ledger" / "tx.py").read_text(encoding="utf-8"))
