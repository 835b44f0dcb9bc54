"""SQL arguments -> facts: statement kinds, tables, and the shapes reviewers care about.

Parsing is done by sqlglot. Anything it cannot parse into a known statement is a fact
(`unparseable`), never an exception: a keyword scan still names the likely kinds so a
policy can be specific, but a policy should treat unparseable SQL as unknown.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError


class _QuietFallback(logging.Filter):
    """sqlglot logs a warning whenever it falls back to an opaque Command; that is a fact here, not noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Falling back to parsing as a 'Command'" not in record.getMessage()


logging.getLogger("sqlglot").addFilter(_QuietFallback())

READ_KINDS = frozenset({"select", "show", "describe", "explain", "use"})
WRITE_KINDS = frozenset({"insert", "update", "delete", "merge", "replace", "copy", "select_into", "call", "lock"})
DDL_KINDS = frozenset({"create", "drop", "alter", "truncate", "comment", "rename", "attach", "detach"})
PRIVILEGE_KINDS = frozenset({"grant", "revoke"})
DESTRUCTIVE_KINDS = frozenset({"drop", "truncate"})

_CLASS_KINDS: dict[type[exp.Expression], str] = {
    exp.Select: "select",
    exp.SetOperation: "select",
    exp.Subquery: "select",
    exp.Values: "select",
    exp.Insert: "insert",
    exp.Update: "update",
    exp.Delete: "delete",
    exp.Merge: "merge",
    exp.Create: "create",
    exp.Drop: "drop",
    exp.Alter: "alter",
    exp.TruncateTable: "truncate",
    exp.Grant: "grant",
    exp.Revoke: "revoke",
    exp.Copy: "copy",
    exp.Set: "set",
    exp.Use: "use",
    exp.Describe: "describe",
    exp.Show: "show",
    exp.Pragma: "pragma",
    exp.Transaction: "transaction",
    exp.Commit: "transaction",
    exp.Rollback: "transaction",
    exp.Attach: "attach",
    exp.Detach: "detach",
    exp.Comment: "comment",
    exp.Analyze: "analyze",
    exp.Cache: "cache",
    exp.Kill: "kill",
    exp.Lock: "lock",
}
# Nested statements that change data wherever they appear (a CTE's DELETE runs too).
_NESTED_WRITES: tuple[type[exp.Expression], ...] = (
    exp.Insert,
    exp.Update,
    exp.Delete,
    exp.Merge,
    exp.Drop,
    exp.Create,
    exp.Alter,
    exp.TruncateTable,
)
_KEYWORD_KINDS = {
    "select": "select", "with": "select", "values": "select", "table": "select",
    "insert": "insert", "update": "update", "delete": "delete", "merge": "merge", "replace": "replace",
    "upsert": "insert", "create": "create", "drop": "drop", "alter": "alter", "truncate": "truncate",
    "rename": "rename", "grant": "grant", "revoke": "revoke", "copy": "copy", "set": "set", "use": "use",
    "describe": "describe", "desc": "describe", "show": "show", "explain": "explain", "pragma": "pragma",
    "begin": "transaction", "start": "transaction", "commit": "transaction", "rollback": "transaction",
    "attach": "attach", "detach": "detach", "call": "call", "exec": "call", "execute": "call",
    "vacuum": "vacuum", "analyze": "analyze", "lock": "lock", "kill": "kill", "load": "load",
}  # fmt: skip
DANGEROUS_FUNCTIONS = frozenset({
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_read_file", "pg_read_binary_file",
    "pg_ls_dir", "pg_write_file", "lo_import", "lo_export", "dblink", "dblink_exec", "set_config", "pg_sleep",
    "load_file", "sys_exec", "sys_eval", "xp_cmdshell", "sp_execute", "sp_executesql", "openrowset",
    "opendatasource", "load_extension", "writefile", "readfile", "edit", "copy_to", "query_to_xml",
})  # fmt: skip
_EXECUTABLE_COMMENT = re.compile(r"/\*[!+]")  # MySQL `/*! ... */` runs; Oracle `/*+` hints
_WORD = re.compile(r"[A-Za-z_]+")
_CACHE_MAX_CHARS = 16384
_MAX_CHARS = 65536  # sqlglot parses ~100 KB/s; longer SQL is unparseable (a reviewer could not read it either)


