"""The chain is the authority: a held call runs only when chained events prove its approval.

The `calls` and `votes` tables are indexes, written in the same transactions as the events, and fast to read;
someone with write access to the ledger file can change them without touching the chain (`UPDATE calls SET
state = 'approved'`, a forged vote row). So before a held call runs, the process that runs it reads the call's
chained events, with the stretch of the chain they span verified, and proves from them alone: the call was
received with these arguments (their hash) and decided under this policy (its digest); distinct people, each
eligible under the review the decision asked for and none of them the requester, voted to approve, enough to
fill every group's quorum; nobody denied; and keyturn then recorded the approval for these arguments and this
policy. Anything less runs nothing. A request whose arguments a reviewer edited is proven for the edited
arguments: the edit chained for them, and the votes after it filling the review the edit asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.approvals.edits import chained_edit
from server.approvals.quorum import ReviewerDirectory, quorum_met
from server.ledger import Store
from server.models import TERMINAL_EVENTS, Event, ReviewSpec

__all__ = ["approval_problem", "prove_approval"]


async def prove_approval(ledger: Store, request_id: str, *, args_hash: str, policy_digest: str,
                         directory: ReviewerDirectory) -> str | None:
    """None when the chain proves that `request_id` was approved for `args_hash` under `policy_digest`; otherwise
    what is missing or wrong."""
    events, broken = await ledger.call_chain(request_id)
    if broken is not None:
        return f"the chain around this request is broken: {broken}"
    return approval_problem(events, args_hash=args_hash, policy_digest=policy_digest, directory=directory)


def approval_problem(events: Sequence[Event], *, args_hash: str, policy_digest: str,
                     directory: ReviewerDirectory) -> str | None:
    """The proof over one request's chained events, in order (see the module docstring)."""
    by_kind: dict[str, list[Event]] = {}
    for e in events:
        by_kind.setdefault(e.kind, []).append(e)

    def first(kind: str) -> Event | None:
        return by_kind[kind][0] if kind in by_kind else None

    edit = chained_edit(events)
    if isinstance(edit, str):
        return edit
    received = first("call.received")
    if received is None or received.payload.get("args_hash") != (edit.from_args_hash if edit else args_hash):
        return "no chained call.received event for these arguments"
    decision = first("decision")
    if decision is None or decision.payload.get("policy_digest") != policy_digest:
        return "no chained decision under this policy"
    requested = first("approval.requested")
    if requested is None or not isinstance(requested.payload.get("review"), dict):
        return "no chained approval.requested event"
    spec = ReviewSpec.model_validate(requested.payload["review"])
    edited_at = 0
    if edit is not None:
        # Approved as edited: the edit is for these arguments, under this policy, by a reviewer who is not the
        # requester; the review it asked for is the one to fill, by votes cast after it.
        edited = by_kind["arguments.edited"][0]
        if edit.args_hash != args_hash or edited.payload.get("policy_digest") != policy_digest:
            return "the chained edit is for other arguments or another policy"
        if directory.person(edit.reviewer) != edit.person:
            return f"event {edited.seq}: {edit.reviewer} is not the reviewer {edit.person} (as configured now)"
        if not isinstance(edited.payload.get("review"), dict):
            return f"event {edited.seq}: the edit names no review"
        spec = ReviewSpec.model_validate(edited.payload["review"])
        edited_at = edited.seq
    granted = by_kind.get("approval.granted") or []
    if len(granted) != 1:
        return "no chained approval.granted event" if not granted else "more than one approval.granted event"
    grant = granted[0]
    if grant.payload.get("args_hash") != args_hash or grant.payload.get("policy_digest") != policy_digest:
        return "the chained approval is for other arguments or another policy"
    if ended := [e.kind for e in events if e.kind in TERMINAL_EVENTS or e.kind == "execution.started"]:
        return f"the request already {ended[0]}"
    requester = {received.payload.get("principal"), received.payload.get("on_behalf_of")} - {None}
    if edit is not None and (edit.person in requester or edit.reviewer in requester or edited_at > grant.seq):
        return f"event {edited_at}: not an edit keyturn records"
    approvers: list[str] = []
    for vote in (e for e in events if e.kind == "vote" and edited_at < e.seq < grant.seq):
        person, identity = vote.payload.get("person"), vote.payload.get("reviewer")
        if vote.payload.get("verdict") == "deny":
            return f"{person} denied this request"
        if vote.payload.get("verdict") != "approve" or not isinstance(person, str):
            return f"event {vote.seq} is not a vote keyturn records"
        if directory.person(str(identity)) != person:
            return f"event {vote.seq}: {identity} is not the reviewer {person} (as configured now)"
        if person in requester or identity in requester:
            return f"event {vote.seq}: the requester's own vote"
        if not any(directory.eligible(person, g) for g in spec.groups):
            return f"event {vote.seq}: {person} is not eligible to review this request"
        if person in approvers:
            return f"event {vote.seq}: {person} voted twice"
        approvers.append(person)
    if not quorum_met(spec, approvers, directory):
        return f"the chained votes ({', '.join(approvers) or 'none'}) do not reach the quorum the policy asked for"
    return None
