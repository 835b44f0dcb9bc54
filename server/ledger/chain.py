"""The hash chain: how one event links to the one before it, and how a stretch of the chain is checked.

Each event's hash covers the previous event's hash and the event's canonical JSON, so changing, removing or
reordering any event breaks every link after it (`verify`, `call_chain`).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from json.encoder import encode_basestring

from server.canonical import canonical_json, sha256_hex

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