def empty() -> dict[str, Any]:
    return {
        "present": False,
        "kinds": [],
        "tables": [],
        "write_tables": [],
        "functions": [],
        "statements": 0,
        "multiple_statements": False,
        "delete_without_where": False,
        "update_without_where": False,
        "read_only": False,
        "writes": False,
        "ddl": False,
        "destructive": False,
        "privileges": False,
        "dangerous_functions": False,
        "unparseable": False,
        "opaque": False,
        "errors": [],
    }


def classify_sql(texts: list[str], dialect: str | None) -> dict[str, Any]:
    """Facts for one or more SQL arguments (merged: any statement in any argument counts).

    Parsing is the slow part of classifying a call, and agents repeat statements, so results for
    small inputs are cached; each caller gets its own copy.
    """
    if sum(len(t) for t in texts) <= _CACHE_MAX_CHARS:
        cached = _cached(tuple(texts), dialect)
        return {k: list(v) if isinstance(v, list) else v for k, v in cached.items()}
    return _classify(texts, dialect)


@functools.lru_cache(maxsize=1024)
def _cached(texts: tuple[str, ...], dialect: str | None) -> dict[str, Any]:
    return _classify(list(texts), dialect)


def _classify(texts: list[str], dialect: str | None) -> dict[str, Any]:
    facts = empty()
    kinds: list[str] = []
    tables: list[str] = []
    write_tables: list[str] = []
    functions: list[str] = []
    for text in texts:
        facts["present"] = True
        if _EXECUTABLE_COMMENT.search(text):
            facts["unparseable"] = True
            facts["errors"].append("executable comment (/*! or /*+) is not analysed")
        try:
            if len(text) > _MAX_CHARS:
                raise ValueError(f"SQL longer than {_MAX_CHARS} characters is not analysed")
            statements = [s for s in sqlglot.parse(text, read=dialect) if isinstance(s, exp.Expression)]
        except (SqlglotError, RecursionError, ValueError) as e:
            facts["unparseable"] = True
            facts["errors"].append(_short(e))
            statements = []
            facts["statements"] += _keyword_scan(text, kinds)
        for stmt in statements:
            facts["statements"] += 1
            _statement(stmt, dialect, facts, kinds, tables, write_tables, functions)
    facts["kinds"] = _unique(kinds)
    facts["tables"] = _unique(tables)
    facts["write_tables"] = _unique(write_tables)
    facts["functions"] = _unique(functions)
    facts["multiple_statements"] = facts["statements"] > 1
    kind_set = set(facts["kinds"])
    facts["writes"] = bool(kind_set & WRITE_KINDS) or facts["delete_without_where"] or facts["update_without_where"]
    facts["ddl"] = bool(kind_set & DDL_KINDS)
    facts["destructive"] = bool(kind_set & DESTRUCTIVE_KINDS) or facts["delete_without_where"]
    facts["privileges"] = bool(kind_set & PRIVILEGE_KINDS)
    facts["dangerous_functions"] = any(f in DANGEROUS_FUNCTIONS for f in facts["functions"])
    facts["read_only"] = (
        facts["statements"] > 0
        and kind_set <= READ_KINDS
        and not facts["unparseable"]
        and not facts["opaque"]
        and not facts["dangerous_functions"]
    )
    return facts


