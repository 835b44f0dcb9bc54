"""The SQL pack: query, change and export one configured database (SQLite built in; PostgreSQL, MySQL optional).

Options (`tools: [{module: tools.sql, options: {...}}]`):
  database    SQLite file path, `sqlite:///path`, `postgresql://...` (needs keyturn[postgres]) or `mysql://...`
              (needs keyturn[mysql]). Default `data.db`. Relative paths are relative to the process's cwd. A SQLite
              file that does not exist is created empty when first read (its directory must exist), so a fresh
              install's first query runs.
  export_dir  where `sql_export` may write files (default `exports`, relative to the cwd).
  max_rows    cap on rows `sql_query` returns, whatever `limit` asks (default 10000).
  timeout     seconds to wait for a connection or a locked SQLite database (default 30).
  impact_timeout
              seconds the impact count of a write may take before its impact is unknown (default 2; see
              `tools.sql_impact`).

The policy decides what may run; the tools run what they were given, with structural guards that do not rest on
the classifier being right:
- one statement per call (PostgreSQL statements go through the extended protocol, which refuses a second one);
- `sql_query` and `sql_export` always, and `sql_execute` whenever the decision judged the call read-only
  (`current_limits().read_only`), run read-only: SQLite opens the file with `mode=ro`, sets `PRAGMA query_only`
  and authorizes only reads; PostgreSQL runs a `READ ONLY` transaction that is rolled back; MySQL runs
  `START TRANSACTION READ ONLY`. A write the classifier misjudged as a read fails instead of writing;
- SQLite refuses ATTACH/DETACH/VACUUM INTO and the pragmas that change the whole process (heap limits, the temp
  directory);
- `sql_execute` measures what a write would touch before the policy decides (`tools.sql_impact`: the rows its
  WHERE matches and its table's size, counted read-only with a short timeout), and reports the rows it really
  changed when it runs (`report_rows`), which the ledger records beside the estimate;
- on SQLite each tool declares what its run would refuse (`Database.refusal`: the statement compiled under the run's
  guard, never run), so the gate refuses such a call before the policy and any reviewer are asked;
- a `database` that is keyturn's ledger or one of its state files is refused at load and at each connection
  (by real path and by inode, so a symlink or hard link made later is refused too).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib
import json
import os
import re
import socket
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio.to_thread
import sqlglot
import sqlglot.errors
from pydantic import Field
from typing_extensions import TypedDict

from server.classify.sql import DDL_KINDS, PRIVILEGE_KINDS, WRITE_KINDS, classify_sql
from server.config import safe_url
from server.errors import ConfigError, InvalidArguments
from server.execution import PackContext, current_limits, report_rows
from server.guarded import GuardedTool, ToolRegistry, guarded_tool
from tools._common import PackOptions, jsonable, open_new, parse_options, real_roots, resolve_inside
from tools.sql_impact import measure

PACK = "tools.sql"
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,127}(\.[A-Za-z_][A-Za-z0-9_$]{0,127})?$")
_BATCH = 500


class SqlOptions(PackOptions):
    database: str = "data.db"
    export_dir: str = "exports"
    max_rows: int = Field(10_000, ge=1)
    timeout: float = Field(30.0, gt=0)
    impact_timeout: float = Field(2.0, gt=0, le=60)


class QueryResult(TypedDict):
    columns: list[str]
    rows: list[list[Any]]
    row_count: int
    truncated: bool


class ExecuteResult(TypedDict):
    rows_affected: int


class ExportResult(TypedDict):
    path: str
    rows: int
    bytes: int


class Database:
    """One configured database. Every method blocks; the tools call them on a worker thread.

    `forbidden`: (device, inode) of keyturn's state files; a SQLite file that is one of them is never opened.
    """

    def __init__(
        self, dialect: Literal["sqlite", "postgres", "mysql"], target: str, timeout: float = 30.0,
        forbidden: Callable[[], set[tuple[int, int]]] | None = None, impact_timeout: float = 2.0,
    ) -> None:
        self.dialect, self.target, self.timeout = dialect, target, timeout
        self.forbidden = forbidden or set
        self.impact_timeout = impact_timeout

    @classmethod
    def from_option(cls, value: str, timeout: float = 30.0, context: PackContext | None = None) -> Database:
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme in ("", "sqlite"):
            path = value[len("sqlite:///") :] if scheme else value
            if not path or (scheme and not value.startswith("sqlite:///")):
                raise ConfigError(f"tool pack {PACK!r}: database {value!r}: write sqlite:///relative.db or a file path")
            real = Path(os.path.realpath(os.path.abspath(path)))
            state = context if context is not None else PackContext()
            refuse_state(value, real, state)
            return cls("sqlite", str(real), timeout, forbidden=lambda: _inodes(state.existing_state()))
        driver = {"postgresql": "psycopg", "postgres": "psycopg", "mysql": "pymysql"}.get(scheme)
        if driver is None:
            raise ConfigError(f"tool pack {PACK!r}: database scheme {scheme!r} is not sqlite, postgresql or mysql")
        try:
            importlib.import_module(driver)
        except ImportError as e:
            extra = "postgres" if driver == "psycopg" else "mysql"
            raise ConfigError(f"tool pack {PACK!r}: {driver} is missing; install keyturn[{extra}]") from e
        if driver == "psycopg" and context is not None and context.ledger_url is not None:
            refuse_ledger_database(value, context.ledger_url)
        return cls("postgres" if driver == "psycopg" else "mysql", value, timeout)

    def quote(self, table: str) -> str:
        q = "`" if self.dialect == "mysql" else '"'
        return ".".join(f"{q}{part}{q}" for part in table.split("."))

    @contextlib.contextmanager
    def connect(self, *, read_only: bool) -> Iterator[Any]:
        """A connection for one statement: committed after it, or (read-only) always rolled back."""
        guard = _SqliteGuard(read_only)
        conn = self._open(read_only, guard)
        try:
            yield conn
            if read_only:
                conn.rollback()
            else:
                conn.commit()
        except BaseException as e:
            with contextlib.suppress(Exception):
                conn.rollback()
            if isinstance(e, sqlite3.DatabaseError) and guard.refused:
                raise PermissionError(guard.refused) from e
            raise
        finally:
            conn.close()

    def _open(self, read_only: bool, guard: _SqliteGuard) -> Any:
        if self.dialect == "sqlite":
            path = Path(self.target)
            self._refuse_state_file(path)
            if read_only:
                if not path.exists():
                    if not path.parent.is_dir():
                        raise FileNotFoundError(f"database {path} does not exist yet, nor its directory")
                    create_empty(path)  # an empty file is an empty database: a fresh install's first read runs
                uri = "file:" + urllib.parse.quote(str(path)) + "?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=self.timeout, isolation_level=None)
                conn.execute("PRAGMA query_only = 1")
            else:
                conn = sqlite3.connect(path, timeout=self.timeout, isolation_level=None)
            conn.set_authorizer(guard)
            return conn
        if self.dialect == "postgres":
            psycopg = importlib.import_module("psycopg")
            # Not autocommit when read-only: psycopg then opens `BEGIN READ ONLY`, and `connect` rolls it back.
            conn = psycopg.connect(self.target, autocommit=not read_only, connect_timeout=int(self.timeout))
            conn.read_only = read_only
            return conn
        pymysql = importlib.import_module("pymysql")
        url = urllib.parse.urlsplit(self.target)
        conn = pymysql.connect(
            host=url.hostname or "localhost",
            port=url.port or 3306,
            user=urllib.parse.unquote(url.username or ""),
            password=urllib.parse.unquote(url.password or ""),
            database=url.path.lstrip("/") or None,
            connect_timeout=self.timeout,
            autocommit=not read_only,
        )
        if read_only:
            conn.cursor().execute("START TRANSACTION READ ONLY")
        return conn

    def refusal(self, sql: str, *, read_only: bool) -> str | None:
        """What the run of `sql` would refuse, found before anything runs: the statement is compiled (as `EXPLAIN`,
        which never runs it) on a read-only connection under the same guard as the run, so the answer is SQLite's
        own, whatever the spelling (comments, case, a CTE, a pragma's form). None when the run's guards would let it
        through, when the database cannot say now (locked, missing: the run reports that), and for PostgreSQL and
        MySQL, whose read-only transactions refuse a write only when it runs."""
        if self.dialect != "sqlite":
            return None
        guard = _SqliteGuard(read_only)
        try:
            conn = self._open(True, guard)
        except PermissionError as e:  # the file leads to keyturn's own state now
            return str(e)
        except (OSError, sqlite3.Error):
            return None
        try:
            program = conn.execute("EXPLAIN " + sql).fetchall()
        except sqlite3.ProgrammingError as e:  # the driver's own refusal (a second statement, unbound parameters)
            return guard.refused or f"SQLite refuses it: {e}"
        except sqlite3.Error:
            # A statement that compiles only where a table exists must not tell the agent whether it does (the
            # policy may deny this agent any read): a write through a read-only tool, or an ATTACH/DETACH, is
            # refused in the same words whether SQLite refused it or could not compile it (no such table). Anything
            # else that did not compile is left to the policy and the run, which may meet another schema by then.
            kinds = _parsed_kinds(sql)
            if set(kinds) & _ALWAYS_REFUSED:
                return _ATTACH_REFUSED
            writes = [k for k in kinds if k in _WRITING] if read_only else []
            if writes and (guard.refused_by_mode or not guard.refused):
                return f"this call runs read-only, and this statement writes ({', '.join(writes)})"
            return guard.refused or None
        finally:
            conn.close()
        # VACUUM attaches its target only when it runs: its program says whether it has one (P2, the INTO file).
        for op in program:
            if str(op[1]) == "Vacuum" and (read_only or op[3]):
                return "this call runs read-only: SQLite refused VACUUM" if read_only else _ATTACH_REFUSED
        return None

    def impact(self, sql: str) -> dict[str, Any]:
        """Facts on what `sql` would touch (`tools.sql_impact`), measured read-only within `impact_timeout`."""
        return measure(self.dialect, self._counting_connection, sql, self.impact_timeout)

    def _counting_connection(self, timeout: float) -> Any:
        if self.dialect == "sqlite":
            guard = _SqliteGuard(True)
            conn = self._open(True, guard)  # mode=ro, query_only, the read-only authorizer
            conn.set_authorizer(None)  # keyturn's own setting: a lock waits no longer than the count may take
            conn.execute(f"PRAGMA busy_timeout = {max(1, int(timeout * 1000))}")
            conn.set_authorizer(guard)
            return conn
        psycopg = importlib.import_module("psycopg")
        conn = psycopg.connect(self.target, autocommit=False, connect_timeout=max(2, int(timeout + 0.999)))
        conn.read_only = True  # psycopg opens `BEGIN READ ONLY`
        return conn

    def _refuse_state_file(self, path: Path) -> None:
        # The configured file was checked at load; this catches a symlink or hard link to keyturn's state made since.
        real = Path(os.path.realpath(path))
        if real != path:
            raise PermissionError(f"tools.sql refuses {path}: it now leads to {real}, not the configured database file")
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in self.forbidden():
                raise PermissionError(f"tools.sql refuses {path}: it is now one of keyturn's own files")

    def _run(self, cur: Any, sql: str) -> None:
        if self.dialect == "postgres":
            # A prepared statement is one statement: PostgreSQL refuses `SELECT 1; COMMIT; DELETE ...` outright,
            # whatever sqlglot made of it (the simple protocol would run all three).
            cur.execute(sql, prepare=True)
        else:
            cur.execute(sql)  # sqlite3 and PyMySQL (without CLIENT.MULTI_STATEMENTS) run one statement at most

    def query(self, sql: str, limit: int) -> QueryResult:
        with self.connect(read_only=True) as conn:
            cur = conn.cursor()
            self._run(cur, sql)
            columns = [str(d[0]) for d in cur.description or ()]
            rows = [list(r) for r in cur.fetchmany(limit + 1)] if cur.description else []
        shown = [[jsonable(v) for v in r] for r in rows[:limit]]
        return {"columns": columns, "rows": shown, "row_count": len(shown), "truncated": len(rows) > limit}

    def execute(self, sql: str, *, read_only: bool = False) -> int:
        """Run one statement; `read_only` (the decision judged it a read) runs it so that it cannot write."""
        with self.connect(read_only=read_only) as conn:
            cur = conn.cursor()
            self._run(cur, sql)
            rows = max(int(cur.rowcount), 0)
        report_rows(rows)  # committed: the ledger records it beside the estimate
        return rows

    def export(self, sql: str, path: Path, fmt: Literal["csv", "jsonl"]) -> ExportResult:
        path.parent.mkdir(parents=True, exist_ok=True)
        count = 0
        with self.connect(read_only=True) as conn:
            cur = conn.cursor()
            self._run(cur, sql)
            columns = [str(d[0]) for d in cur.description or ()]
            out = open_new(path)  # refuses an existing file or a symlink
            try:
                with out:
                    writer = csv.writer(out) if fmt == "csv" else None
                    if writer is not None:
                        writer.writerow(columns)
                    while batch := cur.fetchmany(_BATCH):
                        for row in batch:
                            values = [jsonable(v) for v in row]
                            if writer is not None:
                                writer.writerow(values)
                            else:
                                out.write(json.dumps(dict(zip(columns, values, strict=True))) + "\n")
                        count += len(batch)
            except BaseException:
                path.unlink(missing_ok=True)  # no half-written export is left behind
                raise
        return {"path": str(path), "rows": count, "bytes": path.stat().st_size}


# Pragmas that only report (with or without an argument naming a table or index).
_READ_PRAGMAS = frozenset({
    "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo", "foreign_key_list",
    "database_list", "collation_list", "function_list", "module_list", "pragma_list", "compile_options",
    "integrity_check", "quick_check", "foreign_key_check",
})  # fmt: skip
# Pragmas whose bare form (no `= value`) only reports.
_READ_BARE_PRAGMAS = frozenset({
    "application_id", "auto_vacuum", "cache_size", "data_version", "encoding", "foreign_keys", "freelist_count",
    "journal_mode", "max_page_count", "page_count", "page_size", "schema_version", "synchronous", "user_version",
    "query_only", "recursive_triggers", "secure_delete", "temp_store", "busy_timeout", "locking_mode",
})  # fmt: skip
# Pragmas that change the whole process, keyturn's own ledger connections included: never, on any connection.
_PROCESS_PRAGMAS = frozenset({"temp_store_directory", "data_store_directory", "soft_heap_limit", "hard_heap_limit"})
_READ_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE})


class _SqliteGuard:
    """SQLite's authorizer for one connection; `refused` says what it refused, for the error the agent sees.

    Always: no ATTACH/DETACH of a file (it would reach any file on disk, past the policy's view of this database;
    VACUUM INTO attaches one) and no process-wide pragma. Read-only: nothing but reads and the reporting pragmas,
    on top of `mode=ro` and `query_only` (which still let a temp table or a connection setting through).
    """

    def __init__(self, read_only: bool) -> None:
        self.read_only = read_only
        self.refused = ""
        self.refused_by_mode = False  # the refusal is the read-only mode's (a write), not one made in every mode

    def __call__(self, action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
        if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
            if action == sqlite3.SQLITE_ATTACH and arg1 == "" and not self.read_only:
                return sqlite3.SQLITE_OK  # a private temporary database: what a plain VACUUM attaches
            return self._deny(_ATTACH_REFUSED if not self.read_only
                              else "this call runs read-only: SQLite refused ATTACH/VACUUM")
        if action == sqlite3.SQLITE_PRAGMA:
            name = (arg1 or "").lower()
            if name in _PROCESS_PRAGMAS:
                return self._deny(f"tools.sql refuses PRAGMA {name} on SQLite: it changes the whole process")
            if not self.read_only or name in _READ_PRAGMAS or (arg2 is None and name in _READ_BARE_PRAGMAS):
                return sqlite3.SQLITE_OK
            return self._deny(f"this call runs read-only: SQLite refused PRAGMA {name}"
                              + ("" if arg2 is None else f" = {arg2}"), by_mode=True)
        if not self.read_only or action in _READ_ACTIONS:
            return sqlite3.SQLITE_OK
        return self._deny(f"this call runs read-only: SQLite refused {_ACTION_NAMES.get(action, 'a write')}"
                          + (f" on {arg1}" if arg1 else ""), by_mode=True)

    def _deny(self, why: str, *, by_mode: bool = False) -> int:
        if not self.refused:
            self.refused, self.refused_by_mode = why, by_mode
        return sqlite3.SQLITE_DENY


_ACTION_NAMES = {
    getattr(sqlite3, f"SQLITE_{name}"): name.replace("_", " ").lower()
    for name in (
        "CREATE_INDEX", "CREATE_TABLE", "CREATE_TEMP_INDEX", "CREATE_TEMP_TABLE", "CREATE_TEMP_TRIGGER",
        "CREATE_TEMP_VIEW", "CREATE_TRIGGER", "CREATE_VIEW", "DELETE", "DROP_INDEX", "DROP_TABLE", "DROP_TEMP_INDEX",
        "DROP_TEMP_TABLE", "DROP_TEMP_TRIGGER", "DROP_TEMP_VIEW", "DROP_TRIGGER", "DROP_VIEW", "INSERT", "UPDATE",
        "TRANSACTION", "ALTER_TABLE", "REINDEX", "ANALYZE", "CREATE_VTABLE", "DROP_VTABLE", "SAVEPOINT",
    )
}  # fmt: skip


def _inodes(paths: Iterable[Path]) -> set[tuple[int, int]]:
    found = set()
    for p in paths:
        with contextlib.suppress(OSError):
            st = os.stat(p)
            found.add((st.st_dev, st.st_ino))
    return found


_WRITING = WRITE_KINDS | DDL_KINDS | PRIVILEGE_KINDS
_ALWAYS_REFUSED = frozenset({"attach", "detach"})
_ATTACH_REFUSED = "tools.sql refuses ATTACH, DETACH and VACUUM INTO on SQLite"


def _parsed_kinds(sql: str) -> list[str]:
    """The statement kinds of `sql` from its parse tree ([] when it does not parse)."""
    facts = classify_sql([sql], "sqlite")
    return [] if facts["unparseable"] else list(facts["kinds"])


def create_empty(path: Path) -> None:
    """An empty SQLite database (an empty file) at `path`, unless a file is there already. Never through a symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, flags, 0o644))


