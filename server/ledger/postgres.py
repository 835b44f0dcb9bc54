"""The PostgreSQL store: one ledger shared by several keyturn instances, on several machines.

Every write is one transaction that first takes a transaction-level advisory lock (`pg_advisory_xact_lock`), then
reads the chain's head, appends the next events and updates the `calls` row: appends from every instance form one
chain with no gap and no fork, and a conditional update (a claim, a vote, a call's end) is won by exactly one of
them, as `BEGIN IMMEDIATE` does on SQLite. The SQL is the SQLite store's own (`tx`, `queries`, `chain`, `audit`),
spoken through `server.ledger.pg_db`. A commit that appended events also sends a NOTIFY; each instance LISTENs
(`server.ledger.pg_listen`) and wakes its followers at once, so a decision recorded by any instance reaches the
instance holding the call without polling.

A connection lost during a write's COMMIT leaves its fate unknown: the store asks the database whether the last
event it wrote is there, with the same hash, and answers by what it finds (committed, or nothing written), so an
event is neither lost nor written twice, and nobody retries a call on its own.
"""

from __future__ import annotations

import contextlib
import secrets
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar, cast

import anyio

from server.config import safe_url
from server.errors import LedgerError
from server.ledger import chain, queries
from server.ledger.feed import Listener, Subscription
from server.ledger.pg_db import PgConnection, Pool, db_error, import_psycopg
from server.ledger.pg_listen import NotifyListener
from server.ledger.pg_schema import CHAIN_LOCK, NOTIFY_CHANNEL, migrate
from server.ledger.queries import CallFilter, Row
from server.ledger.shared import SharedStore
from server.ledger.tx import Tx
from server.models import Event, RequestView

if TYPE_CHECKING:
    import sqlite3

    from server.ledger.store import Store

T = TypeVar("T")

LEASE_S = 15.0
"""How long an instance's lease lasts without a heartbeat renewing it."""


def _sql(conn: PgConnection) -> sqlite3.Connection:
    """The shared SQL functions are written to the `sqlite3.Connection` subset that `PgConnection` speaks."""
    return cast("sqlite3.Connection", conn)


class CommitUnknown(Exception):
    """The connection was lost during COMMIT."""


