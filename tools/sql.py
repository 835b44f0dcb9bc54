"""The SQL pack: query, change and export one configured database (SQLite built in; PostgreSQL, MySQL optional).

Options (`tools: [{module: tools.sql, options: {...}}]`):
  database    SQLite file path, `sqlite:///path`, `postgresql://...` (needs keyturn[postgres]) or `mysql://...`
              (needs keyturn[mysql]). Default `data.db`. Relative paths are relative to the process's cwd.
  export_dir  where `sql_export` may write files (default `exports`, relative to the cwd).
  max_rows    cap on rows `sql_query` returns, whatever `limit` asks (default 10000).
  timeout     seconds to wait for a connection or a locked SQLite database (default 30).

The policy decides what may run; the tools run what they were given, with two structural guards: one
statement per call, and `sql_query` runs on a read-only connection, so a write labelled as a read fails.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import re
import sqlite3
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio.to_thread
import sqlglot
import sqlglot.errors
from pydantic import Field
from typing_extensions import TypedDict

from server.errors import ConfigError, InvalidArguments
from server.registry import GuardedTool, ToolRegistry, guarded_tool
from tools._common import PackOptions, jsonable, open_new, parse_options, real_roots, resolve_inside

PACK = "tools.sql"
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,127}(\.[A-Za-z_][A-Za-z0-9_$]{0,127})?$")
_BATCH = 500


class SqlOptions(PackOptions):
    database: str = "data.db"
    export_dir: str = "exports"
    max_rows: int = Field(10_000, ge=1)
    timeout: float = Field(30.0, gt=0)


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
    """One configured database. Every method blocks; the tools call them on a worker thread."""

    def __init__(self, dialect: Literal["sqlite", "postgres", "mysql"], target: str, timeout: float = 30.0) -> None:
        self.dialect, self.target, self.timeout = dialect, target, timeout

    @classmethod
    def from_option(cls, value: str, timeout: float = 30.0) -> Database:
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme in ("", "sqlite"):
            path = value[len("sqlite:///") :] if scheme else value
            if not path or (scheme and not value.startswith("sqlite:///")):
                raise ConfigError(f"tool pack {PACK!r}: database {value!r}: write sqlite:///relative.db or a file path")
            return cls("sqlite", str(Path(path).resolve()), timeout)
        driver = {"postgresql": "psycopg", "postgres": "psycopg", "mysql": "pymysql"}.get(scheme)
        if driver is None:
            raise ConfigError(f"tool pack {PACK!r}: database scheme {scheme!r} is not sqlite, postgresql or mysql")
        try:
            importlib.import_module(driver)
        except ImportError as e:
            extra = "postgres" if driver == "psycopg" else "mysql"
            raise ConfigError(f"tool pack {PACK!r}: {driver} is missing; install keyturn[{extra}]") from e
        return cls("postgres" if driver == "psycopg" else "mysql", value, timeout)

    def quote(self, table: str) -> str:
        q = "`" if self.dialect == "mysql" else '"'
        return ".".join(f"{q}{part}{q}" for part in table.split("."))

    @contextlib.contextmanager
    def connect(self, *, read_only: bool) -> Iterator[Any]:
        conn = self._open(read_only)
        try:
            yield conn
            if read_only:
                conn.rollback()
            else:
                conn.commit()
        except BaseException as e:
            with contextlib.suppress(Exception):
                conn.rollback()
            if isinstance(e, sqlite3.DatabaseError) and "authoriz" in str(e):
                raise PermissionError("tools.sql refuses ATTACH, DETACH and VACUUM INTO on SQLite") from e
            raise
        finally:
            conn.close()

    def _open(self, read_only: bool) -> Any:
        if self.dialect == "sqlite":
            path = Path(self.target)
            if read_only:
                if not path.exists():
                    raise FileNotFoundError(f"database {path} does not exist yet")
                uri = "file:" + urllib.parse.quote(str(path)) + "?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=self.timeout, isolation_level=None)
            else:
                conn = sqlite3.connect(path, timeout=self.timeout, isolation_level=None)
            # ATTACH would reach any file on disk, past the policy's view of this database.
            conn.set_authorizer(_no_attach)
            return conn
        if self.dialect == "postgres":
            psycopg = importlib.import_module("psycopg")
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

    def query(self, sql: str, limit: int) -> QueryResult:
        with self.connect(read_only=True) as conn:
            cur = conn.cursor()
            cur.execute(sql)
            columns = [str(d[0]) for d in cur.description or ()]
            rows = [list(r) for r in cur.fetchmany(limit + 1)] if cur.description else []
        shown = [[jsonable(v) for v in r] for r in rows[:limit]]
        return {"columns": columns, "rows": shown, "row_count": len(shown), "truncated": len(rows) > limit}

    def execute(self, sql: str) -> int:
        with self.connect(read_only=False) as conn:
            cur = conn.cursor()
            cur.execute(sql)
            return max(int(cur.rowcount), 0)

    def export(self, sql: str, path: Path, fmt: Literal["csv", "jsonl"]) -> ExportResult:
        path.parent.mkdir(parents=True, exist_ok=True)
        count = 0
        with self.connect(read_only=True) as conn:
            cur = conn.cursor()
            cur.execute(sql)
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


def _no_attach(action: int, *_: Any) -> int:
    return sqlite3.SQLITE_DENY if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH) else sqlite3.SQLITE_OK


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

    @guarded_tool(classifiers={"statement": kind}, annotations={"destructiveHint": True, "openWorldHint": False})
    async def sql_execute(statement: str) -> ExecuteResult:
        """Run one SQL statement that changes data or schema; returns the number of rows affected."""
        return {"rows_affected": await anyio.to_thread.run_sync(db.execute, statement)}

    @sql_execute.check
    def _execute_check(args: dict[str, Any]) -> None:
        one_statement(args["statement"], db.dialect, tool="sql_execute", field="statement")

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
                    f"sql_export: argument 'table': {table[:80]!r} is not a table name",
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

    return [sql_query, sql_execute, sql_export]


def register(registry: ToolRegistry, options: Mapping[str, Any]) -> None:
    opts = parse_options(SqlOptions, options, PACK)
    db = Database.from_option(opts.database, opts.timeout)
    for tool in build_tools(db, real_roots([opts.export_dir])[0], opts.max_rows):
        registry.add(tool)
