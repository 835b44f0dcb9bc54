"""SQL arguments -> facts: statement kinds, tables, and the shapes reviewers care about.

Parsing is done by sqlglot. Anything it cannot parse into a known statement is a fact
(`unparseable`), never an exception: a keyword scan still names the likely kinds so a
policy can be specific, but a policy should treat unparseable SQL as unknown.

Facts judge impact, not spelling, and a mistake may cost a review, never a key: each rule errs toward
"writes" and "without a real WHERE". The tools enforce the one that matters (a call judged read-only runs
in a read-only transaction), so these facts are for the policy and the reviewer, not the wall.

- A real WHERE (`delete_without_where` / `update_without_where` are false only for one). The predicate is
  first simplified by sqlglot's optimizer (`1=1`, `NOT false`, `true OR ...`, `x AND 1` fold away). What
  remains narrows the rows only if it is a column of the target table compared by `=` with a constant (a
  literal or a bound parameter), or `IN` a list of constants; `a AND b` narrows if either side does, `a OR b`
  if both do. Everything else is no real WHERE: `id = id`, `x IS NOT NULL`, one- or two-sided ranges
  (`rowid > 0`, `id BETWEEN 0 AND 1e18`: their width depends on data nobody sees), `NOT IN`, `LIKE`,
  subqueries, functions of a column (`coalesce(1, id) = 1`), and a predicate on another table in a
  `USING`/`FROM`/join (an unqualified column there might be the other table's). On SQLite an unqualified
  double-quoted name is not trusted as a column: SQLite reads `"a"` as the string 'a' when no such column exists.
- A function call is read-only only if the function is on the dialect's list of known pure functions
  (`PURE_FUNCTIONS`: aggregates, string, maths, date, JSON, window functions, `now`, `coalesce` ...).
  Anything else is in `unknown_functions` and the statement is not `read_only`: `nextval`/`setval`,
  PostgreSQL's `pg_*` admin functions, `dblink*`, `lo_*`, and every user-defined function (it may write).
- `EXPLAIN ANALYZE <statement>` runs the statement: its kinds (and the inner statement's facts) are the
  EXPLAIN's. A locking read (`SELECT ... FOR UPDATE`) has the kind `lock`, a write.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.simplify import simplify


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
    "nextval", "setval", "pg_advisory_lock", "pg_switch_wal", "pg_rotate_logfile", "pg_create_restore_point",
    "sleep", "benchmark", "get_lock", "release_lock", "txid_current", "pg_current_xact_id",
})  # fmt: skip
_DANGEROUS_PREFIXES = ("dblink", "lo_", "pg_", "sys_", "xp_")

# Functions known not to write, by the name the `functions` fact shows (sqlglot's name for a function it knows,
# e.g. `group_concat` for `string_agg`, else the name as written). Everything else is `unknown_functions`.
_PURE_COMMON = frozenset({
    # aggregates and window functions
    "count", "sum", "avg", "min", "max", "total", "group_concat", "array_agg", "json_agg", "j_s_o_n_array_agg",
    "logical_and", "logical_or", "stddev", "stddev_pop", "stddev_samp", "variance", "variance_pop", "var_samp",
    "percentile_cont", "percentile_disc", "median", "mode", "any_value", "count_if", "approx_distinct",
    "row_number", "rank", "dense_rank", "percent_rank", "cume_dist", "ntile", "lag", "lead", "first_value",
    "last_value", "nth_value", "every", "bit_and", "bit_or", "bit_xor", "corr", "covar_pop", "covar_samp",
    # conditionals and casts
    "case", "if", "iif", "coalesce", "nullif", "ifnull", "nvl", "greatest", "least", "cast", "try_cast",
    # strings
    "lower", "upper", "length", "char_length", "character_length", "octet_length", "bit_length", "substring",
    "substr", "trim", "ltrim", "rtrim", "btrim", "replace", "concat", "concat_ws", "left", "right", "pad",
    "lpad", "rpad", "repeat", "reverse", "translate", "initcap", "ascii", "chr", "char", "unicode", "hex",
    "str_position", "strpos", "instr", "position", "split_part", "regexp_replace", "regexp_like",
    "regexp_extract", "regexp_substr", "format", "printf", "quote", "md5", "sha", "sha1", "sha2", "sha256",
    "s_h_a2_digest", "starts_with", "ends_with", "contains", "string_to_array", "array_to_string",
    # maths
    "abs", "ceil", "ceiling", "floor", "round", "trunc", "truncate", "sign", "sqrt", "cbrt", "exp", "ln", "log",
    "log10", "log2", "power", "pow", "mod", "div", "pi", "sin", "cos", "tan", "asin", "acos", "atan", "atan2",
    "cot", "degrees", "radians", "rand", "random",
    # dates and times
    "now", "current_date", "current_time", "current_timestamp", "localtime", "localtimestamp",
    "statement_timestamp", "clock_timestamp", "transaction_timestamp", "date", "time", "datetime", "julianday",
    "strftime", "unixepoch", "extract", "date_part", "date_trunc", "timestamp_trunc", "datetime_trunc",
    "time_trunc", "date_add", "date_sub", "datediff", "date_diff", "timestamp_diff", "timestampdiff", "age",
    "make_date", "make_time", "make_timestamp", "to_char", "to_date", "to_timestamp", "to_number",
    "time_to_str", "str_to_date", "str_to_time", "unix_to_time", "time_to_unix", "ts_or_ds_to_date",
    "ts_or_ds_to_timestamp", "number_to_str", "year", "month", "day", "hour", "minute", "second", "week",
    "quarter", "dayofweek", "dayofmonth", "dayofyear", "last_day",
    # JSON and arrays (values in, values out)
    "json", "json_extract", "json_extract_scalar", "json_extract_path", "json_extract_path_text", "json_array",
    "j_s_o_n_object", "json_object", "json_build_object", "json_build_array", "jsonb_build_object",
    "jsonb_build_array", "to_json", "to_jsonb", "json_array_length", "json_typeof", "json_type", "json_valid",
    "parse_json", "array_length", "array_size", "cardinality", "unnest", "explode", "generate_series",
    "exploding_generate_series", "array_contains", "array_position",
    # operators sqlglot models as functions
    "array", "array_contains_all", "arrayoverlaps", "array_overlaps", "collate", "exists", "jsonb_extract",
    "jsonb_extract_scalar", "jsonb_contains", "row", "struct", "tuple", "xor",
    # the session's own identity
    "current_user", "session_user", "current_schema", "current_database", "current_version", "version",
    "typeof", "uuid",
})  # fmt: skip
_PURE_EXTRA = {
    "postgres": frozenset({
        "pg_typeof", "pg_size_pretty", "pg_relation_size", "pg_total_relation_size", "pg_table_size",
        "pg_indexes_size", "pg_database_size", "pg_column_size", "current_setting", "string_agg", "jsonb_agg",
        "json_object_agg", "jsonb_object_agg", "jsonb_array_length", "jsonb_typeof", "jsonb_extract_path",
        "jsonb_extract_path_text", "jsonb_each", "jsonb_array_elements", "json_each", "json_array_elements",
        "json_object_keys", "jsonb_object_keys", "row_to_json", "regexp_matches", "regexp_split_to_array",
        "array_remove", "array_append", "array_prepend", "array_cat", "encode", "decode", "to_tsvector",
        "to_tsquery", "plainto_tsquery", "ts_rank", "ts_headline", "width_bucket", "justify_days",
        "justify_hours", "make_interval", "isfinite", "gen_random_uuid", "uuid_generate_v4", "quote_ident",
        "quote_literal", "format_type", "bool_and", "bool_or", "string_to_table", "array_dims",
    }),
    "sqlite": frozenset({
        "changes", "last_insert_rowid", "total_changes", "sqlite_version", "sqlite_source_id", "likely",
        "unlikely", "likelihood", "zeroblob", "randomblob", "unhex", "glob", "like", "soundex", "json_each",
        "json_tree", "json_quote", "json_group_array", "json_group_object", "json_insert", "json_set",
        "json_replace", "json_remove", "json_patch",
    }),
    "mysql": frozenset({
        "isnull", "date_format", "from_unixtime", "unix_timestamp", "curdate", "curtime", "sysdate", "weekday",
        "lcase", "ucase", "locate", "substring_index", "field", "find_in_set", "elt", "json_unquote",
        "json_contains", "json_length", "json_keys", "database", "schema", "user", "connection_id",
        "found_rows", "row_count", "last_insert_id", "timestampadd", "adddate", "subdate", "dayname", "monthname",
    }),
}  # fmt: skip
PURE_FUNCTIONS: dict[str | None, frozenset[str]] = {
    None: _PURE_COMMON, **{dialect: _PURE_COMMON | extra for dialect, extra in _PURE_EXTRA.items()}
}
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
        "unknown_functions": [],
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
        # What a write would touch, measured by the tool before the policy decides (tools.sql_impact): `impact` is
        # "measured", "unknown" (with `impact_reason`), or "" when nothing measured it; the counts are null unless
        # measured, so a condition on them never reads an unknown impact as zero rows.
        "impact": "",
        "impact_known": False,
        "rows_affected": None,
        "table_rows": None,
        "impact_table": "",
        "impact_verb": "",
        "impact_reason": "",
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
    pure = PURE_FUNCTIONS.get(_dialect_name(dialect), _PURE_COMMON)
    facts["unknown_functions"] = [f for f in facts["functions"] if f not in pure]
    facts["multiple_statements"] = facts["statements"] > 1
    kind_set = set(facts["kinds"])
    facts["writes"] = bool(kind_set & WRITE_KINDS) or facts["delete_without_where"] or facts["update_without_where"]
    facts["ddl"] = bool(kind_set & DDL_KINDS)
    facts["destructive"] = bool(kind_set & DESTRUCTIVE_KINDS) or facts["delete_without_where"]
    facts["privileges"] = bool(kind_set & PRIVILEGE_KINDS)
    facts["dangerous_functions"] = any(_dangerous(f, pure) for f in facts["functions"])
    facts["read_only"] = (
        facts["statements"] > 0
        and kind_set <= READ_KINDS
        and not facts["unparseable"]
        and not facts["opaque"]
        and not facts["dangerous_functions"]
        and not facts["unknown_functions"]
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
        _command(stmt, dialect, facts, kinds, tables, write_tables, functions)
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
        elif isinstance(node, exp.Func) and not isinstance(node, exp.Connector):  # AND/OR are operators
            fname = (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()
            functions.append(fname)
        elif isinstance(node, exp.Command):
            _command(node, dialect, facts, kinds, tables, write_tables, functions)
        if isinstance(node, _NESTED_WRITES):
            nested = _kind_of(node)
            if nested:
                kinds.append(nested)
            target = node.this if isinstance(node.this, exp.Table) else node.find(exp.Table)
            if isinstance(target, exp.Table):
                write_tables.append(_table_name(target))
        if isinstance(node, exp.Delete) and not _real_where(node, dialect):
            facts["delete_without_where"] = True
        elif isinstance(node, exp.Update) and not _real_where(node, dialect):
            facts["update_without_where"] = True
        elif isinstance(node, exp.Select):
            if node.args.get("into") is not None:
                kinds.append("select_into")
            if node.args.get("locks"):
                kinds.append("lock")  # SELECT ... FOR UPDATE / FOR SHARE takes row locks
        elif isinstance(node, exp.When) and "DELETE" in str(node.args.get("then", "")).upper():
            kinds.append("delete")


_EXPLAIN_OPTIONS = frozenset({"analyze", "analyse", "verbose", "query", "plan", "format", "extended", "partitions"})


def _command(
    stmt: exp.Command,
    dialect: str | None,
    facts: dict[str, Any],
    kinds: list[str],
    tables: list[str],
    write_tables: list[str],
    functions: list[str],
) -> None:
    """An opaque statement sqlglot only tokenised: classify by its keyword; look inside EXPLAIN."""
    name = str(stmt.this or "").strip().lower()
    rest = str(stmt.expression.this if isinstance(stmt.expression, exp.Literal) else stmt.expression or "")
    kind = _KEYWORD_KINDS.get(name, name or "unknown")
    if kind == "explain":
        _explain(rest, dialect, facts, kinds, tables, write_tables, functions)
    if kind not in READ_KINDS:
        facts["opaque"] = True
    kinds.append(kind)


def _explain(
    rest: str,
    dialect: str | None,
    facts: dict[str, Any],
    kinds: list[str],
    tables: list[str],
    write_tables: list[str],
    functions: list[str],
) -> None:
    """`EXPLAIN [ANALYZE] [VERBOSE] stmt`, `EXPLAIN (ANALYZE, ...) stmt`, `EXPLAIN QUERY PLAN stmt`.

    ANALYZE runs the statement, so its facts are the EXPLAIN's: any `analy[sz]e` among the options counts (even
    `ANALYZE false`: a mistake here costs a review). Options that cannot be told apart from the statement make
    the whole unparseable.
    """
    text, analyze = rest.lstrip(), False
    if text.startswith("("):
        close = text.find(")")
        if close < 0 or "'" in text[:close] or '"' in text[:close]:
            facts["unparseable"] = True
            facts["errors"].append("EXPLAIN options that cannot be read")
            return
        analyze = any(w.lower() in ("analyze", "analyse") for w in _WORD.findall(text[1:close]))
        text = text[close + 1 :].lstrip()
    while (m := re.match(r"([A-Za-z_]+)\s*(=\s*[A-Za-z_]+\s*)?", text)) and m.group(1).lower() in _EXPLAIN_OPTIONS:
        analyze = analyze or m.group(1).lower() in ("analyze", "analyse")
        text = text[m.end() :]
    inner = classify_sql([text], dialect)
    tables.extend(inner["tables"])
    if not inner["statements"] or inner["unparseable"]:
        facts["unparseable"] = True
        facts["errors"].extend(f"EXPLAIN: {e}" for e in inner["errors"] or ["no statement to explain"])
    if not analyze:
        return  # a plan only: the statement does not run
    kinds.extend(inner["kinds"])
    write_tables.extend(inner["write_tables"])
    functions.extend(inner["functions"])
    for flag in ("opaque", "delete_without_where", "update_without_where"):
        facts[flag] = facts[flag] or inner[flag]
    if not inner["read_only"]:
        kinds.append("explain_analyze")


def _kind_of(node: exp.Expression) -> str | None:
    for cls in type(node).__mro__:
        kind = _CLASS_KINDS.get(cls)
        if kind is not None:
            return kind
    return None


def _real_where(node: exp.Delete | exp.Update, dialect: str | None) -> bool:
    """Whether the statement's WHERE really narrows the rows of its target (the rule is in the module docstring)."""
    where = node.args.get("where")
    if where is None:
        return False
    target = node.this if isinstance(node.this, exp.Table) else None
    targets = node.args.get("tables") or ([target] if target is not None else [])
    names = {n.lower() for t in targets if isinstance(t, exp.Table) for n in (t.name, t.alias_or_name) if n}
    joined = bool(
        node.args.get("using") or node.args.get("from_") or node.args.get("from") or node.args.get("joins")
        or (target is not None and target.args.get("joins"))
    )
    try:
        predicate = simplify(where.this.copy(), dialect=dialect)
    except Exception:  # the optimizer failing on odd input is no real WHERE, not a crash
        return False
    return _narrows(predicate, names, joined, _dialect_name(dialect) == "sqlite")


