"""A self-contained audit bundle: a range of events and the signed checkpoints that cover it, checked offline.

`export` takes events `from`..`to` of a verified ledger and extends them up to the first checkpoint at or after
`to`; `verify_bundle` needs only the bundle and the public key: the events chain from the given `prev_hash`, each
hash is recomputed, and a checkpoint signed by the key has the last event's hash.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from server.ledger.audit import AuditResult
from server.ledger.chain import GENESIS, event_hash
from server.ledger.checkpoints import Checkpoint, CheckpointError, key_id, public_key_text

FORMAT = "keyturn.audit-bundle/1"
EVENT_FIELDS = ("seq", "ts", "kind", "call_id", "payload", "prev_hash", "hash")


def export(conn: sqlite3.Connection, first: int, last: int, cover: Checkpoint, checkpoints: Sequence[Checkpoint],
           key: Ed25519PublicKey) -> dict[str, Any]:
    """The bundle of events `first`..`cover.seq` (`cover` is a checkpoint at or after `last`), as stored."""
    rows = conn.execute(f"SELECT {', '.join(EVENT_FIELDS)} FROM events WHERE seq >= ? AND seq <= ? ORDER BY seq",
                        (first, cover.seq)).fetchall()
    if not rows or rows[0][0] != first:
        raise CheckpointError(f"the ledger has no event {first}")
    chain = conn.execute("SELECT hash FROM events WHERE seq = 1").fetchone()
    return {
        "format": FORMAT, "key_id": key_id(key), "public_key": public_key_text(key), "from": first, "to": last,
        "prev_hash": rows[0][5], "chain": chain[0] if chain else None,
        "events": [dict(zip(EVENT_FIELDS, r, strict=True)) for r in rows],
        "checkpoints": [asdict(c) for c in checkpoints if first <= c.seq <= cover.seq],
    }


def verify_bundle(data: Any, key: Ed25519PublicKey) -> AuditResult:
    """Check a bundle with only the public key: the events chain, and a signed checkpoint covers the last one."""
    def bad(message: str, problem: str = "bundle", seq: int | None = None) -> AuditResult:
        return AuditResult(False, 0, message, problem, seq)

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return bad(f"not a keyturn audit bundle (format {FORMAT})")
    if data.get("key_id") != key_id(key):
        return bad(f"the bundle names key {data.get('key_id')}, not the given key {key_id(key)}")
    events = data.get("events")
    if not isinstance(events, list) or not events:
        return bad("the bundle has no events")
    prev = data.get("prev_hash")
    expected = data.get("from")
    if type(expected) is not int or expected < 1 or not isinstance(prev, str):
        return bad("the bundle's from and prev_hash are missing")
    if expected == 1 and prev != GENESIS:
        return bad("a bundle from event 1 must chain from the genesis hash", seq=1)
    hashes: dict[int, str] = {}
    for e in events:
        try:
            seq, ts, kind, call_id, payload, prev_hash, h = (e[f] for f in EVENT_FIELDS)
        except (KeyError, TypeError):
            return bad(f"event {expected} in the bundle is malformed", "edited", expected)
        if seq != expected:
            return bad(f"event {expected} is missing from the bundle (next is {seq}): deleted", "deleted", expected)
        if prev_hash != prev:
            return bad(f"event {seq}: link to the previous event is broken", "edited", seq)
        if not isinstance(ts, float) or event_hash(prev, seq, ts, kind, call_id, payload) != h:
            return bad(f"event {seq} ({kind}): content does not match its hash: edited", "edited", seq)
        hashes[seq] = h
        prev, expected = h, seq + 1
    last = expected - 1
    chain = hashes.get(1, data.get("chain"))
    try:
        checkpoints = [Checkpoint.from_dict(c) for c in data.get("checkpoints") or []]
    except CheckpointError as e:
        return bad(f"a checkpoint in the bundle is malformed: {e}", "checkpoint")
    for cp in checkpoints:
        if not cp.signed_by(key):
            return bad(f"{cp.describe()}: not validly signed by key {key_id(key)}", "checkpoint", cp.seq)
        if cp.chain != chain:
            return bad(f"{cp.describe()} is for another chain than the bundle's", "swapped", cp.seq)
        if hashes.get(cp.seq, cp.hash) != cp.hash:
            return bad(f"re-chained: event {cp.seq} does not have the hash of the {cp.describe()}", "rechained", cp.seq)
    covering = [cp for cp in checkpoints if cp.seq == last]
    if not covering:
        return bad(f"no checkpoint signed by key {key_id(key)} covers the bundle's last event {last}", "checkpoint",
                   last)
    return AuditResult(True, len(events), f"ok: bundle of events {data['from']}..{last} chains intact and extends "
                                          f"the {covering[0].describe()}")
