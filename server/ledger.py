"""The ledger: an append-only, hash-chained SQLite event store, and the materialised state of each call.

Every write is one `BEGIN IMMEDIATE` transaction: it reads the chain's head, appends the next events and
updates the `calls` row together, so several keyturn processes sharing one file keep one linear chain,
and a conditional update (a claim, a vote) is won by exactly one of them. Events are announced to
in-process listeners only after their commit, and a write returns only once committed. Where each unit
of work runs (mostly at once on the event loop's thread, never waiting for a lock there) is
`server.ledger_db`'s business.

This is the storage interface the rest of keyturn uses (`open_call`, `mutate_call`, `transition`,
queries); a PostgreSQL backend would implement the same methods.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, TypeVar

from server.canonical import canonical_json, sha256_hex
from server.errors import LedgerError
from server.ledger_db import Database
from server.models import TERMINAL_STATES, Event, RequestView, ReviewSpec

GENESIS = "0" * 64
T = TypeVar("T")

MIGRATIONS: tuple[str, ...] = (
    # 1: events, calls, votes, instances
    """
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        call_id TEXT,
        payload TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX events_call ON events(call_id, seq);
    CREATE INDEX events_kind ON events(kind, seq);
    CREATE TABLE calls (
        id TEXT PRIMARY KEY,
        tool TEXT NOT NULL,
        principal TEXT NOT NULL,
        on_behalf_of TEXT,
        model TEXT,
        args_hash TEXT NOT NULL,
        arguments TEXT NOT NULL,
        state TEXT NOT NULL,
        risk TEXT,
        reason TEXT,
        rules TEXT NOT NULL DEFAULT '[]',
        review TEXT,
        policy_digest TEXT,
        created REAL NOT NULL,
        expires REAL,
        updated REAL NOT NULL,
        holder TEXT,
        outcome_reason TEXT
    );
    CREATE INDEX calls_state ON calls(state);
    CREATE INDEX calls_same ON calls(principal, tool, args_hash, state);
    CREATE TABLE votes (
        call_id TEXT NOT NULL,
        person TEXT NOT NULL,
        reviewer TEXT NOT NULL,
        verdict TEXT NOT NULL,
        reason TEXT,
        groups TEXT NOT NULL DEFAULT '[]',
        ts REAL NOT NULL,
        PRIMARY KEY (call_id, person)
    );
    CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started REAL NOT NULL,
        heartbeat REAL NOT NULL
    );
    CREATE TABLE chain_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        hash TEXT NOT NULL
    );
    """,
    # 2: fewer pages written per call. `find_open` looks only for open requests, so its index holds only those
    #    (a call that runs at once never enters it); no query reads events by kind.
    """
    DROP INDEX calls_same;
    CREATE INDEX calls_open_same ON calls(principal, tool, args_hash) WHERE state IN ('pending','approved');
    DROP INDEX events_kind;
    """,
    # 3: the housekeeping sweep for expired requests reads only those (held calls alone are in this index).
    """
    CREATE INDEX calls_open_expires ON calls(expires) WHERE state IN ('pending','approved');
    """,
    # 4: reviewers' web sessions, server-side: the cookie holds a random id, this table only its sha256.
    #    Outside the chain: signing in decides nothing (the votes a session casts are chained).
    """
    CREATE TABLE web_sessions (
        id_sha256 TEXT PRIMARY KEY,
        identity TEXT NOT NULL,
        token_fp TEXT NOT NULL,
        created REAL NOT NULL,
        expires REAL NOT NULL,
        last_seen REAL NOT NULL,
        revoked REAL
    );
    CREATE INDEX web_sessions_expires ON web_sessions(expires);
    """,
    # 5: signed checkpoints of the chain head (server.checkpoints). Outside the chain, and a convenience only: the
    #    witnesses hold the copies that count; a row here cannot be forged without the signing key.
    """
    CREATE TABLE checkpoints (
        seq INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        hash TEXT NOT NULL,
        chain TEXT NOT NULL,
        time REAL NOT NULL,
        sig TEXT NOT NULL,
        PRIMARY KEY (seq, key_id)
    );
    """,
    # 6: rejoining a held call. The same call again finds its request in any state until the request's expiry
    #    (held calls alone have an expiry, so only they are in this index). A result kept for the retry lives in
    #    the process's memory, never in this file (it may carry what the agent was approved to read).
    """
    CREATE INDEX calls_held_same ON calls(principal, tool, args_hash, created) WHERE expires IS NOT NULL;
    """,
)


CALL_STATES_CHUNK = 500
"""Calls whose states one quick read looks up (`Ledger.call_states`)."""


def event_hash(prev_hash: str, seq: int, ts: float, kind: str, call_id: str | None, payload_json: str) -> str:
    """sha256 of `prev_hash` + the canonical JSON of {seq, ts, kind, call_id, payload}: one link of the chain."""
    if (type(seq) is int and type(ts) is float and abs(ts) < float("inf") and type(kind) is str
            and type(payload_json) is str and (call_id is None or type(call_id) is str)):
        # Byte for byte what `canonical_json` writes for these five keys (sorted, no spaces), built directly:
        # this runs for every event appended and every event verified.
        cid = "null" if call_id is None else encode_basestring(call_id)
        body = (f'{{"call_id":{cid},"kind":{encode_basestring(kind)},"payload":{encode_basestring(payload_json)},'
                f'"seq":{seq},"ts":{ts!r}}}')
    else:
        body = canonical_json({"seq": seq, "ts": ts, "kind": kind, "call_id": call_id, "payload": payload_json})
    return sha256_hex(prev_hash + body)


@dataclass
class Tx:
    """A write transaction in progress (see `Ledger.transaction`)."""

    conn: sqlite3.Connection
    now: float
    appended: list[Event] = field(default_factory=list)
    _head: tuple[int, str] | None = None

    def append(self, kind: str, call_id: str | None, payload: dict[str, Any]) -> Event:
        if self._head is None:
            row = self.conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
            self._head = (row[0], row[1]) if row else (0, GENESIS)
        seq, prev = self._head[0] + 1, self._head[1]
        payload_json = canonical_json(payload)
        h = event_hash(prev, seq, self.now, kind, call_id, payload_json)
        self.conn.execute(
            "INSERT INTO events(seq, ts, kind, call_id, payload, prev_hash, hash) VALUES (?,?,?,?,?,?,?)",
            (seq, self.now, kind, call_id, payload_json, prev, h),
        )
        self._head = (seq, h)
        # Built from values just written (not validated again): this runs for every event.
        event = Event.model_construct(seq=seq, ts=self.now, kind=kind, call_id=call_id, payload=dict(payload),
                                      prev_hash=prev, hash=h)
        self.appended.append(event)
        return event

    def write_head(self) -> None:
        """Record the chain's new head, once per transaction (just before its commit)."""
        if self.appended and self._head is not None:
            self.conn.execute(
                "INSERT INTO chain_head(id, seq, hash) VALUES (1, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET seq=excluded.seq, hash=excluded.hash",
                self._head,
            )

    def call_row(self, call_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute("SELECT * FROM calls WHERE id = ?", (call_id,)).fetchone()
        return row

    def votes(self, call_id: str) -> list[sqlite3.Row]:
        return list(self.conn.execute("SELECT * FROM votes WHERE call_id = ? ORDER BY ts", (call_id,)))

    def set_state(self, call_id: str, state: str, **columns: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in columns)
        self.conn.execute(
            f"UPDATE calls SET state = ?, updated = ?{', ' + sets if sets else ''} WHERE id = ?",
            (state, self.now, *columns.values(), call_id),
        )


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    count: int
    first_bad_seq: int | None = None
    message: str = ""


@dataclass(frozen=True)
class CallFilter:
    """An audit search over calls. Every field is optional; set fields are ANDed.

    `tool` matches a substring of the tool name; `principal` the principal or the person it acts for;
    `reviewer` a voter's person or identity; `state` the call's state; `since`/`until` bound `created`.
    """

    tool: str | None = None
    principal: str | None = None
    reviewer: str | None = None
    state: str | None = None
    since: float | None = None
    until: float | None = None


# One static statement: each filter is a bound parameter that, when NULL, matches everything.
# Nothing from the caller is ever spliced into the SQL text.
_SEARCH_CALLS = """
SELECT * FROM calls
WHERE (:tool IS NULL OR instr(tool, :tool) > 0)
  AND (:principal IS NULL OR principal = :principal OR on_behalf_of = :principal)
  AND (:state IS NULL OR state = :state)
  AND (:since IS NULL OR created >= :since)
  AND (:until IS NULL OR created < :until)
  AND (:reviewer IS NULL OR EXISTS (
        SELECT 1 FROM votes v WHERE v.call_id = calls.id AND (v.person = :reviewer OR v.reviewer = :reviewer)))
  AND (:before_created IS NULL OR created < :before_created OR (created = :before_created AND id < :before_id))
ORDER BY created DESC, id DESC
LIMIT :limit
"""


Listener = Callable[[Sequence[Event]], None]


class Ledger:
    """The event store. One connection per process; all writes go through `transaction`.

    `busy_timeout_ms` bounds how long a unit waits (in the database thread) for another process's lock.
    """

    def __init__(self, path: Path | str, *, synchronous: str = "NORMAL", busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self._db = Database(self.path, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms)
        self._listeners: list[Listener] = []

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> Ledger:
        try:
            await self._db.open(self._migrate)
        except (sqlite3.Error, OSError) as e:
            await self.close()
            raise LedgerError(f"cannot open ledger {self.path}: {e}") from e
        return self

    async def close(self) -> None:
        await self._db.close()

    async def __aenter__(self) -> Ledger:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(events)` after each commit in this process. Returns an unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            current = row[0] or 0
            for number, script in enumerate(MIGRATIONS, start=1):
                if number > current:
                    for statement in filter(str.strip, script.split(";")):
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_version(version) VALUES (?)", (number,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

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

        def unit(conn: sqlite3.Connection) -> tuple[T, list[Event]]:
            tx = Tx(conn=conn, now=time.time())
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = body(tx)
                tx.write_head()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result, tx.appended

        try:
            result, events = await self._unit(unit)
        except (sqlite3.Error, OSError) as e:
            raise LedgerError(f"ledger write failed: {e}") from e
        self._db.committed()
        if events:
            for listener in list(self._listeners):
                listener(events)
        return result

    async def append(self, kind: str, call_id: str | None, payload: dict[str, Any]) -> Event:
        return await self.transaction(lambda tx: tx.append(kind, call_id, payload))

    # -- call state --------------------------------------------------------------------------------

    async def open_call(
        self,
        *,
        call_id: str,
        tool: str,
        principal: str,
        on_behalf_of: str | None,
        model: str | None,
        args_hash: str,
        redacted_arguments: dict[str, Any],
        state: str,
        holder: str | None,
        events: Iterable[tuple[str, dict[str, Any]]],
        risk: str | None = None,
        reason: str | None = None,
        rules: list[dict[str, Any]] | None = None,
        review: ReviewSpec | None = None,
        policy_digest: str | None = None,
        expires: float | None = None,
        outcome_reason: str | None = None,
    ) -> list[Event]:
        """Insert a call's row and its first events in one transaction."""
        event_list = list(events)

        def body(tx: Tx) -> list[Event]:
            tx.conn.execute(
                "INSERT INTO calls(id, tool, principal, on_behalf_of, model, args_hash, arguments, state, risk,"
                " reason, rules, review, policy_digest, created, expires, updated, holder, outcome_reason)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    call_id, tool, principal, on_behalf_of, model, args_hash, canonical_json(redacted_arguments),
                    state, risk, reason, canonical_json(rules or []),
                    review.model_dump_json() if review else None, policy_digest, tx.now, expires, tx.now,
                    holder, outcome_reason,
                ),
            )
            return [tx.append(kind, call_id, payload) for kind, payload in event_list]

        return await self.transaction(body)

    async def mutate_call(self, call_id: str, body: Callable[[Tx, sqlite3.Row | None], T]) -> T:
        """Read a call's row and change it atomically: `body(tx, row)` decides, appends and updates."""
        return await self.transaction(lambda tx: body(tx, tx.call_row(call_id)))

    async def transition(
        self,
        call_id: str,
        from_states: Iterable[str],
        to_state: str,
        event_kind: str,
        payload: dict[str, Any],
        *,
        holder: str | None = None,
        outcome_reason: str | None = None,
    ) -> bool:
        """Move a call from one of `from_states` to `to_state` with one event; False if someone else moved it first.

        A call already in a terminal state never moves again: that is what makes a terminal event unique.
        """
        allowed = [s for s in from_states if s not in TERMINAL_STATES]
        if not allowed:
            return False
        columns: dict[str, Any] = {}
        if holder is not None:
            columns["holder"] = holder
        if outcome_reason is not None:
            columns["outcome_reason"] = outcome_reason
        sets = "".join(f", {k} = ?" for k in columns)
        # One conditional update: it moves the call only from an allowed state, and says whether it did.
        sql = f"UPDATE calls SET state = ?, updated = ?{sets} WHERE id = ? AND state IN ({','.join('?' * len(allowed))})"

        def body(tx: Tx) -> bool:
            if tx.conn.execute(sql, (to_state, tx.now, *columns.values(), call_id, *allowed)).rowcount != 1:
                return False
            tx.append(event_kind, call_id, payload)
            return True

        return await self.transaction(body)

    # -- queries -----------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T], *, long: bool = False) -> T:
        """A read: at once when quick (indexed lookups); when `long`, on the read-only connection in its thread
        (see `Database.read`), where it holds up no write."""
        try:
            return await (self._db.read(fn) if long else self._unit(fn))
        except sqlite3.Error as e:
            raise LedgerError(f"cannot read ledger: {e}") from e

    async def _query(self, sql: str, params: Sequence[Any] = (), *, long: bool = False) -> list[sqlite3.Row]:
        return await self._read(lambda conn: list(conn.execute(sql, params)), long=long)

    async def get_call(self, call_id: str) -> RequestView | None:
        def read(conn: sqlite3.Connection) -> RequestView | None:
            row = conn.execute("SELECT * FROM calls WHERE id = ?", (call_id,)).fetchone()
            if row is None:
                return None
            return row_to_view(row, conn.execute("SELECT * FROM votes WHERE call_id = ? ORDER BY ts", (call_id,)))

        return await self._read(read)

    async def call_states(self, call_ids: Sequence[str]) -> dict[str, str]:
        """The states of `call_ids`, read a few hundred at a time as quick units on the loop's thread. (As one long
        read in another thread, with a busy loop, it would get the GIL back only every switch interval for each
        row: seconds for thousands of waiters.)"""
        states: dict[str, str] = {}
        ids = list(call_ids)
        for start in range(0, len(ids), CALL_STATES_CHUNK):
            rows = await self._query("SELECT id, state FROM calls WHERE id IN (SELECT value FROM json_each(?))",
                                     (json.dumps(ids[start:start + CALL_STATES_CHUNK]),))
            states.update((r["id"], r["state"]) for r in rows)
        return states

    async def calls_with_events(self, kinds: Iterable[str], after_seq: int, upto_seq: int) -> set[str]:
        """The calls with an event of one of `kinds` among events `after_seq` < seq <= `upto_seq`: a range of the
        primary key, so it costs what was appended since, however many calls there are."""
        wanted = sorted(kinds)
        sql = (f"SELECT DISTINCT call_id FROM events WHERE seq > ? AND seq <= ? AND call_id IS NOT NULL"
               f" AND kind IN ({','.join('?' * len(wanted))})")
        rows = await self._query(sql, (int(after_seq), int(upto_seq), *wanted), long=upto_seq - after_seq > 5000)
        return {r[0] for r in rows}

    async def expired_calls(self, now: float, limit: int = 1000) -> list[str]:
        """Open (pending or approved) calls whose expiry has passed, the longest expired first: an index lookup
        of those alone, however many calls are open."""
        rows = await self._query(
            "SELECT id FROM calls INDEXED BY calls_open_expires"
            " WHERE state IN ('pending','approved') AND expires IS NOT NULL AND expires <= ?"
            " ORDER BY expires LIMIT ?", (float(now), int(limit)))
        return [r["id"] for r in rows]

    async def open_calls_held_elsewhere(self, states: Iterable[str], holder: str) -> list[sqlite3.Row]:
        """`id`, `state` and `holder` of the calls in `states` not held by `holder` (a process's own calls are
        alive while it runs): what a sweep for orphans reads, without the calls' arguments or votes."""
        wanted = list(states)
        sql = (f"SELECT id, state, holder FROM calls WHERE state IN ({','.join('?' * len(wanted))})"
               " AND (holder IS NULL OR holder != ?) ORDER BY created")
        return await self._query(sql, (*wanted, holder), long=True)

    async def list_calls(self, states: Iterable[str] = ("pending",), limit: int = 200) -> list[RequestView]:
        wanted = list(states)
        marks = ",".join("?" * len(wanted))
        sql = f"SELECT * FROM calls WHERE state IN ({marks}) ORDER BY created DESC LIMIT ?"
        return await self._read(lambda conn: _with_votes(conn, list(conn.execute(sql, [*wanted, int(limit)]))),
                                long=True)

    async def find_open(self, principal: str, tool: str, args_hash: str) -> RequestView | None:
        """An open (pending or approved) request for the same principal, tool and arguments, if any."""

        def read(conn: sqlite3.Connection) -> RequestView | None:
            row = conn.execute(
                "SELECT * FROM calls WHERE principal = ? AND tool = ? AND args_hash = ?"
                " AND state IN ('pending','approved') ORDER BY created LIMIT 1",
                (principal, tool, args_hash),
            ).fetchone()
            if row is None:
                return None
            return row_to_view(row, conn.execute("SELECT * FROM votes WHERE call_id = ? ORDER BY ts", (row["id"],)))

        return await self._read(read)

    async def find_rejoinable(self, principal: str, tool: str, args_hash: str, now: float) -> RequestView | None:
        """The held request the same call (principal, tool, arguments) rejoins: an open one (pending, approved,
        running), else the newest that ran (executed, failed) and whose expiry has not passed."""

        def read(conn: sqlite3.Connection) -> RequestView | None:
            row = conn.execute(
                "SELECT * FROM calls INDEXED BY calls_held_same WHERE principal = ? AND tool = ? AND args_hash = ?"
                " AND expires IS NOT NULL AND (state IN ('pending','approved','running')"
                " OR (state IN ('executed','failed') AND expires > ?))"
                " ORDER BY state IN ('pending','approved','running') DESC, created DESC LIMIT 1",
                (principal, tool, args_hash, float(now)),
            ).fetchone()
            if row is None:
                return None
            return row_to_view(row, conn.execute("SELECT * FROM votes WHERE call_id = ? ORDER BY ts", (row["id"],)))

        return await self._read(read)

    # -- kept results (see server.approvals: a held call's result, for a retry) ----------------------------

    async def events(self, call_id: str | None = None, *, after_seq: int = 0, limit: int = 10_000) -> list[Event]:
        if call_id is None:
            rows = await self._query("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit),
                                     long=True)
        else:
            rows = await self._query(
                "SELECT * FROM events WHERE call_id = ? AND seq > ? ORDER BY seq LIMIT ?", (call_id, after_seq, limit)
            )
        return [row_to_event(r) for r in rows]

    async def tail(self, n: int = 20) -> list[Event]:
        rows = await self._query("SELECT * FROM events ORDER BY seq DESC LIMIT ?", (int(n),))
        return [row_to_event(r) for r in reversed(rows)]

    async def search_calls(
        self, where: CallFilter, *, limit: int = 100, before: tuple[float, str] | None = None
    ) -> list[RequestView]:
        """Calls matching `where`, newest first; `before` = (created, id) of the last row of the previous page."""

        def run(conn: sqlite3.Connection) -> list[RequestView]:
            params = {
                "tool": where.tool, "principal": where.principal, "reviewer": where.reviewer, "state": where.state,
                "since": where.since, "until": where.until, "limit": max(1, int(limit)),
                "before_created": before[0] if before else None, "before_id": before[1] if before else None,
            }
            return _with_votes(conn, list(conn.execute(_SEARCH_CALLS, params)))

        return await self._read(run, long=True)

    async def call_facets(self, limit: int = 200) -> dict[str, list[str]]:
        """The distinct tools, principals and reviewing people seen, for search suggestions."""
        tools = await self._query("SELECT DISTINCT tool FROM calls ORDER BY tool LIMIT ?", (limit,), long=True)
        principals = await self._query("SELECT DISTINCT principal FROM calls ORDER BY principal LIMIT ?", (limit,),
                                       long=True)
        people = await self._query("SELECT DISTINCT person FROM votes ORDER BY person LIMIT ?", (limit,), long=True)
        return {"tools": [r[0] for r in tools], "principals": [r[0] for r in principals],
                "reviewers": [r[0] for r in people]}

    async def head_seq(self) -> int:
        rows = await self._query("SELECT max(seq) FROM events")
        return int(rows[0][0] or 0)

    async def snapshot(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run the long read `fn(conn)` on one consistent snapshot of the ledger (writers go on meanwhile)."""
        return await self._read(fn, long=True)

    async def call_chain(self, call_id: str) -> tuple[list[Event], str | None]:
        """The chained events of `call_id`, read with the whole stretch of the chain they span checked: every event
        from the one before the call's first to its last has the next sequence number, links to the one before it
        and recomputes to its hash. Returns (events, None), or ([], the first break)."""

        def read(conn: sqlite3.Connection) -> tuple[list[Event], str | None]:
            first, last = conn.execute("SELECT min(seq), max(seq) FROM events WHERE call_id = ?", (call_id,)).fetchone()
            if first is None:
                return [], f"no chained event names {call_id}"
            start = max(int(first) - 1, 1)
            prev: str | None = GENESIS if start == first else None
            expected, found = start, []
            cursor = conn.execute("SELECT * FROM events WHERE seq BETWEEN ? AND ? ORDER BY seq", (start, last))
            while batch := cursor.fetchmany(5000):
                for row in batch:
                    seq = row["seq"]
                    if seq != expected:
                        return [], f"event {expected} is missing from the chain"
                    if prev is not None and row["prev_hash"] != prev:
                        return [], f"event {seq}: its link to the previous event is broken"
                    if event_hash(row["prev_hash"], seq, row["ts"], row["kind"], row["call_id"], row["payload"]) != row["hash"]:
                        return [], f"event {seq} ({row['kind']}): its content does not match its hash"
                    prev, expected = row["hash"], seq + 1
                    if row["call_id"] == call_id:
                        found.append(row_to_event(row))
            return found, None

        return await self._read(read, long=True)

    async def verify(self) -> VerifyResult:
        """Recompute the chain; name the first event whose hash, link or sequence number is wrong."""

        def check(conn: sqlite3.Connection) -> VerifyResult:
            prev, expected_seq, count = GENESIS, 1, 0
            cursor = conn.execute("SELECT seq, ts, kind, call_id, payload, prev_hash, hash FROM events ORDER BY seq")
            while batch := cursor.fetchmany(5000):
                for seq, ts, kind, call_id, payload, prev_hash, h in batch:
                    if seq != expected_seq:
                        return VerifyResult(False, count, expected_seq, f"event {expected_seq} is missing (next is {seq})")
                    if prev_hash != prev:
                        return VerifyResult(False, count, seq, f"event {seq}: link to the previous event is broken")
                    if event_hash(prev, seq, ts, kind, call_id, payload) != h:
                        return VerifyResult(False, count, seq, f"event {seq} ({kind}): content does not match its hash")
                    prev, expected_seq, count = h, seq + 1, count + 1
            head = conn.execute("SELECT seq, hash FROM chain_head WHERE id = 1").fetchone()
            if head is not None and (head[0] != count or head[1] != prev):
                return VerifyResult(False, count, count + 1, f"events after {count} are missing (head was {head[0]})")
            return VerifyResult(True, count, None, f"ok: {count} events, chain intact")

        return await self._read(check, long=True)

    # -- processes ---------------------------------------------------------------------------------

    async def register_instance(self, instance_id: str, host: str, pid: int) -> None:
        def body(tx: Tx) -> None:
            tx.conn.execute(
                "INSERT OR REPLACE INTO instances(id, host, pid, started, heartbeat) VALUES (?,?,?,?,?)",
                (instance_id, host, pid, tx.now, tx.now),
            )

        await self.transaction(body)

    async def heartbeat(self, instance_id: str) -> None:
        def body(tx: Tx) -> None:
            tx.conn.execute("UPDATE instances SET heartbeat = ? WHERE id = ?", (tx.now, instance_id))

        await self.transaction(body)

    async def instances(self) -> list[sqlite3.Row]:
        return await self._query("SELECT * FROM instances")

    async def remove_instance(self, instance_id: str) -> None:
        await self.transaction(lambda tx: tx.conn.execute("DELETE FROM instances WHERE id = ?", (instance_id,)))

    # -- reviewers' web sessions (see server.channels.inbox.sessions) ---------------------------------

    async def add_web_session(self, id_sha256: str, identity: str, token_fp: str, expires: float) -> None:
        """Record a new session (and forget the ones whose time has passed)."""
        def body(tx: Tx) -> None:
            tx.conn.execute("DELETE FROM web_sessions WHERE expires <= ?", (tx.now,))
            tx.conn.execute("INSERT INTO web_sessions(id_sha256, identity, token_fp, created, expires, last_seen) "
                            "VALUES (?,?,?,?,?,?)", (id_sha256, identity, token_fp, tx.now, expires, tx.now))

        await self.transaction(body)

    async def web_session(self, id_sha256: str) -> sqlite3.Row | None:
        rows = await self._query("SELECT * FROM web_sessions WHERE id_sha256 = ?", (id_sha256,))
        return rows[0] if rows else None

    async def touch_web_session(self, id_sha256: str) -> None:
        await self.transaction(lambda tx: tx.conn.execute(
            "UPDATE web_sessions SET last_seen = ? WHERE id_sha256 = ?", (tx.now, id_sha256)))

    async def revoke_web_session(self, id_sha256: str) -> None:
        await self.transaction(lambda tx: tx.conn.execute(
            "UPDATE web_sessions SET revoked = ? WHERE id_sha256 = ? AND revoked IS NULL", (tx.now, id_sha256)))


def _with_votes(conn: sqlite3.Connection, rows: list[sqlite3.Row]) -> list[RequestView]:
    """Views of `rows` with their votes, read in one query."""
    ids = json.dumps([r["id"] for r in rows])
    votes: dict[str, list[sqlite3.Row]] = {}
    for v in conn.execute("SELECT * FROM votes WHERE call_id IN (SELECT value FROM json_each(?)) ORDER BY ts", (ids,)):
        votes.setdefault(v["call_id"], []).append(v)
    return [row_to_view(r, votes.get(r["id"], ())) for r in rows]


def row_to_event(row: sqlite3.Row) -> Event:
    return Event(
        seq=row["seq"], ts=row["ts"], kind=row["kind"], call_id=row["call_id"],
        payload=json.loads(row["payload"]), prev_hash=row["prev_hash"], hash=row["hash"],
    )


def row_to_view(row: sqlite3.Row, votes: Iterable[sqlite3.Row] = ()) -> RequestView:
    return RequestView(
        id=row["id"], tool=row["tool"], principal=row["principal"], on_behalf_of=row["on_behalf_of"],
        model=row["model"], args_hash=row["args_hash"], arguments=json.loads(row["arguments"]),
        state=row["state"], risk=row["risk"], reason=row["reason"], rules=json.loads(row["rules"]),
        review=ReviewSpec.model_validate_json(row["review"]) if row["review"] else None,
        created=row["created"], expires=row["expires"],
        votes=[
            {"person": v["person"], "reviewer": v["reviewer"], "verdict": v["verdict"], "reason": v["reason"],
             "groups": json.loads(v["groups"]), "ts": v["ts"]}
            for v in votes
        ],
        outcome_reason=row["outcome_reason"], policy_digest=row["policy_digest"],
    )