def _pg_target(url: str) -> tuple[set[str], int, str]:
    """(the addresses the host resolves to, port, database) of a postgresql:// URL; local spellings are one."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "localhost").rstrip(".").lower()
    try:
        port = parts.port or 5432
    except ValueError:
        port = 5432
    database = urllib.parse.unquote(parts.path.lstrip("/")) or urllib.parse.unquote(parts.username or "")
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, port)}
    except (OSError, UnicodeError):
        addresses = {host}
    local = {"127.0.0.1", "::1", "localhost"}
    return ({"local"} if addresses & local or host.startswith("/") else addresses), port, database


def refuse_ledger_database(spelled: str, ledger_url: str) -> None:
    """A `ConfigError` if the PostgreSQL database `spelled` names is keyturn's ledger (same server and database)."""
    mine, theirs = _pg_target(spelled), _pg_target(ledger_url)
    if mine[0] & theirs[0] and mine[1:] == theirs[1:]:
        raise ConfigError(f"tool pack {PACK!r}: database {safe_url(spelled)!r} is keyturn's own ledger database; "
                          "a tool may not connect to it")


def refuse_state(spelled: str, real: Path, context: PackContext) -> None:
    """A `ConfigError` if the SQLite file `real` is keyturn's ledger (or its -wal/-shm/-journal) or a state file."""
    state = {Path(os.path.realpath(p)) for p in (*context.state_paths, *context.existing_state())}
    if context.ledger_path is not None:
        ledger = Path(os.path.realpath(context.ledger_path))
        state |= {ledger, *(Path(f"{ledger}{suffix}") for suffix in ("-wal", "-shm", "-journal"))}
    if real in state or (_inodes([real]) & _inodes(state)):
        raise ConfigError(
            f"tool pack {PACK!r}: database {spelled!r} is {real}, one of keyturn's own files (its ledger or state);"
            " an agent's SQL must never reach it: point the pack at another database"
        )


