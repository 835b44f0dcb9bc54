"""The shared vocabulary of keyturn: what a call, a decision, a verdict and an event are.

This module imports nothing else from the package; every other room imports from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RiskLevel = Literal["low", "medium", "high", "critical"]
RISK_ORDER: dict[str, int] = {"low": 0, "medium": 1, "high": 2, "critical": 3}

Outcome = Literal["allow", "review", "deny"]
# Most restrictive wins: deny > review > allow.
OUTCOME_ORDER: dict[str, int] = {"allow": 0, "review": 1, "deny": 2}

VerdictKind = Literal["approve", "deny"]

RequestState = Literal[
    "received",  # recorded, not yet decided
    "allowed",  # policy allowed, about to run
    "pending",  # held, waiting for reviewers
    "approved",  # quorum reached, waiting to be run
    "running",  # claimed by one process, tool running
    "executed",
    "failed",
    "denied",
    "expired",
    "cancelled",
    "abandoned",
]
TERMINAL_STATES: frozenset[str] = frozenset({"executed", "failed", "denied", "expired", "cancelled", "abandoned"})

EventKind = Literal[
    "call.received",
    "call.rejoined",  # the same call repeated while its request lived (open, or ran and not yet expired)
    "client.left",  # the caller of a held call went away (connection closed, or cancelled); the request stays
    "result.delivered",  # a retry got the outcome (and the kept result) of a run, instead of a second run
    "decision",
    "approval.requested",
    "notified",
    "notify.failed",
    "vote",
    "vote.refused",
    "arguments.edited",  # a reviewer changed the arguments and approved the changed call (both hashes, the reason)
    "approval.granted",
    "execution.started",
    "policy.loaded",
    "policy.rejected",
    "process.started",
    "sandbox.disabled",  # an operator turned a tool's sandbox off (recorded at every start)
    "upstream.sandboxed",  # proxy mode: an upstream command's sandbox (network, mounts), recorded at every start
    "link.used",  # a signed single-use decision link was consumed (Teams webhook fallback)
    "link.released",  # ... and given back because the broker refused the vote
    # standing grants, chained under the grant's id (server.approvals.grants)
    "grant.created",  # an approval that lasts: its terms, approvers and the request it came from
    "grant.used",  # a call ran under it without waiting (the call's id); the call's execution.started names it
    "grant.revoked",  # a reviewer ended it (who, why)
    "grant.expired",  # its time passed or its uses ran out
    # terminal kinds: exactly one per call
    "executed",
    "failed",
    "denied",
    "expired",
    "cancelled",
    "abandoned",
]
TERMINAL_EVENTS: frozenset[str] = TERMINAL_STATES


STATE_LABELS: dict[str, str] = {
    "approved": "approved, waiting for the agent to come back",
}
"""How a state reads to a person where it differs from its name: an approved request that no caller has claimed
runs once when the agent repeats the call (before the request expires)."""


def state_label(state: str) -> str:
    return STATE_LABELS.get(state, state)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ToolCall(_Frozen):
    """One `tools/call` as the gate sees it, before anything runs."""

    call_id: str
    tool: str
    arguments: dict[str, Any]
    args_hash: str  # sha256 of the canonical JSON of `arguments`
    principal: str
    on_behalf_of: str | None = None
    model: str | None = None
    client: str | None = None  # MCP clientInfo name/version
    session: str | None = None
    annotations: dict[str, Any] = Field(default_factory=dict)


class MatchedRule(_Frozen):
    id: str
    outcome: Outcome
    risk: RiskLevel
    reason: str


class ApproverGroup(_Frozen):
    """`quorum` distinct approvals from the people/groups in `members` (empty = any reviewer)."""

    name: str
    members: tuple[str, ...] = ()  # person names or "group:<name>"
    quorum: int = 1
    # Groups of one requirement (one rule) need distinct people; separate requirements (several
    # matching rules) are each satisfied on their own, so one approver may count toward each.
    requirement: str = ""


class Escalation(_Frozen):
    after_s: float
    notify: tuple[str, ...]  # groups or people to notify next
    channels: tuple[str, ...] = ()


class ReviewSpec(_Frozen):
    """What a held call needs before it may run. All `groups` must be satisfied (AND)."""

    groups: tuple[ApproverGroup, ...] = (ApproverGroup(name="reviewers"),)
    timeout_s: float = 900.0
    require_reason: bool = False
    channels: tuple[str, ...] = ()  # e.g. "slack:#ops-approvals", "teams:default"
    escalation: tuple[Escalation, ...] = ()
    impact: str | None = None
    """What the call would touch, as every card shows it ("would delete 1,204 of 50,311 rows in orders"): measured
    before the decision (`server.classify.impact`), not a requirement."""


class Decision(_Frozen):
    outcome: Outcome
    risk: RiskLevel
    reason: str
    rules: tuple[MatchedRule, ...] = ()
    review: ReviewSpec | None = None
    policy_digest: str = ""
    facts: dict[str, Any] = Field(default_factory=dict)


class Verdict(_Frozen):
    """A reviewer's vote as a channel reports it: the identity is already verified by that channel."""

    request_id: str
    reviewer: str  # e.g. "api:alice", "slack:T01/U02", "teams:<tenant>/<oid>"
    verdict: VerdictKind
    reason: str | None = None
    channel: str = "api"


REFUSAL_STATUS = {"unknown": 404, "bad_request": 400, "reason_required": 400, "not_pending": 409, "expired": 409,
                  "duplicate": 409, "invalid_arguments": 400, "masked_values": 400, "already_edited": 409,
                  "already_voted": 409, "policy_changed": 409, "tool_unavailable": 409, "unknown_field": 400,
                  "grants_forbidden": 400, "over_limit": 400, "invalid_condition": 400, "too_large": 400,
                  "grant_after_edit": 409, "grant_not_agreed": 409, "not_live": 409}
"""The HTTP status of a refused vote, by its code (any other refusal: 403)."""


@dataclass(frozen=True)
class VoteResult:
    """What became of one reviewer's verdict, as every channel reports it: accepted (`code` recorded, approved or
    denied) or refused (`code` says why: unknown, unknown_reviewer, self_approval, not_eligible, duplicate,
    reason_required, not_pending, expired, bad_request; an edit's: invalid_arguments, masked_values,
    denied_by_policy, already_edited, already_voted, policy_changed, tool_unavailable; a refusal of a known request
    is in the ledger as `vote.refused`), the request's state after it, and a message for the reviewer."""

    request_id: str
    accepted: bool
    state: str
    message: str
    code: str

    @property
    def status(self) -> int:
        """The HTTP status a channel answers with."""
        return 200 if self.accepted else REFUSAL_STATUS.get(self.code, 403)


class Event(_Frozen):
    """One row of the ledger."""

    seq: int
    ts: float
    kind: str
    call_id: str | None
    payload: dict[str, Any]
    prev_hash: str
    hash: str


class RequestView(_Frozen):
    """The current state of one call/request, as stored (the store's materialised view)."""

    id: str
    tool: str
    principal: str
    on_behalf_of: str | None
    model: str | None
    args_hash: str
    arguments: dict[str, Any]  # redacted form, for display
    state: RequestState
    risk: RiskLevel | None
    reason: str | None
    rules: list[dict[str, Any]]
    review: ReviewSpec | None
    created: float
    expires: float | None
    votes: list[dict[str, Any]]
    outcome_reason: str | None = None
    policy_digest: str | None = None
