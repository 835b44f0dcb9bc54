"""The hash chain: how one event links to the one before it, and how a stretch of the chain is checked.

Each event's hash covers the previous event's hash and the event's canonical JSON, so changing, removing or
reordering any event breaks every link after it (`verify`, `call_chain`, `ChainWatch`).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from json.encoder import encode_basestring

from server.canonical import canonical_json, sha256_hex
from server.models import TERMINAL_EVENTS

GENESIS = "0" * 64


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


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    count: int
    first_bad_seq: int | None = None
    message: str = ""


def verify(conn: sqlite3.Connection) -> VerifyResult:
    """Recompute the chain; name the first event whose hash, link or sequence number is wrong."""
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


def call_chain(conn: sqlite3.Connection, call_id: str) -> tuple[list[sqlite3.Row], str | None]:
    """The event rows of `call_id`, with the whole stretch of the chain they span checked: every event from the one
    before the call's first to its last has the next sequence number, links to the one before it and recomputes
    to its hash. Returns (rows, None), or ([], the first break)."""
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
                found.append(row)
    return found, None


TRUSTED_MAX = 500_000
"""Verified event hashes a `ChainWatch` keeps at most (about 200 bytes each); past that it starts over."""


class ChainWatch:
    """`call_chain` for a process that proves many calls: the chain is verified once, incrementally.

    The watch keeps, in memory, the newest event it has verified (its seq and hash: the watermark) and, for every
    call that has not ended, the hash of each of its events as verified. A proof verifies the chain from the
    watermark to the head (what was appended since the last proof: each event links to the one before it and
    recomputes to its hash, the first to the watermark, whose row must still hold the hash it was verified with),
    then checks the call's own rows against the hashes kept for them: each row recomputes to the hash it had when
    verified, and none is missing. A row changed after it was verified (even with its hash recomputed and the chain
    after it re-chained to the head) is found by its own hash; a row removed, by its absence. A call with an event
    the watch did not see (received before the watch began, or forgotten) is proven as `call_chain` does, by the
    whole stretch it spans.

    The watch begins at the first proof, before the earliest event of the calls open then. It never forgets what it
    verified because of a break: a proof that finds one fails, and so does every later proof that meets it (a
    re-chain consistent from end to end is still not the chain this process verified). One per store.
    """

    def __init__(self, trusted_max: int = TRUSTED_MAX) -> None:
        self._lock = threading.Lock()
        self._trusted_max = trusted_max
        self._mark: tuple[int, str] | None = None  # the newest verified event: (seq, hash)
        self._start = 0  # the watch has seen every event after this one
        self._calls: dict[str, dict[int, str]] = {}  # open call -> its events' verified hashes by seq
        self._size = 0

    def call_chain(self, conn: sqlite3.Connection, call_id: str) -> tuple[list[sqlite3.Row], str | None]:
        """As `call_chain`, in one snapshot: the event rows of `call_id`, checked; (rows, None), or ([], the first
        break)."""
        with self._lock:
            rows = list(conn.execute("SELECT * FROM events WHERE call_id = ? ORDER BY seq", (call_id,)))
            if not rows:
                return [], f"no chained event names {call_id}"
            top = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
            if self._mark is not None and int(top) < self._mark[0]:
                return call_chain(conn, call_id)  # a snapshot older than what the watch verified (another thread's)
            broken = self._begin(conn, rows[0]["seq"]) if self._mark is None else None
            if broken is not None or (broken := self._advance(conn)) is not None:
                return [], broken  # (the watch keeps what it verified: each proof from now on finds the break again)
            kept = self._calls.get(call_id)
            if kept is None or rows[0]["seq"] <= self._start or any(row["seq"] not in kept for row in rows):
                return call_chain(conn, call_id)  # (an event of it came before the watch, or it was forgotten)
            for row in rows:
                seq = row["seq"]
                if event_hash(row["prev_hash"], seq, row["ts"], row["kind"], row["call_id"], row["payload"]) != kept[seq]:
                    return [], f"event {seq} ({row['kind']}) changed after it was verified"
            if len(kept) != len(rows):
                missing = min(set(kept) - {row["seq"] for row in rows})
                return [], f"event {missing} is missing from the chain"
            return rows, None

    def _begin(self, conn: sqlite3.Connection, first: int) -> str | None:
        """Start watching before `first` and before the first event of every call open now (the tables choose
        only where verifying starts: a start too late sends those calls to `call_chain`)."""
        row = conn.execute("SELECT min(e.seq) FROM events e JOIN calls c ON c.id = e.call_id"
                           " WHERE c.state IN ('pending','approved','running')").fetchone()
        earliest = min(first, int(row[0])) if row is not None and row[0] is not None else first
        start = max(earliest - 1, 0)
        if start == 0:
            self._mark = (0, GENESIS)
        else:
            # The event before the watch's first is taken as its successor links to it (as `call_chain` does).
            anchor = conn.execute("SELECT hash FROM events WHERE seq = ?", (start,)).fetchone()
            if anchor is None:
                return f"event {start} is missing from the chain"
            self._mark = (start, anchor[0])
        self._start = start
        return None

    def _advance(self, conn: sqlite3.Connection) -> str | None:
        """Verify the events appended since the watermark; None, or the first break."""
        assert self._mark is not None
        expected, prev = self._mark[0] + 1, self._mark[1]
        if expected > 1:
            at = conn.execute("SELECT hash FROM events WHERE seq = ?", (expected - 1,)).fetchone()
            if at is None or at[0] != prev:
                return f"event {expected - 1} changed or is missing after it was verified"
        cursor = conn.execute("SELECT seq, ts, kind, call_id, payload, prev_hash, hash FROM events WHERE seq >= ?"
                              " ORDER BY seq", (expected,))
        while batch := cursor.fetchmany(5000):
            for seq, ts, kind, call_id, payload, prev_hash, h in batch:
                if seq != expected:
                    return f"event {expected} is missing from the chain"
                if prev_hash != prev:
                    return f"event {seq}: its link to the previous event is broken"
                if event_hash(prev_hash, seq, ts, kind, call_id, payload) != h:
                    return f"event {seq} ({kind}): its content does not match its hash"
                prev, expected = h, seq + 1
                if call_id is not None:
                    self._keep(call_id, seq, h, kind)
        self._mark = (expected - 1, prev)
        if self._size > self._trusted_max:  # the calls seen so far are proven by their whole stretch from now on
            self._calls, self._size, self._start = {}, 0, expected - 1
        return None

    def _keep(self, call_id: str, seq: int, h: str, kind: str) -> None:
        if kind in TERMINAL_EVENTS:  # an ended call is not proven again (if it is, by its whole stretch)
            self._size -= len(self._calls.pop(call_id, {}))
            return
        self._calls.setdefault(call_id, {})[seq] = h
        self._size += 1