def _narrows(e: exp.Expr, names: set[str], joined: bool, sqlite: bool) -> bool:
    e = e.unnest()
    if isinstance(e, exp.And):
        return _narrows(e.left, names, joined, sqlite) or _narrows(e.right, names, joined, sqlite)
    if isinstance(e, exp.Or):
        return _narrows(e.left, names, joined, sqlite) and _narrows(e.right, names, joined, sqlite)

    def column(c: exp.Expr) -> bool:
        if not isinstance(c, exp.Column) or c.args.get("catalog") or c.args.get("db"):
            return False
        if c.table:
            return c.table.lower() in names
        # Unqualified: ambiguous beside another table; on SQLite `"x"` is the string 'x' when no column x exists.
        return not joined and not (sqlite and isinstance(c.this, exp.Identifier) and c.this.quoted)

    if isinstance(e, exp.EQ):
        return (column(e.left) and _constant(e.right)) or (column(e.right) and _constant(e.left))
    if isinstance(e, exp.In):
        values = e.expressions
        return column(e.this) and bool(values) and not e.args.get("query") and all(_constant(v) for v in values)
    return False


def _constant(e: exp.Expr) -> bool:
    e = e.unnest()
    if isinstance(e, exp.Neg):
        e = e.this
    if isinstance(e, exp.Cast):
        return _constant(e.this)
    return isinstance(e, (exp.Literal, exp.Placeholder, exp.Parameter, exp.Boolean))


def _dialect_name(dialect: str | None) -> str | None:
    """The dialect's family for the pure-function lists (`postgresql`, `postgres` -> postgres)."""
    if dialect is None:
        return None
    name = dialect.lower()
    return "postgres" if name.startswith("postgres") else name


def _dangerous(name: str, pure: frozenset[str]) -> bool:
    return name in DANGEROUS_FUNCTIONS or (name.startswith(_DANGEROUS_PREFIXES) and name not in pure)


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
