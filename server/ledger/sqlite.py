"""The SQLite store: the ledger in one SQLite file, shared by every keyturn process on the machine.

Every write is one `BEGIN IMMEDIATE` transaction: it reads the chain's head, appends the next events and
updates the `calls` row together, so several keyturn processes sharing one file keep one linear chain,
and a conditional update (a claim, a vote, a call's end) is won by exactly one of them. Events are announced to
in-process listeners only after their commit, and a write returns only once committed. Where each unit
of work runs (mostly at once on the event loop's thread, never waiting for a lock there) is
`server.ledger.db`'s business; the reads are `server.ledger.queries`, the writes `server.ledger.tx`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from server.errors import LedgerError
from server.ledger import chain, queries
from server.ledger.db import Database
from server.ledger.feed import Listener, Subscription
from server.ledger.queries import CallFilter, Row
from server.ledger.schema import migrate
from server.ledger.shared import SharedStore
from server.ledger.tx import StaleHead, Tx
from server.models import Event, RequestView

if TYPE_CHECKING:
    from server.ledger.store import Store

T = TypeVar("T")


class SqliteStore(SharedStore):
    """The event store on SQLite (see `server.ledger.store.Store`). One writer connection per process; all writes
    go through `transaction`.

    `busy_timeout_ms` bounds how long a unit waits (in the database thread) for another process's lock.
    """

    def __init__(self, path: Path | str, *, synchronous: str = "NORMAL", busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self._db = Database(self.path, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms)
        self._listeners: list[Listener] = []
        self._chain_watch = chain.ChainWatch()
        self._head: tuple[int, str] | None = None  # the chain's head as this process's last append committed it
        self.write_timers: list[Callable[[float], None]] = []
        """Each called with a committed write's duration in seconds, queueing for the writer included (metrics)."""

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> SqliteStore:
        try:
            await self._db.open(migrate)
        except (sqlite3.Error, OSError) as e:
            await self.close()
            raise LedgerError(f"cannot open ledger {self.path}: {e}") from e
        return self

    async def close(self) -> None:
        await self._db.close()

    async def __aenter__(self) -> SqliteStore:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def follow(self, kinds: Iterable[str] | None = None, on_local: Listener | None = None) -> Subscription:
        """Follow the chain for events of `kinds` (see `server.ledger.feed`): woken by this process's commits,
        reading what any process appended."""
        return Subscription(self, kinds, on_local)

    def wake_interval(self, poll_interval_s: float) -> float:
        """How long a follower waits before looking for other processes' appends: the poll interval (nothing
        wakes it for them on SQLite)."""
        return poll_interval_s

    # -- the one write path ------------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` in the database thread (see `Database.run`)."""
        return await self._db.run(fn)

    async def _unit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a quick `fn(conn)` at once if it can, else in the database thread (see `Database.unit`)."""
        return await self._db.unit(fn)

    async def transaction(self, body: Callable[[Tx], T]) -> T:
        """Run `body(tx)` inside one `BEGIN IMMEDIATE` transaction; announce its events after commit.

        Any failure rolls back and raises `LedgerError`; callers treat that as "nothing may run".
        """

        def attempt(conn: sqlite3.Connection, known_head: tuple[int, str] | None) -> tuple[T, list[Event]]:
            tx = Tx(conn=conn, now=time.time(), known_head=known_head)
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = body(tx)
                tx.write_head()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if tx.head is not None:
                self._head = tx.head
            return result, tx.appended

        def unit(conn: sqlite3.Connection) -> tuple[T, list[Event]]:
            # The head this connection committed last saves reading it, unless another process appended since.
            try:
                return attempt(conn, self._head)
            except StaleHead:
                self._head = None
                return attempt(conn, None)

        started = time.perf_counter()
        try:
            result, events = await self._unit(unit)
        except (sqlite3.Error, OSError) as e:
            raise LedgerError(f"ledger write failed: {e}", public=f"its ledger refused the write ({e})") from e
        self._db.committed()
        if self.write_timers:
            took = time.perf_counter() - started
            for timer in self.write_timers:
                with contextlib.suppress(Exception):  # committed: a metric's failure must not read as the write's
                    timer(took)
        if events:
            for listener in list(self._listeners):
                listener(events)
        return result

    # -- call state --------------------------------------------------------------------------------

    # -- queries -----------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T], *, long: bool = False) -> T:
        """A read: at once when quick (indexed lookups); when `long`, on the read-only connection in its thread
        (see `Database.read`), where it holds up no write."""
        try:
            return await (self._db.read(fn) if long else self._unit(fn))
        except sqlite3.Error as e:
            raise LedgerError(f"cannot read ledger: {e}", public=f"its ledger cannot be read ({e})") from e


    async def calls_with_events(self, kinds: Iterable[str], after_seq: int, upto_seq: int) -> set[str]:
        """The calls with an event of one of `kinds` among events `after_seq` < seq <= `upto_seq`: a range of the
        primary key, so it costs what was appended since, however many calls there are."""
        wanted = list(kinds)
        return await self._read(lambda conn: queries.calls_with_events(conn, wanted, after_seq, upto_seq),
                                long=upto_seq - after_seq > 5000)

    async def open_calls_held_elsewhere(self, states: Iterable[str], holder: str) -> list[Row]:
        """`id`, `state` and `holder` of the calls in `states` not held by `holder` (a process's own calls are
        alive while it runs): what a sweep for orphans reads, without the calls' arguments or votes."""
        wanted = list(states)
        return await self._read(lambda conn: queries.open_calls_held_elsewhere(conn, wanted, holder), long=True)

    async def list_calls(self, states: Iterable[str] = ("pending",), limit: int = 200) -> list[RequestView]:
        wanted = list(states)
        return await self._read(lambda conn: queries.list_calls(conn, wanted, limit), long=True)

    async def events(self, call_id: str | None = None, *, after_seq: int = 0, limit: int = 10_000) -> list[Event]:
        return await self._read(lambda conn: queries.events(conn, call_id, after_seq, limit), long=call_id is None)

    async def search_calls(
        self, where: CallFilter, *, limit: int = 100, before: tuple[float, str] | None = None
    ) -> list[RequestView]:
        """Calls matching `where`, newest first; `before` = (created, id) of the last row of the previous page."""
        return await self._read(lambda conn: queries.search_calls(conn, where, limit, before), long=True)

    # -- audit and checkpoints -----------------------------------------------------------------------

    # -- standing grants (see server.approvals.grants) ------------------------------------------------

    # -- processes ---------------------------------------------------------------------------------

    async def register_instance(self, instance_id: str, host: str, pid: int) -> None:
        await self.transaction(lambda tx: tx.register_instance(instance_id, host, pid))

    async def heartbeat(self, instance_id: str) -> None:
        await self.transaction(lambda tx: tx.heartbeat(instance_id))

    async def instances(self) -> list[Row]:
        return await self._read(queries.instances)

    # -- reviewers' web sessions (see server.channels.inbox.sessions) ---------------------------------



Ledger = SqliteStore
"""The ledger keyturn opens (`Ledger(path)`): the SQLite store."""


if TYPE_CHECKING:
    _implements: Store = SqliteStore(Path())  # mypy holds the SQLite store to the interface
