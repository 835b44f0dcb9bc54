"""`audit verify` trusting nothing mutable: the chain, the head row, signed checkpoints and the derived tables.

One pass over the events in one read snapshot recomputes every hash and link, replays the calls and votes
(`server.ledger.replay`) and notes the hashes at the checkpoints' sequence numbers. The ledger passes only if it
extends every checkpoint given (each signed by the key, for this chain, with the signed hash at its seq) and its
tables agree with the chain. The first problem is named: an edited or deleted event, a truncated tail (with or
without the head row), a re-chained or swapped ledger, a forged or changed row.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from server.ledger.chain import GENESIS, event_hash
from server.ledger.checkpoints import Checkpoint, key_id
from server.ledger.replay import Replay


@dataclass(frozen=True)
class AuditResult:
    ok: bool
    count: int
    message: str
    problem: str | None = None  # edited, deleted, truncated, rechained, swapped, checkpoint, tables
    first_bad_seq: int | None = None
    notes: list[str] = field(default_factory=list)


def audit(conn: sqlite3.Connection, checkpoints: Sequence[Checkpoint] = (), key: Ed25519PublicKey | None = None,
          *, tables: bool = True) -> AuditResult:
    """Check the ledger behind `conn` (inside one read transaction) against `checkpoints`, signed by `key`."""
    wanted = {c.seq for c in checkpoints}
    hashes_at: dict[int, str] = {}
    first_hash: str | None = None
    replay = Replay() if tables else None
    feed = replay.event if replay is not None else None
    prev, expected_seq, count = GENESIS, 1, 0
    cursor = conn.execute("SELECT seq, ts, kind, call_id, payload, prev_hash, hash FROM events ORDER BY seq")
    while batch := cursor.fetchmany(5000):
        for seq, ts, kind, call_id, payload, prev_hash, h in batch:
            if seq != expected_seq:
                return AuditResult(False, count, f"event {expected_seq} is missing (next is {seq}): deleted",
                                   "deleted", expected_seq)
            if prev_hash != prev:
                return AuditResult(False, count, f"event {seq}: link to the previous event is broken", "edited", seq)
            if event_hash(prev, seq, ts, kind, call_id, payload) != h:
                return AuditResult(False, count, f"event {seq} ({kind}): content does not match its hash: edited",
                                   "edited", seq)
            if feed is not None and call_id is not None:
                feed(seq, ts, kind, call_id, payload)
            if seq in wanted:
                hashes_at[seq] = h
            prev, expected_seq, count = h, seq + 1, count + 1
            if first_hash is None:
                first_hash = h
    head = conn.execute("SELECT seq, hash FROM chain_head WHERE id = 1").fetchone()
    if head is not None and (head[0] != count or head[1] != prev):
        if head[0] > count:
            return AuditResult(False, count, f"events after {count} are missing (the head row says {head[0]}): "
                                             "the tail was truncated", "truncated", count + 1)
        return AuditResult(False, count, f"the head row (event {head[0]}) does not match the chain's last event "
                                         f"{count}", "truncated", count)

    checked = checkpoint_problem(checkpoints, key, count, first_hash, hashes_at, head_row=head is not None)
    if isinstance(checked, AuditResult):
        return checked
    if replay is not None and (disagreement := replay.compare(conn)) is not None:
        return AuditResult(False, count, f"the derived tables disagree with the chain: {disagreement}", "tables")
    parts = [f"ok: {count} events, chain intact"]
    if tables:
        parts.append("calls and votes agree with the chain")
    notes = list(checked)
    if checkpoints:
        latest = max(checkpoints, key=lambda c: c.seq)
        parts.append(f"extends {len(checkpoints)} signed checkpoint(s), the latest of event {latest.seq}")
        if latest.seq < count:
            notes.append(f"events {latest.seq + 1}..{count} are newer than the latest checkpoint: a later "
                         "checkpoint protects them")
    return AuditResult(True, count, "; ".join(parts), notes=notes)


def checkpoint_problem(checkpoints: Sequence[Checkpoint], key: Ed25519PublicKey | None, count: int,
                       first_hash: str | None, hashes_at: dict[int, str], *, head_row: bool) -> AuditResult | list[str]:
    """The first checkpoint the ledger does not extend, as a failed result; else notes (possibly none)."""
    if checkpoints and key is None:
        return AuditResult(False, count, "checkpoints were given but no public key to check them with",
                           "checkpoint")
    for cp in sorted(checkpoints, key=lambda c: c.seq):
        assert key is not None
        if cp.key_id != key_id(key):
            return AuditResult(False, count, f"{cp.describe()}: signed by key {cp.key_id}, not by the given key "
                                             f"{key_id(key)}", "checkpoint", cp.seq)
        if not cp.signed_by(key):
            return AuditResult(False, count, f"{cp.describe()}: the signature is not valid (the checkpoint was "
                                             "altered or forged)", "checkpoint", cp.seq)
        if first_hash is not None and cp.chain != first_hash:
            return AuditResult(False, count, f"swapped ledger: this is not the ledger of the {cp.describe()}: its "
                                             f"first event hashes to {first_hash[:16]}, the checkpointed chain's to "
                                             f"{cp.chain[:16]} (another ledger file, or one re-chained from its first "
                                             "event)", "swapped", 1)
        if cp.seq > count:
            head_note = ("the head row was rewritten to match" if head_row else "the head row was deleted with them")
            return AuditResult(False, count, f"tail truncated: the ledger ends at event {count} but the {cp.describe()}"
                                             f" covers it: events {count + 1}..{cp.seq} were deleted ({head_note})",
                               "truncated", count + 1)
        if hashes_at.get(cp.seq) != cp.hash:
            return AuditResult(False, count, f"re-chained: event {cp.seq} no longer has the hash of the "
                                             f"{cp.describe()}, though every link holds: events up to {cp.seq} were "
                                             "rewritten and the hashes after them recomputed", "rechained", cp.seq)
    return []


def extends(conn: sqlite3.Connection, seq: int, hash_: str) -> tuple[int, str, str] | str:
    """Whether the chain from event `seq` (which must have hash `hash_`) to the head links and hashes intact:
    (head seq, head hash, first event's hash), or what is wrong. Costs the events since `seq`."""
    if seq == 0:
        prev, expected = GENESIS, 1
    else:
        row = conn.execute("SELECT hash FROM events WHERE seq = ?", (seq,)).fetchone()
        if row is None or row[0] != hash_:
            return f"event {seq} no longer has the hash last checkpointed ({'deleted' if row is None else 'changed'})"
        prev, expected = hash_, seq + 1
    cursor = conn.execute("SELECT seq, ts, kind, call_id, payload, prev_hash, hash FROM events WHERE seq > ?"
                          " ORDER BY seq", (seq,))
    while batch := cursor.fetchmany(5000):
        for s, ts, kind, call_id, payload, prev_hash, h in batch:
            if s != expected or prev_hash != prev or event_hash(prev, s, ts, kind, call_id, payload) != h:
                return f"the chain is broken at event {expected}"
            prev, expected = h, s + 1
    first = conn.execute("SELECT hash FROM events WHERE seq = 1").fetchone()
    if first is None:
        return "the ledger has no events"
    return expected - 1, prev, first[0]