def one_statement(sql: str, dialect: str, *, tool: str, field: str) -> None:
    """Refuse an empty argument or one that holds several statements (the classifier judges the first alone)."""
    if not sql.strip():
        raise InvalidArguments(f"{tool}: argument {field!r} is empty", tool=tool, field=field)
    try:
        parsed = [s for s in sqlglot.parse(sql, dialect=dialect) if s is not None]
    except sqlglot.errors.SqlglotError:
        return  # unparseable SQL is the classifier's to refuse; every driver here runs one statement at most
    if len(parsed) > 1:
        raise InvalidArguments(
            f"{tool}: argument {field!r} holds {len(parsed)} statements; send one per call", tool=tool, field=field
        )


def build_tools(db: Database, export_root: Path, max_rows: int) -> list[GuardedTool]:
    kind = f"sql:{db.dialect}"

    @guarded_tool(classifiers={"query": kind}, annotations={"readOnlyHint": True, "openWorldHint": False})
    async def sql_query(query: str, limit: Annotated[int, Field(ge=1)] = 1000) -> QueryResult:
        """Run one read-only SQL query and return its rows (at most `limit`) as JSON."""
        return await anyio.to_thread.run_sync(db.query, query, min(limit, max_rows))

    @sql_query.check
    def _query_check(args: dict[str, Any]) -> None:
        one_statement(args["query"], db.dialect, tool="sql_query", field="query")

    @sql_query.refuses
    def _query_refuses(args: dict[str, Any]) -> str | None:
        return db.refusal(args["query"], read_only=True)

    @guarded_tool(classifiers={"statement": kind}, annotations={"destructiveHint": True, "openWorldHint": False})
    async def sql_execute(statement: str) -> ExecuteResult:
        """Run one SQL statement that changes data or schema; returns the number of rows affected."""
        # Read here, in the gate's context: a call the decision judged read-only runs on a read-only connection.
        read_only = current_limits().read_only
        rows = await anyio.to_thread.run_sync(functools.partial(db.execute, statement, read_only=read_only))
        return {"rows_affected": rows}

    @sql_execute.check
    def _execute_check(args: dict[str, Any]) -> None:
        one_statement(args["statement"], db.dialect, tool="sql_execute", field="statement")

    @sql_execute.impact
    def _execute_impact(args: dict[str, Any]) -> dict[str, Any]:
        return db.impact(args["statement"])

    @sql_execute.refuses
    def _execute_refuses(args: dict[str, Any]) -> str | None:
        # What it refuses whatever the decision (a call judged read-only also runs under the read-only guard, but
        # the classifier judged it a read, so that guard lets it through).
        return db.refusal(args["statement"], read_only=False)

    @guarded_tool(
        classifiers={"query": kind, "path": "path"},
        annotations={"readOnlyHint": False, "destructiveHint": False, "openWorldHint": False},
        roots=(export_root,),
    )
    async def sql_export(
        path: str, format: Literal["csv", "jsonl"] = "csv", table: str | None = None, query: str | None = None
    ) -> ExportResult:
        """Export a table or a query's rows to a new CSV or JSON Lines file under the export directory."""
        assert query is not None  # the check fills it in from `table`
        return await anyio.to_thread.run_sync(db.export, query, Path(path), format)

    @sql_export.check
    def _export_check(args: dict[str, Any]) -> dict[str, Any]:
        table, query = args["table"], args["query"]
        if table is not None:
            if not _TABLE.match(table):
                raise InvalidArguments(
                    "sql_export: argument 'table' is not a table name (letters, digits, _ and $, as name or "
                    "schema.name)",
                    tool="sql_export",
                    field="table",
                )
            # The query a table export runs is spelled out, so the classifier and the reviewer see it.
            generated = f"SELECT * FROM {db.quote(table)}"
            if query is not None and query != generated:
                raise InvalidArguments(
                    "sql_export: give either 'table' or 'query', not both", tool="sql_export", field="query"
                )
            query = generated
        elif query is None:
            raise InvalidArguments("sql_export: give 'table' or 'query'", tool="sql_export", field="table")
        one_statement(query, db.dialect, tool="sql_export", field="query")
        real = resolve_inside(args["path"], (export_root,), tool="sql_export", field="path")
        if real == export_root:
            raise InvalidArguments(
                "sql_export: argument 'path' names the export directory itself", tool="sql_export", field="path"
            )
        return {**args, "path": str(real), "query": query}

    @sql_export.refuses
    def _export_refuses(args: dict[str, Any]) -> str | None:
        return db.refusal(args["query"], read_only=True)

    return [sql_query, sql_execute, sql_export]


def register(registry: ToolRegistry, options: Mapping[str, Any], context: PackContext) -> None:
    opts = parse_options(SqlOptions, options, PACK)
    db = Database.from_option(opts.database, opts.timeout, context)
    db.impact_timeout = opts.impact_timeout
    for tool in build_tools(db, real_roots([opts.export_dir])[0], opts.max_rows):
        registry.add(tool)
