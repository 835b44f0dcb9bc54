"""Edit, then approve: a reviewer changes a held call's arguments and approves the changed call.

The changed call is judged again like any call (the tool's validation, the classifiers, the live policy:
`Gate.judge_edit`), and it may need more than the original, never less: it needs what the original's review asked
for *and* what its own decision asks for (`combined_review`); a policy deny refuses the edit. The editor's approval
counts toward that wherever the rules let it, never the requester's or whom it acts for.

An edit is made before anyone has approved (votes are for one set of arguments), once per request. The ledger
keeps it as `arguments.edited`, chained before the editor's vote: the editor, the reason, both argument hashes,
the edited arguments, the field-level difference, the edited call's decision and the review now needed. The
edited arguments are stored whole in that event: that is how whichever keyturn process holds the call learns what
to run. So an edit may not touch a call whose stored arguments hold masked values, nor bring values keyturn masks.

The held call runs exactly the edited arguments, once (their hash checked against the chain, `chained_edit`), and
the agent's result says who changed what and why (`edit_note`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mcp_types as types

from server.canonical import args_hash, canonical_json
from server.classify.impact import describe_impact
from server.classify.secrets import REDACTED
from server.ledger import Row, Tx
from server.models import ApproverGroup, Decision, Event, ReviewSpec

__all__ = ["EDIT_META_KEY", "ChainedEdit", "EditRefused", "ProposedEdit", "approved_hash", "arguments_diff", "chained_edit",
           "combined_review", "describe_diff", "edit_note", "edit_refusal", "has_masked", "record_edit"]

EDIT_META_KEY = "io.keyturn/edit"
"""Where an edited call's result carries the edit for programs (editor, reason, hashes, difference): its `_meta`."""
EDITED_REQUIREMENT = "edited:"
"""The prefix of the requirements the edited call's own review adds (kept apart from the original's)."""
MAX_SHOWN = 200
"""A changed value is shown to the agent up to this many characters."""


@dataclass(frozen=True)
class ProposedEdit:
    """A reviewer's changed arguments, judged: validated (normalised by the tool), hashed, decided by the policy."""

    arguments: dict[str, Any]
    args_hash: str
    decision: Decision
    diff: list[dict[str, Any]]


@dataclass(frozen=True)
class EditRefused:
    """An edit keyturn will not make: its code (a `VoteResult` code) and why."""

    code: str
    message: str


@dataclass(frozen=True)
class ChainedEdit:
    """An edit as the chain holds it: what runs instead of the original arguments."""

    arguments: dict[str, Any]
    args_hash: str
    from_args_hash: str
    person: str
    reviewer: str
    reason: str
    diff: list[dict[str, Any]]


def has_masked(value: Any) -> bool:
    """True when `value` (stored arguments) holds a value keyturn masked."""
    return REDACTED in json.dumps(value, ensure_ascii=False)


def arguments_diff(before: Any, after: Any, path: str = "") -> list[dict[str, Any]]:
    """Field by field (JSON pointers): each added, removed or changed value, with `before` and/or `after`."""
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        out: list[dict[str, Any]] = []
        for key in [*before, *(k for k in after if k not in before)]:
            here = f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"
            if key not in after:
                out.append({"path": here, "change": "removed", "before": before[key]})
            elif key not in before:
                out.append({"path": here, "change": "added", "after": after[key]})
            else:
                out.extend(arguments_diff(before[key], after[key], here))
        return out
    if before == after and type(before) is type(after):
        return []
    return [{"path": path or "/", "change": "changed", "before": before, "after": after}]


def combined_review(original: ReviewSpec, edited: Decision) -> ReviewSpec:
    """What the edited call needs: every group of the original's review and of the edited call's own (kept as
    separate requirements, so one person may count toward each); never less than either."""
    if edited.outcome != "review" or edited.review is None:
        return original.model_copy(update={"impact": describe_impact(edited.facts)})  # what the edited call touches
    own = edited.review
    groups: list[ApproverGroup] = list(original.groups)
    for g in own.groups:
        added = g.model_copy(update={"requirement": EDITED_REQUIREMENT + g.requirement})
        if not any(o.members == g.members and o.quorum >= g.quorum for o in original.groups):
            groups.append(added)
    return original.model_copy(update={
        "groups": tuple(groups),
        "timeout_s": min(original.timeout_s, own.timeout_s),
        "require_reason": original.require_reason or own.require_reason,
        "channels": tuple(dict.fromkeys((*original.channels, *own.channels))),
        "impact": own.impact,
    })