def _statement(
    stmt: exp.Expression,
    dialect: str | None,
    facts: dict[str, Any],
    kinds: list[str],
    tables: list[str],
    write_tables: list[str],
    functions: list[str],
) -> None:
    if isinstance(stmt, exp.Command):
        _command(stmt, dialect, facts, kinds)
        return
    kind = _kind_of(stmt)
    if kind is None:
        # sqlglot accepts a bare expression (`SELEC * FRM` parses as a multiplication): not a statement.
        facts["unparseable"] = True
        facts["errors"].append(f"not a SQL statement: {type(stmt).__name__}")
        return
    kinds.append(kind)
    cte_names = {cte.alias_or_name for cte in stmt.find_all(exp.CTE)}
    for node in stmt.walk():
        if isinstance(node, exp.Table):
            name = _table_name(node)
            if name and name not in cte_names:
                tables.append(name)
        elif isinstance(node, exp.Func):
            fname = (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()
            functions.append(fname)
        elif isinstance(node, exp.Command):
            _command(node, dialect, facts, kinds)
        if isinstance(node, _NESTED_WRITES):
            nested = _kind_of(node)
            if nested:
                kinds.append(nested)
            target = node.this if isinstance(node.this, exp.Table) else node.find(exp.Table)
            if isinstance(target, exp.Table):
                write_tables.append(_table_name(target))
        if isinstance(node, exp.Delete) and _trivial_where(node):
            facts["delete_without_where"] = True
        elif isinstance(node, exp.Update) and _trivial_where(node):
            facts["update_without_where"] = True
        elif isinstance(node, exp.Select) and node.args.get("into") is not None:
            kinds.append("select_into")
        elif isinstance(node, exp.When) and "DELETE" in str(node.args.get("then", "")).upper():
            kinds.append("delete")


def _command(stmt: exp.Command, dialect: str | None, facts: dict[str, Any], kinds: list[str]) -> None:
    """An opaque statement sqlglot only tokenised: classify by its keyword; look inside EXPLAIN ANALYZE."""
    name = str(stmt.this or "").strip().lower()
    rest = str(stmt.expression.this if isinstance(stmt.expression, exp.Literal) else stmt.expression or "")
    kind = _KEYWORD_KINDS.get(name, name or "unknown")
    if kind == "explain":
        words = [w.lower() for w in _WORD.findall(rest)]
        if words and words[0] in {"analyze", "analyse"}:
            # EXPLAIN ANALYZE runs the statement it explains.
            inner = classify_sql([rest.split(None, 1)[1] if len(rest.split(None, 1)) > 1 else ""], dialect)
            kinds.extend(inner["kinds"])
            facts["unparseable"] = facts["unparseable"] or inner["unparseable"]
            facts["delete_without_where"] = facts["delete_without_where"] or inner["delete_without_where"]
            facts["update_without_where"] = facts["update_without_where"] or inner["update_without_where"]
            if inner["writes"] or inner["ddl"]:
                kinds.append("explain_analyze")
    if kind not in READ_KINDS:
        facts["opaque"] = True
    kinds.append(kind)


def _kind_of(node: exp.Expression) -> str | None:
    for cls in type(node).__mro__:
        kind = _CLASS_KINDS.get(cls)
        if kind is not None:
            return kind
    return None


def _trivial_where(node: exp.Expression) -> bool:
    """No WHERE, or a WHERE that references no column (`WHERE 1=1`, `WHERE true`)."""
    where = node.args.get("where")
    if where is None:
        return not (isinstance(node, exp.Delete) and node.args.get("using"))
    return where.find(exp.Column) is None and where.find(exp.Subquery) is None


def _table_name(node: exp.Table) -> str:
    parts = [p for p in (node.catalog, node.db, node.name) if p]
    return ".".join(parts)


def _keyword_scan(text: str, kinds: list[str]) -> int:
    """Best-effort kinds for SQL that did not parse: the first keyword of each `;`-separated chunk."""
    count = 0
    for chunk in text.split(";"):
        words = _WORD.findall(re.sub(r"--[^\n]*|/\*.*?\*/", " ", chunk, flags=re.S))
        if not words:
            continue
        count += 1
        kinds.append(_KEYWORD_KINDS.get(words[0].lower(), "unknown"))
        for w in words[1:]:
            k = _KEYWORD_KINDS.get(w.lower())
            if k in WRITE_KINDS or k in DDL_KINDS:
                kinds.append(k)
    return count


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return re.sub(r"\x1b\[[0-9;]*m", "", text)[:200]


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))