class PostgresStore(SharedStore):
    """The event store on PostgreSQL (see `server.ledger.store.Store`). `url` is a `postgresql://` URL (its
    password is never shown); `pool_size` connections at most; `listen`: wake followers on other instances'
    commits (LISTEN/NOTIFY)."""

    def __init__(self, url: str, *, pool_size: int = 8, listen: bool = True, connect_timeout_s: float = 10.0) -> None:
        self.url = url
        self.where = safe_url(url)
        self._pool = Pool(url, pool_size, connect_timeout_s)
        self._listeners: list[Listener] = []
        self._chain_watch = chain.ChainWatch()
        self.write_timers: list[Callable[[float], None]] = []
        """Each called with a committed write's duration in seconds, waiting for its turn included (metrics)."""
        self._followers: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._token = secrets.token_hex(8)  # this store's own NOTIFYs, which its listener skips
        self._listen = listen
        self._notify: NotifyListener | None = None
        # This instance's writes go to the database one at a time, in the order they were asked for (as on SQLite):
        # the chain's advisory lock lets only one write through at a time anyway, and none waits on it holding a
        # pooled connection that reads could use.
        self._write_turn = anyio.Lock()

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> PostgresStore:
        import_psycopg()
        self._pool.closed = False
        try:
            await self._pool.run(migrate)
        except LedgerError:
            await self.close()
            raise
        except Exception as e:
            await self.close()
            raise LedgerError(f"cannot open ledger {self.where}: {db_error(e, self.url)}") from None
        if self._listen:
            self._notify = NotifyListener(self.url, NOTIFY_CHANNEL, self._token, self._wake_followers)
            await self._notify.start()
        return self

    async def close(self) -> None:
        if self._notify is not None:
            notify, self._notify = self._notify, None
            await notify.stop()
        await self._pool.close()

    async def __aenter__(self) -> PostgresStore:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def follow(self, kinds: Iterable[str] | None = None, on_local: Listener | None = None) -> Subscription:
        """Follow the chain for events of `kinds`: woken by this process's commits and, through NOTIFY, by every
        other instance's."""
        sub = Subscription(self, kinds, on_local)
        self._followers.add(sub)
        return sub

    def _wake_followers(self) -> None:
        for sub in list(self._followers):
            sub.wake()

    @property
    def notified(self) -> bool:
        """True while the LISTEN connection is up (followers are woken by other instances' commits)."""
        return self._notify is not None and self._notify.connected

    def wake_interval(self, poll_interval_s: float) -> float:
        """How long a follower may wait before looking for other instances' appends: long while NOTIFY wakes it
        (a safety net), the configured poll while the LISTEN connection is down."""
        return max(poll_interval_s, 5.0) if self.notified else poll_interval_s

    # -- the one write path ------------------------------------------------------------------------

    async def transaction(self, body: Callable[[Tx], T]) -> T:
        """Run `body(tx)` in one transaction under the chain's advisory lock; announce its events after commit.

        Any failure rolls back and raises `LedgerError`; callers treat that as "nothing may run"."""
        token = self._token

        def unit(conn: PgConnection) -> tuple[T, list[Event]]:
            # One round trip each for BEGIN with the lock, and for the NOTIFY with the COMMIT (client-side binding
            # sends several statements as one query).
            committing = False
            try:
                conn.execute("BEGIN; SELECT pg_advisory_xact_lock(?)", (CHAIN_LOCK,))
                tx = Tx(conn=_sql(conn), now=time.time())
                result = body(tx)
                tx.write_head()
                committing = True
                if tx.appended:
                    conn.execute("SELECT pg_notify(?, ?); COMMIT", (NOTIFY_CHANNEL, f"{token}:{tx.appended[-1].seq}"))
                else:
                    conn.execute("COMMIT")
            except BaseException as e:
                if committing and conn.broken:
                    raise CommitUnknown(result, tx.appended) from e
                if not conn.broken:
                    conn.execute("ROLLBACK")
                raise
            return result, tx.appended

        psycopg = import_psycopg()
        started = time.perf_counter()
        try:
            async with self._write_turn:
                result, events = await self._pool.run(unit)
        except CommitUnknown as unknown:
            # Committed or not, by what the database holds: never written twice, never reported unwritten when it
            # is there. No event, or a database still away: its fate is unknown, and the write fails closed.
            result, events = unknown.args
            if not events or not await self._was_committed(events[-1]):
                raise LedgerError(f"ledger write failed: the connection to {self.where} was lost during the "
                                  "commit (its events are not in the chain, or could not be checked)",
                                  public="the connection to its ledger's database was lost during the write") from None
        except psycopg.Error as e:
            raise LedgerError(f"ledger write failed: {db_error(e, self.url)}",
                              public="its ledger's database refused the write") from None
        if self.write_timers:
            took = time.perf_counter() - started
            for timer in self.write_timers:
                with contextlib.suppress(Exception):  # committed: a metric's failure must not read as the write's
                    timer(took)
        if events:
            for listener in list(self._listeners):
                listener(events)
        return result

    async def _was_committed(self, event: Event) -> bool:
        """Whether `event` is in the chain (with its hash): asked once the database answers again."""
        pause = 0.1
        for _ in range(5):
            try:
                return await self._pool.run(
                    lambda conn: (row := conn.execute("SELECT hash FROM events WHERE seq = ?", (event.seq,))
                                  .fetchone()) is not None and row[0] == event.hash)
            except Exception:  # the database is still away: a write whose fate is unknown fails closed
                await anyio.sleep(pause)
                pause *= 2
        return False

    # -- call state --------------------------------------------------------------------------------

    # -- queries -----------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T], *, long: bool = False) -> T:
        """A read on a pooled connection; when `long`, inside one read-only repeatable-read transaction (every
        statement of `fn` sees the same snapshot)."""

        def unit(conn: PgConnection) -> T:
            if not long:
                return fn(_sql(conn))
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                return fn(_sql(conn))
            finally:
                if not conn.broken:
                    conn.execute("ROLLBACK")

        psycopg = import_psycopg()
        try:
            return await self._pool.run(unit)
        except psycopg.Error as e:
            raise LedgerError(f"cannot read ledger: {db_error(e, self.url)}",
                              public="its ledger's database cannot be read") from None

    async def calls_with_events(self, kinds: Iterable[str], after_seq: int, upto_seq: int) -> set[str]:
        wanted = list(kinds)
        return await self._read(lambda conn: queries.calls_with_events(conn, wanted, after_seq, upto_seq))

    async def open_calls_held_elsewhere(self, states: Iterable[str], holder: str) -> list[Row]:
        wanted = list(states)
        return await self._read(lambda conn: queries.open_calls_held_elsewhere(conn, wanted, holder))

    async def list_calls(self, states: Iterable[str] = ("pending",), limit: int = 200) -> list[RequestView]:
        wanted = list(states)
        return await self._read(lambda conn: queries.list_calls(conn, wanted, limit))

    async def events(self, call_id: str | None = None, *, after_seq: int = 0, limit: int = 10_000) -> list[Event]:
        return await self._read(lambda conn: queries.events(conn, call_id, after_seq, limit))

    async def search_calls(
        self, where: CallFilter, *, limit: int = 100, before: tuple[float, str] | None = None
    ) -> list[RequestView]:
        return await self._read(lambda conn: queries.search_calls(conn, where, limit, before))

    # -- audit and checkpoints -----------------------------------------------------------------------

    # -- standing grants (see server.approvals.grants) ------------------------------------------------

    # -- processes: liveness by leases in the database ------------------------------------------------

    # An instance is alive while its lease runs. Leases are counted on the database's clock, the one clock every
    # instance shares (theirs may differ by seconds), and renewed by each heartbeat (every 2 s).

    async def register_instance(self, instance_id: str, host: str, pid: int) -> None:
        def body(tx: Tx) -> None:
            tx.register_instance(instance_id, host, pid)
            tx.conn.execute(_RENEW_LEASE, (LEASE_S, instance_id))

        await self.transaction(body)

    async def heartbeat(self, instance_id: str) -> None:
        """Renew the instance's lease."""
        def body(tx: Tx) -> None:
            tx.heartbeat(instance_id)
            tx.conn.execute(_RENEW_LEASE, (LEASE_S, instance_id))

        await self.transaction(body)

    async def instances(self) -> list[Row]:
        """The instances, each with `alive` (its lease runs now) and `dead_for` (seconds since its lease ended; 0
        while alive), by the database's clock."""
        def read(conn: sqlite3.Connection) -> list[Row]:
            return [queries.as_row(r) for r in conn.execute(
                "SELECT *, coalesce(lease_until > extract(epoch FROM clock_timestamp())::float8, false) AS alive,"
                " greatest(0, extract(epoch FROM clock_timestamp())::float8 - coalesce(lease_until, 0)) AS dead_for"
                " FROM instances")]

        return await self._read(read)

    # -- reviewers' web sessions ---------------------------------------------------------------------


_RENEW_LEASE = "UPDATE instances SET lease_until = extract(epoch FROM clock_timestamp())::float8 + ? WHERE id = ?"

if TYPE_CHECKING:
    _implements: Store = PostgresStore("postgresql://")  # mypy holds the PostgreSQL store to the interface