def edit_refusal(row: Row, votes: Sequence[Row], edit: ProposedEdit, tx: Tx) -> EditRefused | None:
    """Inside the vote's transaction: why this request cannot take `edit` now, or None."""
    if tx.call_events(row["id"], ("arguments.edited",)):
        return EditRefused("already_edited", f"request {row['id']}'s arguments were already edited; approve or deny "
                                             "the edited call")
    if votes:
        return EditRefused("already_voted", f"request {row['id']} already has approvals for its arguments as they "
                                            "are; an edit would discard them: deny it with guidance instead")
    if edit.decision.policy_digest != row["policy_digest"]:
        return EditRefused("policy_changed", "the policy changed since this request was made; the agent's next "
                                             "call is judged under the new one")
    return None


def approved_hash(tx: Tx, row: Row) -> str:
    """Inside a vote's transaction: the hash of the arguments a vote on this request approves (the edited ones once a
    reviewer edited them)."""
    edited = tx.call_events(row["id"], ("arguments.edited",))
    return str(edited[-1][1]["args_hash"]) if edited else str(row["args_hash"])


def record_edit(tx: Tx, row: Row, edit: ProposedEdit, *, reviewer: str, person: str, reason: str | None,
                channel: str) -> ReviewSpec:
    """Chain `arguments.edited` and make the request's row show the edited call; the review it now needs."""
    original = ReviewSpec.model_validate_json(row["review"]) if row["review"] else ReviewSpec()
    spec = combined_review(original, edit.decision)
    d = edit.decision
    tx.append("arguments.edited", row["id"], {
        "reviewer": reviewer, "person": person, "reason": reason, "channel": channel,
        "from_args_hash": row["args_hash"], "args_hash": edit.args_hash, "arguments": edit.arguments,
        "diff": edit.diff, "policy_digest": d.policy_digest,
        "decision": {"outcome": d.outcome, "risk": d.risk, "reason": d.reason,
                     "rules": [r.model_dump() for r in d.rules]},
        "review": spec.model_dump(),
    })
    # The row's args_hash stays the original's: the agent rejoins its request with the arguments it sent.
    tx.set_state(row["id"], "pending", arguments=canonical_json(edit.arguments), review=spec.model_dump_json())
    return spec


def chained_edit(events: Sequence[Event]) -> ChainedEdit | str | None:
    """The request's edit from its chained events: None when not edited, a problem (str) when not sound."""
    edits = [e for e in events if e.kind == "arguments.edited"]
    if not edits:
        return None
    if len(edits) > 1:
        return "more than one arguments.edited event"
    p = edits[0].payload
    arguments = p.get("arguments")
    if not isinstance(arguments, dict) or args_hash(arguments) != p.get("args_hash"):
        return "the chained edit's arguments do not match its hash"
    diff = p.get("diff")
    return ChainedEdit(arguments=arguments, args_hash=str(p["args_hash"]), from_args_hash=str(p.get("from_args_hash")),
                       person=str(p.get("person")), reviewer=str(p.get("reviewer")), reason=str(p.get("reason") or ""),
                       diff=diff if isinstance(diff, list) else [])


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "…"


def describe_diff(diff: Sequence[Mapping[str, Any]]) -> str:
    """The difference as one line per field, for a person or an agent to read."""
    lines = []
    for d in diff:
        if d.get("change") == "added":
            lines.append(f"{d['path']}: added {_shown(d.get('after'))}")
        elif d.get("change") == "removed":
            lines.append(f"{d['path']}: removed (was {_shown(d.get('before'))})")
        else:
            lines.append(f"{d['path']}: {_shown(d.get('before'))} -> {_shown(d.get('after'))}")
    return "\n".join(lines)


def edit_note(result: types.CallToolResult, edit: ChainedEdit) -> types.CallToolResult:
    """`result` with a first text block saying that a reviewer changed the arguments, and how; the edit in `_meta`."""
    note = (f"keyturn: reviewer {edit.person} changed the arguments before approving (reason: {edit.reason}). "
            f"What ran is the edited call, not the one you sent:\n{describe_diff(edit.diff)}")
    meta = dict(result.meta or {})
    meta[EDIT_META_KEY] = {"editor": edit.person, "reason": edit.reason, "from_args_hash": edit.from_args_hash,
                           "args_hash": edit.args_hash, "diff": edit.diff}
    return result.model_copy(update={"content": [types.TextContent(type="text", text=note), *result.content],
                                     "meta": meta})
