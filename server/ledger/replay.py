"""What the chained events say each call's row and votes are: the `calls` and `votes` tables replayed.

Those tables are indexes kept beside the chain for speed; `audit verify` replays the events (see
`server.outcomes`, `server.ledger.tx` and `server.approvals`: which event sets which state) and names the
first row that disagrees: a forged or changed vote, a state flipped behind keyturn's back, a row deleted.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from server.models import TERMINAL_STATES

STATE_OF_KIND = {
    "approval.requested": "pending",
    "approval.granted": "approved",
    "execution.started": "running",
    **{kind: kind for kind in TERMINAL_STATES},
}
DECISION_STATE = {"allow": "allowed", "review": "pending"}  # a deny is followed by its `denied` event
PARSED_KINDS = frozenset({"call.received", "decision", "approval.requested", "approval.granted", "vote"})


@dataclass
class ExpectedCall:
    first_seq: int
    tool: Any
    principal: Any
    on_behalf_of: Any
    args_hash: Any
    state: str = "received"
    state_seq: int = 0
    state_kind: str = "call.received"
    expires: Any = None
    policy_digest: Any = None
    votes: dict[str, tuple[int, tuple[Any, ...]]] = field(default_factory=dict)  # person -> (seq, row values)


class Replay:
    """Feed it every event in order (`event`); then `compare(conn)` names the first disagreeing row, or None."""

    def __init__(self) -> None:
        self.calls: dict[str, ExpectedCall] = {}
        self.orphan: tuple[int, str, str] | None = None  # the first state event for a call never received

    def event(self, seq: int, ts: float, kind: str, call_id: str | None, payload_json: str) -> None:
        if call_id is None:
            return
        if kind == "call.received":
            p = json.loads(payload_json)
            self.calls[call_id] = ExpectedCall(seq, p.get("tool"), p.get("principal"), p.get("on_behalf_of"),
                                               p.get("args_hash"), state_seq=seq)
            return
        call = self.calls.get(call_id)
        if call is None:
            if (kind in STATE_OF_KIND or kind in PARSED_KINDS) and self.orphan is None:
                self.orphan = (seq, kind, call_id)
            return
        if kind == "decision":
            p = json.loads(payload_json)
            call.policy_digest = p.get("policy_digest")
            if (state := DECISION_STATE.get(p.get("outcome"))) is not None:
                call.state, call.state_seq, call.state_kind = state, seq, kind
        elif kind == "vote":
            p = json.loads(payload_json)
            call.votes[str(p.get("person"))] = (seq, (p.get("reviewer"), p.get("verdict"), p.get("reason"),
                                                      p.get("groups"), ts))
        elif kind in STATE_OF_KIND:
            call.state, call.state_seq, call.state_kind = STATE_OF_KIND[kind], seq, kind
            if kind in ("approval.requested", "approval.granted"):
                call.expires = json.loads(payload_json).get("expires")

    def compare(self, conn: sqlite3.Connection) -> str | None:
        """The first disagreement between the tables and the chain (in the order of the events), or None."""
        found: list[tuple[int, str]] = []
        if self.orphan is not None:
            seq, kind, call_id = self.orphan
            found.append((seq, f"event {seq} ({kind}) is for call {call_id}, which the chain never received"))
        seen: set[str] = set()
        rows = conn.execute("SELECT id, tool, principal, on_behalf_of, args_hash, state, expires, policy_digest"
                            " FROM calls")
        for call_id, tool, principal, on_behalf_of, args_hash, state, expires, digest in rows:
            seen.add(call_id)
            call = self.calls.get(call_id)
            if call is None:
                found.append((1 << 62, f"calls row {call_id} (state {state!r}) has no call.received event in the "
                                       "chain: a forged row"))
                continue
            if state != call.state:
                found.append((call.state_seq, f"call {call_id}: the calls table says state {state!r}, the chain says "
                                              f"{call.state!r} (event {call.state_seq}, {call.state_kind})"))
            for name, row_value, chained in (("tool", tool, call.tool), ("principal", principal, call.principal),
                                             ("on_behalf_of", on_behalf_of, call.on_behalf_of),
                                             ("args_hash", args_hash, call.args_hash),
                                             ("expires", expires, call.expires),
                                             ("policy_digest", digest, call.policy_digest)):
                if row_value != chained:
                    found.append((call.first_seq, f"call {call_id}: the calls table says {name} {row_value!r}, "
                                                  f"the chain says {chained!r}"))
        for call_id, call in self.calls.items():
            if call_id not in seen:
                found.append((call.first_seq, f"call {call_id} is in the chain (event {call.first_seq}) but its "
                                              "calls row was deleted"))
        seen_votes: set[tuple[str, str]] = set()
        rows = conn.execute("SELECT call_id, person, reviewer, verdict, reason, groups, ts FROM votes")
        for call_id, person, reviewer, verdict, reason, groups, ts in rows:
            seen_votes.add((call_id, person))
            call = self.calls.get(call_id)
            chained_vote = call.votes.get(person) if call is not None else None
            if chained_vote is None:
                found.append((1 << 62, f"vote row: {verdict} by {person} on call {call_id} has no vote event in the "
                                       "chain: a forged vote"))
                continue
            seq, expected = chained_vote
            try:
                actual = (reviewer, verdict, reason, json.loads(groups), ts)
            except json.JSONDecodeError:
                actual = (reviewer, verdict, reason, groups, ts)
            if actual != expected:
                found.append((seq, f"vote row of {person} on call {call_id} differs from its vote event {seq}: "
                                   f"the table says {verdict!r}, the chain says {expected[1]!r}"))
        for call_id, call in self.calls.items():
            for person, (seq, values) in call.votes.items():
                if (call_id, person) not in seen_votes:
                    found.append((seq, f"the vote of {person} on call {call_id} ({values[1]}, event {seq}) is in the "
                                       "chain but its votes row was deleted"))
        if not found:
            return None
        found.sort(key=lambda f: f[0])
        more = f" (and {len(found) - 1} more disagreement(s))" if len(found) > 1 else ""
        return found[0][1] + more
