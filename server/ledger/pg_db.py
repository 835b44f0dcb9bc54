"""The PostgreSQL store's connections: a small pool of psycopg 3 connections, each unit of work in a worker
thread, and the one dialect shim that lets the ledger's SQL (`tx`, `queries`, `chain`, `audit`, `bundle`,
`replay`) run unchanged on PostgreSQL.

Why threads and synchronous connections: a write's body (`Store.transaction`, `mutate_call`) is a synchronous
function that reads and decides inside the transaction, the same body for every store. Each unit runs whole on one
pooled connection in a worker thread (as SQLite's long reads do), so the event loop never waits on the network.
psycopg is imported here only, and only when a `postgresql://` ledger is opened: SQLite users need not install it.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

from server.config import safe_url
from server.errors import LedgerError

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

def import_psycopg() -> Any:
    """psycopg, or a one-line error saying how to install it."""
    try:
        import psycopg
    except ImportError as e:
        raise LedgerError("a postgresql:// ledger needs psycopg: pip install 'keyturn[postgres]'") from e
    return psycopg


# -- the dialect -----------------------------------------------------------------------------------------------

_NAMED = re.compile(r"(?<![:\w]):([a-z_]+)\b")
_REPLACE_INSTANCE = ("INSERT OR REPLACE INTO instances(id, host, pid, started, heartbeat) VALUES (?,?,?,?,?)")


@functools.lru_cache(maxsize=512)
def translate(sql: str, named: bool) -> str:
    """SQLite's spelling of one of the ledger's statements in PostgreSQL's (with psycopg's placeholders)."""
    if sql.strip() == _REPLACE_INSTANCE:
        sql = ("INSERT INTO instances(id, host, pid, started, heartbeat) VALUES (?,?,?,?,?) ON CONFLICT (id) DO "
               "UPDATE SET host = excluded.host, pid = excluded.pid, started = excluded.started, "
               "heartbeat = excluded.heartbeat")
    if sql.lstrip().startswith("INSERT OR IGNORE INTO"):
        sql = sql.replace("INSERT OR IGNORE INTO", "INSERT INTO", 1) + " ON CONFLICT DO NOTHING"
    sql = re.sub(r"INDEXED BY \w+", "", sql)
    sql = sql.replace("%", "%%")
    sql = _NAMED.sub(r"%(\1)s", sql) if named else sql.replace("?", "%s")
    sql = re.sub(r"instr\(([^,]+), ([^)]+)\)", r"strpos(\1, \2)", sql)
    return sql.replace("SELECT value FROM json_each(%s)", "SELECT jsonb_array_elements_text(%s::jsonb)")


UNREACHABLE = "its ledger's database cannot be reached"
"""What an agent reads of a connection failure (the operator's message names the server)."""


class PgRow:
    """A row by position and by column name, as `sqlite3.Row` (what the shared SQL functions read)."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values = tuple(values)
        self._index = index

    def __getitem__(self, key: int | str) -> Any:
        return self._values[self._index[key] if isinstance(key, str) else key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._index)


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], PgRow]:
    index = {c.name: i for i, c in enumerate(cursor.description or ())}
    return lambda values: PgRow(values, index)


class PgConnection:
    """One psycopg connection speaking the `sqlite3.Connection` subset the ledger's SQL functions use
    (`execute(sql, params)` returning a cursor with `fetchone`, `fetchmany`, iteration and `rowcount`)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.raw = conn
        self.statements = 0  # sent in the current unit

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any:
        self.statements += 1
        cursor = self.raw.cursor()
        if params:
            cursor.execute(translate(sql, isinstance(params, Mapping)), params)
        else:
            cursor.execute(translate(sql, False).replace("%%", "%"))
        return cursor

    @property
    def broken(self) -> bool:
        return bool(self.raw.closed or self.raw.broken)

    def close(self) -> None:
        self.raw.close()


def connect(url: str, *, connect_timeout_s: float = 10.0) -> PgConnection:
    """A new connection in autocommit mode (transactions are explicit), binding parameters client-side (each
    value quoted by psycopg: the ledger's statements pass NULL and typed values where the server could not infer
    a parameter's type)."""
    psycopg = import_psycopg()
    try:
        raw = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(connect_timeout_s)),
                              cursor_factory=psycopg.ClientCursor, row_factory=_row_factory,
                              application_name="keyturn")
    except psycopg.Error as e:
        raise LedgerError(f"cannot connect to the ledger at {safe_url(url)}: {_first_line(e)}",
                          public=UNREACHABLE) from None
    return PgConnection(raw)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def db_error(e: BaseException, url: str) -> str:
    """What a failed unit tells: the server's first line, never the password."""
    message = _first_line(e)
    parts = urlsplit(url)
    if parts.password:
        message = message.replace(parts.password, "***")
    return message


BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0


class Pool:
    """Up to `size` connections to `url`, each used by one unit at a time in a worker thread. A connection that
    broke (the server restarted, the network dropped) is closed and replaced by a new one at the next unit.

    While the database cannot be reached, units fail at once with the connection's error (the caller fails closed;
    nothing is retried on its behalf) and a new connection is tried only after a pause, doubling from 0.1 s to 5 s,
    so a database that is down is not hammered by every waiting call."""

    def __init__(self, url: str, size: int = 8, connect_timeout_s: float = 10.0) -> None:
        self.url = url
        self.size = size
        self.connect_timeout_s = connect_timeout_s
        self._idle: list[PgConnection] = []
        self._all: set[PgConnection] = set()
        self._lock = threading.Lock()
        self._limiter: anyio.CapacityLimiter | None = None
        self.closed = False
        self._down: tuple[float, float, str] | None = None  # (retry after, pause, why) while unreachable

    async def run(self, fn: Callable[[PgConnection], T]) -> T:
        """`fn(conn)` in a worker thread on a pooled connection. Not abandoned when cancelled: a unit that began
        runs to its end (its transaction commits or rolls back), so no connection is left mid-transaction."""
        if self.closed:
            raise LedgerError("ledger is not open")
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.size)
        return await anyio.to_thread.run_sync(self._in_thread, fn, limiter=self._limiter)

    def _in_thread(self, fn: Callable[[PgConnection], T]) -> T:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            idle = conn is not None
            if conn is None:
                conn = self._connect()
            conn.statements = 0
            try:
                return fn(conn)
            except Exception:
                # An idle connection found broken at the unit's first statement (a read, or BEGIN): nothing was
                # done, so the unit runs again on a new one. Past that, the failure is the caller's (fail closed).
                if idle and conn.broken and conn.statements <= 1:
                    continue
                raise
            finally:
                with self._lock:
                    if conn.broken or self.closed:
                        self._all.discard(conn)
                        conn.close()
                    else:
                        self._idle.append(conn)

    def _connect(self) -> PgConnection:
        with self._lock:
            down = self._down
        if down is not None and time.monotonic() < down[0]:
            raise LedgerError(down[2], public=UNREACHABLE)
        try:
            conn = connect(self.url, connect_timeout_s=self.connect_timeout_s)
        except LedgerError as e:
            pause = min(down[1] * 2, BACKOFF_MAX_S) if down is not None else BACKOFF_FIRST_S
            with self._lock:
                self._down = (time.monotonic() + pause, pause, str(e))
            raise
        with self._lock:
            self._down = None
            self._all.add(conn)
        return conn

    async def close(self) -> None:
        self.closed = True
        with self._lock:
            conns, self._idle = self._idle, []  # (one in use is closed when its unit ends)
            self._all.difference_update(conns)
        for conn in conns:
            await anyio.to_thread.run_sync(conn.close)
