"""A write transaction in progress: the chain's next events, and the rows that change with them.

Everything a write does to the ledger goes through a `Tx`, inside `Ledger.transaction` (one `BEGIN IMMEDIATE`):
callers name what they do (`append`, `finish`, `add_vote`, `set_holder` ...), never SQL.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.canonical import canonical_json
from server.errors import LedgerError
from server.ledger.chain import GENESIS, event_hash
from server.ledger.queries import Row, as_row
from server.models import TERMINAL_EVENTS, TERMINAL_STATES, Event
from server.outcomes import OUTCOMES

if TYPE_CHECKING:
    from server.ledger.checkpoints import Checkpoint


class StaleHead(Exception):
    """The head a transaction was given (`Tx.known_head`) is not the chain's head: another process appended since.
    The transaction is rolled back and run again, reading the head."""


@dataclass
class Tx:
    """A write transaction in progress (see `Ledger.transaction`).

    `known_head`, when given, is the chain's head as this connection last committed it: the first append links to it
    without reading the head. If another process appended since, the event's sequence number is taken already and
    its insert fails (`StaleHead`): nobody else can append while this transaction holds the write lock, so an insert
    that succeeds is the chain's next event."""

    conn: sqlite3.Connection
    now: float
    known_head: tuple[int, str] | None = None
    appended: list[Event] = field(default_factory=list)
    _head: tuple[int, str] | None = None
    _finishing: bool = False  # inside `finish`: the one place a terminal event is written

    def append(self, kind: str, call_id: str | None, payload: dict[str, Any]) -> Event:
        return self.append_many(call_id, [(kind, payload)])[0]

    def append_many(self, call_id: str | None, events: Sequence[tuple[str, dict[str, Any]]]) -> list[Event]:
        """Append `events` (kind, payload) of one call, in order, with one statement."""
        if not events:
            return []
        for kind, _ in events:
            if kind in TERMINAL_EVENTS and not self._finishing:
                raise LedgerError(f"a call's end ({kind}) is written by finish, with its state change")
        guessed = self._head is None and self.known_head is not None
        if self._head is None:
            if self.known_head is not None:
                self._head = self.known_head
            else:
                row = self.conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
                self._head = (row[0], row[1]) if row else (0, GENESIS)
        seq, prev = self._head
        rows: list[Any] = []
        made: list[Event] = []
        for kind, payload in events:
            seq += 1
            payload_json = canonical_json(payload)
            h = event_hash(prev, seq, self.now, kind, call_id, payload_json)
            rows.extend((seq, self.now, kind, call_id, payload_json, prev, h))
            # Built from values just written (not validated again): this runs for every event.
            made.append(Event.model_construct(seq=seq, ts=self.now, kind=kind, call_id=call_id, payload=dict(payload),
                                              prev_hash=prev, hash=h))
            prev = h
        try:
            self.conn.execute(_insert_events(len(events)), rows)
        except sqlite3.IntegrityError as e:
            if guessed:
                raise StaleHead(f"event {self._head[0] + 1} exists already") from e
            raise
        self._head = (seq, prev)
        self.appended.extend(made)
        return made

    @property
    def head(self) -> tuple[int, str] | None:
        """The chain's head after this transaction's appends (None when it appended nothing)."""
        return self._head if self.appended else None

    def write_head(self) -> None:
        """Record the chain's new head, once per transaction (just before its commit)."""
        if self.appended and self._head is not None:
            self.conn.execute(
                "INSERT INTO chain_head(id, seq, hash) VALUES (1, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET seq=excluded.seq, hash=excluded.hash",
                self._head,
            )

    def call_row(self, call_id: str) -> Row | None:
        """The call's row (its columns by name), or None."""
        row = self.conn.execute("SELECT * FROM calls WHERE id = ?", (call_id,)).fetchone()
        return as_row(row) if row is not None else None

    def votes(self, call_id: str) -> list[Row]:
        return [as_row(r) for r in self.conn.execute("SELECT * FROM votes WHERE call_id = ? ORDER BY ts", (call_id,))]

    def set_state(self, call_id: str, state: str, **columns: Any) -> None:
        if state in TERMINAL_STATES:
            raise LedgerError(f"a call ends ({state}) only through finish")
        sets = ", ".join(f"{k} = ?" for k in columns)
        self.conn.execute(
            f"UPDATE calls SET state = ?, updated = ?{', ' + sets if sets else ''} WHERE id = ?",
            (state, self.now, *columns.values(), call_id),
        )

    def move(self, call_id: str, from_states: Iterable[str], to_state: str, **columns: Any) -> bool:
        """Move a call from one of `from_states` to `to_state`; False if it is in none of them (someone else moved
        it first). A call in a terminal state never moves again: that is what makes a terminal event unique."""
        if to_state in TERMINAL_STATES and not self._finishing:
            raise LedgerError(f"a call ends ({to_state}) only through finish")
        allowed = [s for s in from_states if s not in TERMINAL_STATES]
        if not allowed:
            return False
        sets = "".join(f", {k} = ?" for k in columns)
        # One conditional update: it moves the call only from an allowed state, and says whether it did.
        sql = f"UPDATE calls SET state = ?, updated = ?{sets} WHERE id = ? AND state IN ({','.join('?' * len(allowed))})"
        return bool(self.conn.execute(sql, (to_state, self.now, *columns.values(), call_id, *allowed)).rowcount == 1)

    def finish(self, call_id: str, outcome: str, payload: dict[str, Any], reason: str | None = None) -> bool:
        """End the call as `outcome` (see `server.outcomes`): its final state and its one terminal event. False,
        with nothing written, when the call has already ended or is not in a state it can end from this way."""
        end = OUTCOMES[outcome]
        columns = {"outcome_reason": reason} if reason is not None else {}
        self._finishing = True
        try:
            if not self.move(call_id, end.ends, end.state, **columns):
                return False
            self.append(end.kind, call_id, payload)
        finally:
            self._finishing = False
        return True

    def insert_call(self, call_id: str, columns: Mapping[str, Any]) -> None:
        """A new row in `calls` (created and updated now)."""
        values = {**columns, "id": call_id, "created": self.now, "updated": self.now}
        self.conn.execute(_insert_call(tuple(values)), tuple(values.values()))

    def add_vote(self, call_id: str, person: str, reviewer: str, verdict: str, reason: str | None,
                 groups: Sequence[str]) -> None:
        self.conn.execute(
            "INSERT INTO votes(call_id, person, reviewer, verdict, reason, groups, ts) VALUES (?,?,?,?,?,?,?)",
            (call_id, person, reviewer, verdict, reason, json.dumps(list(groups)), self.now),
        )

    def change_vote(self, call_id: str, person: str, reviewer: str, verdict: str, reason: str | None,
                    groups: Sequence[str]) -> None:
        """Replace `person`'s vote on the call (its row says what their latest `vote` event says)."""
        self.conn.execute(
            "UPDATE votes SET reviewer = ?, verdict = ?, reason = ?, groups = ?, ts = ? WHERE call_id = ? AND person = ?",
            (reviewer, verdict, reason, json.dumps(list(groups)), self.now, call_id, person),
        )

    def set_holder(self, call_id: str, holder: str) -> None:
        """The process whose caller waits on the call now."""
        self.conn.execute("UPDATE calls SET holder = ? WHERE id = ?", (holder, call_id))

    def call_events(self, call_id: str, kinds: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
        """(kind, payload) of the call's events of `kinds`, in order."""
        wanted = list(kinds)
        rows = self.conn.execute(
            f"SELECT kind, payload FROM events WHERE call_id = ? AND kind IN ({','.join('?' * len(wanted))}) ORDER BY seq",
            (call_id, *wanted))
        return [(kind, json.loads(payload)) for kind, payload in rows]

    def store_checkpoint(self, checkpoint: Checkpoint) -> bool:
        """Keep `checkpoint` in the ledger's table; False if one for that seq and key was already there."""
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO checkpoints(seq, key_id, hash, chain, time, sig) VALUES (?,?,?,?,?,?)",
            (checkpoint.seq, checkpoint.key_id, checkpoint.hash, checkpoint.chain, checkpoint.time, checkpoint.sig))
        return cur.rowcount == 1

    # -- standing grants (an index of the chained grant.* events; see server.approvals.grants) ---------------------

    def insert_grant(self, grant_id: str, columns: Mapping[str, Any]) -> None:
        values = {**columns, "id": grant_id, "created": self.now, "used": 0, "state": "live"}
        names = tuple(values)
        self.conn.execute(f"INSERT INTO grants({', '.join(names)}) VALUES ({','.join('?' * len(names))})",
                          tuple(values.values()))

    def grant_row(self, grant_id: str) -> Row | None:
        row = self.conn.execute("SELECT * FROM grants WHERE id = ?", (grant_id,)).fetchone()
        return as_row(row) if row is not None else None

    def use_grant(self, grant_id: str) -> bool:
        """Take one use of a live, unexpired grant with uses left: one conditional update, so the last use is
        taken once whoever races for it. False when there is nothing left to take."""
        cur = self.conn.execute(
            "UPDATE grants SET used = used + 1 WHERE id = ? AND state = 'live' AND used < uses AND expires > ?",
            (grant_id, self.now))
        return cur.rowcount == 1

    def end_grant(self, grant_id: str, state: str, reason: str) -> bool:
        """Move a live grant to `state` (revoked, expired); False when it was not live (someone ended it first)."""
        cur = self.conn.execute("UPDATE grants SET state = ?, ended = ?, end_reason = ? WHERE id = ? AND state = 'live'",
                                (state, self.now, reason, grant_id))
        return cur.rowcount == 1

    # -- processes and reviewers' web sessions (outside the chain) -----------------------------------

    def register_instance(self, instance_id: str, host: str, pid: int) -> None:
        self.conn.execute("INSERT OR REPLACE INTO instances(id, host, pid, started, heartbeat) VALUES (?,?,?,?,?)",
                          (instance_id, host, pid, self.now, self.now))

    def heartbeat(self, instance_id: str) -> None:
        self.conn.execute("UPDATE instances SET heartbeat = ? WHERE id = ?", (self.now, instance_id))

    def remove_instance(self, instance_id: str) -> None:
        self.conn.execute("DELETE FROM instances WHERE id = ?", (instance_id,))

    def add_web_session(self, id_sha256: str, identity: str, token_fp: str, expires: float) -> None:
        """Record a new session (and forget the ones whose time has passed)."""
        self.conn.execute("DELETE FROM web_sessions WHERE expires <= ?", (self.now,))
        self.conn.execute("INSERT INTO web_sessions(id_sha256, identity, token_fp, created, expires, last_seen) "
                          "VALUES (?,?,?,?,?,?)", (id_sha256, identity, token_fp, self.now, expires, self.now))

    def touch_web_session(self, id_sha256: str) -> None:
        self.conn.execute("UPDATE web_sessions SET last_seen = ? WHERE id_sha256 = ?", (self.now, id_sha256))

    def revoke_web_session(self, id_sha256: str) -> None:
        self.conn.execute("UPDATE web_sessions SET revoked = ? WHERE id_sha256 = ? AND revoked IS NULL",
                          (self.now, id_sha256))


@functools.lru_cache(maxsize=8)
def _insert_call(names: tuple[str, ...]) -> str:
    return f"INSERT INTO calls({', '.join(names)}) VALUES ({','.join('?' * len(names))})"


@functools.lru_cache(maxsize=8)
def _insert_events(n: int) -> str:
    return ("INSERT INTO events(seq, ts, kind, call_id, payload, prev_hash, hash) VALUES "
            + ",".join(["(?,?,?,?,?,?,?)"] * n))
