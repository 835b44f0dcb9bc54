"""The ledger's SQLite connections, and where each unit of work on them runs.

A quick unit of work (a write transaction, an indexed read) runs at once on the event loop's thread.
In WAL mode with synchronous=NORMAL a commit is a write() to the WAL, tens of microseconds, while a hop
to a worker thread and back costs hundreds (two wake-ups and GIL hand-offs): that hop was most of what
keyturn added to a call. The loop never blocks on a lock: the connection has `busy_timeout = 0`; a unit
that finds SQLite's write lock held by another process sleeps (asynchronously) and tries again, for up to
`busy_timeout_ms`, and one that finds the connection in use by the database thread waits for it. Long
reads (verify, searches, lists) run on a read-only connection and thread of their own, each in one read
transaction: a consistent snapshot, and in WAL mode neither the loop's writes nor its quick reads wait for
them (a verify of a million events takes seconds). WAL checkpoints, which fsync, run on a connection and
thread of their own (the connections' autocheckpoint is off).

The connections are the standard library's `sqlite3`, and the threads are keyturn's own: each connection has one
single-worker executor, so a connection is used by at most one thread at a time.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from server.errors import LedgerError

T = TypeVar("T")
log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 200
"""Commits between two background WAL checkpoints."""
WAL_RESTART_FRAMES = 16384
"""A WAL this long (64 MiB of 4 KiB pages) is checkpointed completely and truncated, even if writers must wait."""
RESTART_WAIT_MS = 100
"""How long that complete checkpoint waits for readers (another process's long read) before it gives up, to try
again later: writers wait while it waits."""
YIELD_EVERY = 8
"""Units run at once on the loop's thread between two yields to the other tasks."""


def is_busy(e: BaseException) -> bool:
    """SQLite's lock is held elsewhere (SQLITE_BUSY or one of its extended codes)."""
    code = getattr(e, "sqlite_errorcode", 0)
    return isinstance(e, sqlite3.OperationalError) and (code & 0xFF) == sqlite3.SQLITE_BUSY


class _Connection:
    """One `sqlite3` connection and the one thread that runs work on it when the loop must not."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.conn: sqlite3.Connection | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in this connection's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self, path: Path, timeout_s: float, configure: Callable[[sqlite3.Connection], None]) -> None:
        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=timeout_s)
            try:
                conn.row_factory = sqlite3.Row
                configure(conn)
            except BaseException:
                conn.close()
                raise
            return conn

        self.conn = await self.call(connect)

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        try:
            if conn is not None:
                await self.call(conn.close)
        finally:
            self._executor.shutdown(wait=False)


class Database:
    """The ledger's SQLite connection, used at once from the loop's thread or by the database thread, never both;
    plus a read-only connection for long reads (`read`), in a thread of its own."""

    def __init__(self, path: Path, *, synchronous: str, busy_timeout_ms: int) -> None:
        self.path = path
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._db: _Connection | None = None
        self._reader: _Connection | None = None
        self._long_reads = 0  # running on the reader
        self._lock = threading.Lock()  # held by whoever uses the connection; the loop's thread never waits for it
        self._thread_done: anyio.Event | None = None  # set when the database thread's current work ends
        self._units_at_once = 0
        self._commits = 0
        self._checkpointer: _Checkpointer | None = None

    async def open(self, migrate: Callable[[sqlite3.Connection], None]) -> None:
        timeout_s = self._busy_timeout_ms / 1000
        self._db = _Connection("keyturn-ledger")
        try:
            await self._db.open(self.path, timeout_s, self._configure)
            await self.run(migrate)
            # Opened after the migrations, so it never sees a schema half made.
            self._reader = _Connection("keyturn-ledger-read")
            await self._reader.open(self.path, timeout_s, self._configure_reader)
        except BaseException:
            await self.close()
            raise
        self._checkpointer = _Checkpointer(self.path, self._busy_timeout_ms, lambda: self._long_reads > 0)

    def _configure(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode = WAL")  # under the connect timeout: another process may be writing
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # `_Checkpointer` does it, off the loop
        conn.execute("PRAGMA busy_timeout = 0")  # never wait for a lock on the loop's thread: `run` retries

    def _configure_reader(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA query_only = ON")  # it reads: a write by mistake is an error, not a change
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")  # its own thread may wait

    async def close(self) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await reader.close()
        if self._checkpointer is not None:
            checkpointer, self._checkpointer = self._checkpointer, None
            await anyio.to_thread.run_sync(checkpointer.stop)
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` in the database thread, retrying it while SQLite's lock is busy.

        So `fn` must be safe to run again after SQLITE_BUSY: a read, or a transaction begun with
        `BEGIN IMMEDIATE` (which rolls back on any error).
        """
        db = self._open()
        conn = self._conn()
        done = self._thread_done = anyio.Event()
        try:
            return await db.call(self._retrying, fn, conn)
        finally:
            done.set()

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a long read `fn(conn)` on the read-only connection, in its thread, inside one read transaction:
        every statement of `fn` sees the same snapshot of the ledger, and writers go on meanwhile."""
        reader = self._reader
        if reader is None or reader.conn is None:
            raise LedgerError("ledger is not open")
        self._long_reads += 1
        try:
            return await reader.call(_in_read_transaction, fn, reader.conn)
        finally:
            self._long_reads -= 1

    def _retrying(self, fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
        deadline = time.monotonic() + self._busy_timeout_ms / 1000
        pause = 0.001
        while True:
            with self._lock:
                try:
                    return fn(conn)
                except sqlite3.OperationalError as e:
                    if not is_busy(e) or time.monotonic() >= deadline:
                        raise
            time.sleep(pause)  # without the connection: quick reads go on at once meanwhile
            pause = min(pause * 2, 0.05)

    async def unit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a quick unit of work at once on this thread (see the module docstring). A cancellation point
        before it runs, and while it waits for a lock; `fn` must be safe to run again after SQLITE_BUSY."""
        conn = self._conn()
        await anyio.lowlevel.checkpoint_if_cancelled()
        # `busy_timeout_ms` bounds the wait for another connection's lock, counted from the first time SQLite says
        # busy: not the wait for this connection (behind a long read, or many other tasks' units).
        deadline: float | None = None
        pause = 0.001
        while True:
            if not self._lock.acquire(blocking=False):
                # The database thread has the connection (a long read): wait for it rather than queue behind it.
                with anyio.move_on_after(0.01):  # (re-checked: its event may belong to work already replaced)
                    await (self._thread_done or anyio.Event()).wait()
                continue
            busy = False
            try:
                result = fn(conn)
            except sqlite3.OperationalError as e:
                if not is_busy(e):
                    raise
                if deadline is None:
                    deadline = time.monotonic() + self._busy_timeout_ms / 1000
                elif time.monotonic() >= deadline:
                    raise
                busy = True
            finally:
                self._lock.release()
            if not busy:
                self._units_at_once += 1
                if self._units_at_once % YIELD_EVERY == 0:
                    await anyio.lowlevel.cancel_shielded_checkpoint()  # let the other tasks run now and then
                return result
            await anyio.sleep(pause)  # another process is writing
            pause = min(pause * 2, 0.05)

    def committed(self) -> None:
        """Count a commit; every `CHECKPOINT_EVERY`, ask for a checkpoint."""
        self._commits += 1
        if self._commits % CHECKPOINT_EVERY == 0 and self._checkpointer is not None:
            self._checkpointer.request()

    @property
    def checkpoints_done(self) -> int:
        """Background WAL checkpoint passes finished (or failed) so far."""
        return self._checkpointer.passes if self._checkpointer is not None else 0

    def _open(self) -> _Connection:
        if self._db is None:
            raise LedgerError("ledger is not open")
        return self._db

    def _conn(self) -> sqlite3.Connection:
        conn = self._open().conn
        if conn is None:
            raise LedgerError("ledger is not open")
        return conn


def _in_read_transaction(fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
    conn.execute("BEGIN")
    try:
        return fn(conn)
    finally:
        conn.execute("ROLLBACK")  # (it read only: nothing to keep)


class _Checkpointer:
    """Copies the WAL back into the database file, from a connection and thread of its own.

    A checkpoint fsyncs the WAL and the database file (milliseconds): here it holds neither the event loop
    nor the ledger's connection. PASSIVE: it neither waits for nor blocks readers and writers. The WAL starts
    over when a write begins after a checkpoint copied all of it, so one that fell behind is tried again
    shortly (a quiet moment lets it finish); under a steady stream of writes that may never happen, so past
    `WAL_RESTART_FRAMES` a TRUNCATE checkpoint makes writers wait while it finishes. Not while a long read runs:
    it would wait for the read (seconds, for a verify) and writers with it. So it is put off while this process
    reads (`reading()`), and waits at most `RESTART_WAIT_MS` for other processes' readers.
    """

    def __init__(self, path: Path, busy_timeout_ms: int, reading: Callable[[], bool] = lambda: False) -> None:
        self._reading = reading
        self.passes = 0  # checkpoint passes finished (or failed)
        self._wanted = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, args=(path, busy_timeout_ms),
                                        name="keyturn-ledger-checkpoint", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wanted.set()

    def stop(self) -> None:
        self._stopping = True
        self._wanted.set()
        self._thread.join(timeout=30)

    def _loop(self, path: Path, busy_timeout_ms: int) -> None:
        conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_ms / 1000)
        behind = False
        try:
            while True:
                self._wanted.wait(timeout=0.5 if behind else None)
                self._wanted.clear()
                if self._stopping:
                    return
                try:
                    _, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames >= WAL_RESTART_FRAMES and not self._reading():
                        conn.execute(f"PRAGMA busy_timeout = {RESTART_WAIT_MS}")
                        try:
                            blocked, frames, copied = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                        finally:
                            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
                        behind = bool(blocked) or copied < frames
                    else:
                        behind = copied < frames or frames >= WAL_RESTART_FRAMES
                except sqlite3.Error as e:
                    log.warning("WAL checkpoint of %s failed: %s", path, e)
                self.passes += 1
        finally:
            conn.close()
