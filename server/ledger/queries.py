"""The ledger's reads: each a function of one SQLite connection, run by `SqliteStore` at once (quick, indexed) or
on its read-only connection (long). Rows become the shared vocabulary (`Event`, `RequestView`) here."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from server.ledger.checkpoints import Checkpoint
from server.models import Event, RequestView, ReviewSpec

Row = dict[str, Any]
"""A row by column name, as the store hands it out (the same for every backend)."""

CALL_STATES_CHUNK = 500
"""Calls whose states one quick read looks up (`Ledger.call_states`)."""


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


def get_call(conn: sqlite3.Connection, call_id: str) -> RequestView | None:
    row = conn.execute("SELECT * FROM calls WHERE id = ?", (call_id,)).fetchone()
    if row is None:
        return None
    return row_to_view(row, conn.execute("SELECT * FROM votes WHERE call_id = ? ORDER BY ts", (call_id,)))


def holder(conn: sqlite3.Connection, call_id: str) -> str | None:
    row = conn.execute("SELECT holder FROM calls WHERE id = ?", (call_id,)).fetchone()
    return row["holder"] if row is not None else None


def call_states(conn: sqlite3.Connection, call_ids: Sequence[str]) -> dict[str, str]:
    rows = conn.execute("SELECT id, state FROM calls WHERE id IN (SELECT value FROM json_each(?))",
                        (json.dumps(list(call_ids)),))
    return {r["id"]: r["state"] for r in rows}


def calls_with_events(conn: sqlite3.Connection, kinds: Iterable[str], after_seq: int, upto_seq: int) -> set[str]:
    wanted = sorted(kinds)
    sql = (f"SELECT DISTINCT call_id FROM events WHERE seq > ? AND seq <= ? AND call_id IS NOT NULL"
           f" AND kind IN ({','.join('?' * len(wanted))})")
    return {r[0] for r in conn.execute(sql, (int(after_seq), int(upto_seq), *wanted))}


def expired_calls(conn: sqlite3.Connection, now: float, limit: int) -> list[str]:
    rows = conn.execute(
        "SELECT id FROM calls INDEXED BY calls_open_expires"
        " WHERE state IN ('pending','approved') AND expires IS NOT NULL AND expires <= ?"
        " ORDER BY expires LIMIT ?", (float(now), int(limit)))
    return [r["id"] for r in rows]


def open_calls_held_elsewhere(conn: sqlite3.Connection, states: Iterable[str], holder: str) -> list[Row]:
    wanted = list(states)
    sql = (f"SELECT id, state, holder FROM calls WHERE state IN ({','.join('?' * len(wanted))})"
           " AND (holder IS NULL OR holder != ?) ORDER BY created")
    return [as_row(r) for r in conn.execute(sql, (*wanted, holder))]


def list_calls(conn: sqlite3.Connection, states: Iterable[str], limit: int) -> list[RequestView]:
    wanted = list(states)
    sql = f"SELECT * FROM calls WHERE state IN ({','.join('?' * len(wanted))}) ORDER BY created DESC LIMIT ?"
    return with_votes(conn, list(conn.execute(sql, [*wanted, int(limit)])))


def count_calls(conn: sqlite3.Connection, states: Iterable[str], limit: int) -> int:
    """How many calls are in `states`, counting at most `limit` (the count reads ids only, through the state index)."""
    wanted = list(states)
    sql = (f"SELECT count(*) FROM (SELECT 1 FROM calls WHERE state IN ({','.join('?' * len(wanted))}) LIMIT ?) AS counted")
    return int(conn.execute(sql, [*wanted, int(limit)]).fetchone()[0])


def find_open(conn: sqlite3.Connection, principal: str, tool: str, args_hash: str) -> RequestView | None:
    row = conn.execute(
        "SELECT * FROM calls WHERE principal = ? AND tool = ? AND args_hash = ?"
        " AND state IN ('pending','approved') ORDER BY created LIMIT 1",
        (principal, tool, args_hash),
    ).fetchone()
    if row is None:
        return None
    return row_to_view(row, conn.execute("SELECT * FROM votes WHERE call_id = ? ORDER BY ts", (row["id"],)))


def find_rejoinable(conn: sqlite3.Connection, principal: str, tool: str, args_hash: str,
                    now: float) -> RequestView | None:
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


def events(conn: sqlite3.Connection, call_id: str | None, after_seq: int, limit: int) -> list[Event]:
    if call_id is None:
        rows = conn.execute("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit))
    else:
        rows = conn.execute("SELECT * FROM events WHERE call_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                            (call_id, after_seq, limit))
    return [row_to_event(r) for r in rows]


def last_event(conn: sqlite3.Connection, call_id: str) -> Event | None:
    row = conn.execute("SELECT * FROM events WHERE call_id = ? ORDER BY seq DESC LIMIT 1", (call_id,)).fetchone()
    return row_to_event(row) if row is not None else None


def tail(conn: sqlite3.Connection, n: int) -> list[Event]:
    rows = list(conn.execute("SELECT * FROM events ORDER BY seq DESC LIMIT ?", (int(n),)))
    return [row_to_event(r) for r in reversed(rows)]


def search_calls(conn: sqlite3.Connection, where: CallFilter, limit: int,
                 before: tuple[float, str] | None) -> list[RequestView]:
    params = {
        "tool": where.tool, "principal": where.principal, "reviewer": where.reviewer, "state": where.state,
        "since": where.since, "until": where.until, "limit": max(1, int(limit)),
        "before_created": before[0] if before else None, "before_id": before[1] if before else None,
    }
    return with_votes(conn, list(conn.execute(_SEARCH_CALLS, params)))


def call_facets(conn: sqlite3.Connection, limit: int) -> dict[str, list[str]]:
    tools = conn.execute("SELECT DISTINCT tool FROM calls ORDER BY tool LIMIT ?", (limit,))
    tool_names = [r[0] for r in tools]
    principals = [r[0] for r in conn.execute("SELECT DISTINCT principal FROM calls ORDER BY principal LIMIT ?",
                                             (limit,))]
    people = [r[0] for r in conn.execute("SELECT DISTINCT person FROM votes ORDER BY person LIMIT ?", (limit,))]
    return {"tools": tool_names, "principals": principals, "reviewers": people}


def head_seq(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0)


def event_hashes(conn: sqlite3.Connection, seq: int) -> tuple[str, str] | None:
    """(hash of event `seq`, hash of event 1): what a checkpoint of event `seq` signs."""
    at = conn.execute("SELECT hash FROM events WHERE seq = ?", (seq,)).fetchone()
    first = conn.execute("SELECT hash FROM events WHERE seq = 1").fetchone()
    if at is None or first is None:
        return None
    return at[0], first[0]


def instances(conn: sqlite3.Connection) -> list[Row]:
    return [as_row(r) for r in conn.execute("SELECT * FROM instances")]


def web_session(conn: sqlite3.Connection, id_sha256: str) -> Row | None:
    row = conn.execute("SELECT * FROM web_sessions WHERE id_sha256 = ?", (id_sha256,)).fetchone()
    return as_row(row) if row is not None else None


# -- checkpoints (the ledger's own copies: the `checkpoints` table, outside the chain) -------------------

def stored_checkpoints(conn: sqlite3.Connection, after_seq: int = 0, key_id: str | None = None) -> list[Checkpoint]:
    """The checkpoints kept in the ledger after `after_seq` (by `key_id`, when given), by seq."""
    rows = conn.execute("SELECT seq, hash, chain, time, key_id, sig FROM checkpoints WHERE seq > ?"
                        " AND (? IS NULL OR key_id = ?) ORDER BY seq", (after_seq, key_id, key_id))
    return [Checkpoint(seq=r[0], hash=r[1], chain=r[2], time=r[3], key_id=r[4], sig=r[5]) for r in rows]


def as_row(row: sqlite3.Row) -> Row:
    return dict(zip(row.keys(), row, strict=True))


def with_votes(conn: sqlite3.Connection, rows: list[sqlite3.Row]) -> list[RequestView]:
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


def grants(conn: sqlite3.Connection, live_only: bool, limit: int) -> list[Row]:
    """Standing grants, newest first (only the live ones when `live_only`)."""
    where = "WHERE state = 'live' " if live_only else ""
    return [as_row(r) for r in conn.execute(f"SELECT * FROM grants {where}ORDER BY created DESC, id LIMIT ?", (limit,))]


def grant(conn: sqlite3.Connection, grant_id: str) -> Row | None:
    row = conn.execute("SELECT * FROM grants WHERE id = ?", (grant_id,)).fetchone()
    return as_row(row) if row is not None else None


def grants_due(conn: sqlite3.Connection, now: float, limit: int) -> list[str]:
    """Live grants whose time has passed or whose uses have run out: what housekeeping ends as expired."""
    return [r[0] for r in conn.execute(
        "SELECT id FROM grants WHERE state = 'live' AND (expires <= ? OR used >= uses) ORDER BY expires LIMIT ?",
        (now, limit))]


def live_grants(conn: sqlite3.Connection, principal: str, tool: str) -> list[Row]:
    """The live grants for this principal and tool, oldest first."""
    return [as_row(r) for r in conn.execute(
        "SELECT * FROM grants WHERE principal = ? AND tool = ? AND state = 'live' ORDER BY created, id",
        (principal, tool))]
