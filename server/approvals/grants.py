"""Standing grants: a reviewer's approval that lasts, for "calls like this one", bounded in time and in uses.

A grant is made only by approving a held request with a grant spec (`{"for": "1h", "uses": 5, "when": "<CEL>"}`),
by the vote that completes the request's quorum, when every approver of that request agreed to a grant: its
terms are the narrowest any of them gave (the shortest time, the fewest uses, every condition). It covers a later
call only when all of these hold:

- the same principal, on behalf of the same person, and the same tool;
- the policy in force is the one the grant was made under (its digest), the call is decided `review` by exactly the
  same rules with the same review (a call that needs more, another rule, a higher risk or a deny, is not covered);
- every condition holds over the call's `args` and `facts`: keyturn's own proposal, made from the call the grant
  came from (its tables and statement kinds, paths, hosts, commands, or else its exact arguments), and each
  reviewer's narrowing. Conditions are evaluated one by one, never joined as text, so no condition a reviewer
  writes can widen the proposal: a grant is never broader than the call it came from;
- it is live in the chain (created, neither revoked nor expired), its time has not passed, a use is left.

Every grant event is chained under the grant's id (`grant.created`, `grant.used`, `grant.revoked`,
`grant.expired`); the `grants` table is their index. A use is one transaction: the grant is re-read and checked
against its chained events, one use is taken by a conditional update (two calls racing for the last use: one wins,
the other is held for a reviewer as usual), and the call is recorded with `grant.used` before it runs.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cel
import mcp_types as types

from server.approvals.edits import has_masked
from server.approvals.quorum import ReviewerDirectory, quorum_met
from server.canonical import canonical_json
from server.durations import parse_duration
from server.errors import LedgerError
from server.ledger import Row, Store
from server.ledger.tx import Tx
from server.models import RISK_ORDER, Decision, Event, MatchedRule, RequestView, ReviewSpec, ToolCall
from server.policy.conditions import Condition, ConditionError, compile_condition
from server.policy.engine import CompiledPolicy, complete_facts
from server.records import decision_payload, received_payload, rules_payload

__all__ = [
    "GRANT_KINDS", "GRANT_META_KEY", "GrantRefused", "GrantSpec", "ProposedGrant", "UsedGrant", "consent", "covers",
    "expire_due", "find_cover", "grant_json", "grant_note", "grant_problem", "make_grant", "offer", "parse_spec",
    "prepare_grant", "proposal_for", "propose", "revoke", "use_grant",
]

log = logging.getLogger(__name__)

GRANT_META_KEY = "io.keyturn/grant"
"""Where a result that ran under a grant says so, for programs (the result's `_meta`)."""
GRANT_KINDS = ("grant.created", "grant.used", "grant.revoked", "grant.expired")
SPEC_FIELDS = frozenset({"for", "uses", "when"})
MAX_WHEN = 2000
MAX_CONDITION = 8000
"""A proposal longer than this (a call's whole arguments, when nothing narrower describes it) is not offered."""
EXPIRE_BATCH = 1000


@dataclass(frozen=True)
class GrantSpec:
    """What a reviewer asks for: how long, how many uses, and an optional narrowing condition."""

    for_s: float
    uses: int
    when: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"for_s": self.for_s, "uses": self.uses, "when": self.when}


@dataclass(frozen=True)
class GrantRefused:
    code: str
    message: str
    fields: tuple[str, ...] = ()  # unknown fields of the spec, by name


@dataclass(frozen=True)
class ProposedGrant:
    """A grant spec judged against its request: the conditions a covered call must meet (keyturn's proposal first,
    then the reviewer's), and what of the request's decision it is bound to."""

    spec: GrantSpec
    conditions: tuple[str, ...]
    rules: tuple[str, ...]
    risk: str
    review: dict[str, Any]
    policy_digest: str


@dataclass(frozen=True)
class UsedGrant:
    """A grant a call ran under: its id, who made it, for which request, and the use this was."""

    id: str
    request_id: str
    approvers: tuple[str, ...]
    use: int
    uses: int
    expires: float


def parse_spec(body: object) -> GrantSpec | GrantRefused:
    """A reviewer's grant spec, strictly: `for` (a duration) and `uses` (a positive integer) required, `when`
    optional; any other field is refused by name."""
    if not isinstance(body, dict):
        return GrantRefused("bad_request", 'grant must be a JSON object: {"for": "1h", "uses": 5, "when": "..."}')
    unknown = sorted(set(body) - SPEC_FIELDS)
    if unknown:
        return GrantRefused("unknown_field", f"unknown field(s) in the grant: {', '.join(unknown)} (it takes `for`, "
                                             "`uses` and `when`)", tuple(f"grant.{f}" for f in unknown))
    if "for" not in body or "uses" not in body:
        return GrantRefused("bad_request", "a grant names how long it lasts (`for`, e.g. \"1h\") and how many calls it "
                                           "covers (`uses`)")
    try:
        for_s = parse_duration(body["for"])
    except ValueError as e:
        return GrantRefused("bad_request", f"grant.for: {e}")
    uses = body["uses"]
    if isinstance(uses, bool) or not isinstance(uses, int) or uses < 1:
        return GrantRefused("bad_request", "grant.uses must be a positive integer")
    when = body.get("when")
    if when is not None and (not isinstance(when, str) or not when.strip() or len(when) > MAX_WHEN):
        return GrantRefused("bad_request", f"grant.when must be a non-empty CEL expression of at most {MAX_WHEN} "
                                           "characters")
    return GrantSpec(for_s=for_s, uses=uses, when=when.strip() if isinstance(when, str) else None)


# -- conditions ----------------------------------------------------------------------------------------------


def compile_grant_condition(source: str, variables: Mapping[str, Any] | None = None) -> Condition:
    """A grant condition, compiled by the policy's CEL engine; it may read only `args` and `facts`."""
    condition = compile_condition(source, variables)
    other = sorted({path[0] for _, path in condition.slots} - {"args", "facts"})
    if other:
        raise ConditionError(f"a grant condition reads only args and facts (not {', '.join(other)})")
    if condition.unknown_functions:
        raise ConditionError(f"unknown function {condition.unknown_functions[0]!r}")
    return condition


def holds(source: str, arguments: Mapping[str, Any], facts: Mapping[str, Any]) -> bool:
    """True only when `source` evaluates to true over these `args` and `facts`; an error is false (fail closed)."""
    try:
        condition = compile_grant_condition(source)
        full: dict[str, Any] = {"args": dict(arguments), "facts": complete_facts(facts)}
        values: dict[str, Any] = {}
        for name, path in condition.slots:
            value: Any = full
            for part in path:
                value = value[part]
            values[name] = value
        return condition.evaluate(cel.Context(variables=values, functions=dict(condition.functions))) is True
    except Exception as e:  # CEL raises several kinds at evaluation: none of them covers a call
        log.debug("a grant condition failed: %s", e)
        return False


def _literal(value: Any) -> str:
    """A JSON value as a CEL literal (JSON's strings, numbers, lists, maps, true/false/null are CEL's)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def propose(arguments: Mapping[str, Any], facts: Mapping[str, Any]) -> str:
    """keyturn's condition for "calls like this one", from the call's facts: what it acts on, and (when keyturn
    measured it) no more rows than this call; a call no classifier describes is bound to its exact arguments."""
    full = complete_facts(facts)
    clauses: list[str] = []
    sql = full.get("sql") or {}
    if sql.get("present"):
        clauses += [f"facts.sql.tables == {_literal(sql.get('tables', []))}",
                    f"facts.sql.kinds == {_literal(sql.get('kinds', []))}"]
        rows = sql.get("rows_affected")
        if isinstance(rows, int) and not isinstance(rows, bool) and rows >= 0:
            clauses.append(f"facts.sql.rows_affected <= {rows}")
    shell = full.get("shell") or {}
    if shell.get("present"):
        clauses.append(f"facts.shell.commands == {_literal(shell.get('commands', []))}")
    paths = full.get("paths") or {}
    if paths.get("present"):
        clauses.append(f"facts.paths.all == {_literal(paths.get('all', []))}")
    urls = full.get("urls") or {}
    if urls.get("present"):
        clauses.append(f"facts.urls.all == {_literal(urls.get('all', []))}")
    if not clauses:
        clauses.append(f"args == {_literal(dict(arguments))}")
    return " && ".join(clauses)


# -- judging a reviewer's grant (before the vote's transaction) ---------------------------------------------


def _decision_of(events: Sequence[Event]) -> Decision | None:
    chained = next((e for e in events if e.kind == "decision"), None)
    if chained is None:
        return None
    p = chained.payload
    review = p.get("review")
    return Decision(outcome=p["outcome"], risk=p["risk"], reason=str(p.get("reason") or ""),
                    rules=tuple(MatchedRule.model_validate(r) for r in p.get("rules") or ()),
                    review=ReviewSpec.model_validate(review) if isinstance(review, dict) else None,
                    policy_digest=str(p.get("policy_digest") or ""), facts=complete_facts(p.get("facts") or {}))


def proposal_for(view: RequestView, events: Sequence[Event]) -> str | None:
    """The condition keyturn would propose for a grant from this request (for a reviewer to read), or None when it
    cannot become one (its arguments were edited, or hold masked values)."""
    decision = _decision_of(events)
    if decision is None or has_masked(view.arguments) or any(e.kind == "arguments.edited" for e in events):
        return None
    return propose(view.arguments, decision.facts)


def offer(policy: CompiledPolicy, view: RequestView, events: Sequence[Event]) -> dict[str, Any]:
    """What a reviewer is offered for a grant from this request: whether the policy allows one (and why not), its
    bounds, and the condition keyturn proposes (`GET /api/requests/{id}`'s `grant`, `keyturn show`)."""
    decision = _decision_of(events)
    proposed = proposal_for(view, events)
    why = ("the request is not pending" if view.state != "pending" else
           "a call whose arguments were edited or hold masked values cannot become a grant" if proposed is None else
           "the policy changed since this request was made" if decision is None or decision.policy_digest !=
           policy.digest else policy.grant_refusal(decision))
    limits = policy.grant_limits
    return {"allowed": why is None, "why_not": why, "proposed": proposed,
            "max_for_s": limits.max_for_s if limits else None, "max_uses": limits.max_uses if limits else None}


def prepare_grant(policy: CompiledPolicy, view: RequestView, events: Sequence[Event],
                  spec: GrantSpec) -> ProposedGrant | GrantRefused:
    """`spec` judged against the held request `view` (its chained `events`) and the policy in force: whether its
    rules allow grants, whether it is within the policy's bounds, and the conditions it will carry."""
    if any(e.kind == "arguments.edited" for e in events):
        return GrantRefused("grant_after_edit", "a call whose arguments a reviewer edited cannot become a grant; "
                                                "approve it, and grant on the agent's next call like it")
    if has_masked(view.arguments):
        return GrantRefused("masked_values", "a call carrying values keyturn masks as secrets cannot become a grant")
    decision = _decision_of(events)
    if decision is None or view.policy_digest != policy.digest or decision.policy_digest != policy.digest:
        return GrantRefused("policy_changed", "the policy changed since this request was made; a grant is made under "
                                              "the policy in force")
    if (why := policy.grant_refusal(decision)) is not None:
        return GrantRefused("grants_forbidden", why)
    limits = policy.grant_limits
    assert limits is not None  # (grant_refusal says so when None)
    if spec.for_s > limits.max_for_s:
        return GrantRefused("over_limit", f"grant.for is over the policy's maximum of {limits.max_for_s:g}s "
                                          "(review.grants.max_for)")
    if spec.uses > limits.max_uses:
        return GrantRefused("over_limit", f"grant.uses is over the policy's maximum of {limits.max_uses} "
                                          "(review.grants.max_uses)")
    proposal = propose(view.arguments, decision.facts)
    if len(proposal) > MAX_CONDITION:
        return GrantRefused("too_large", "this call's arguments are too large to bind a grant to")
    conditions = [proposal]
    if spec.when is not None:
        try:
            compile_grant_condition(spec.when, policy.vars)
        except ConditionError as e:
            return GrantRefused("invalid_condition", f"grant.when does not compile: {e}")
        conditions.append(spec.when)
    for source in conditions:
        if not holds(source, view.arguments, decision.facts):
            return GrantRefused("invalid_condition", f"the grant's condition is false for this very call: {source}")
    assert decision.review is not None
    rules = tuple(r.id for r in decision.rules if r.outcome == "review")
    return ProposedGrant(spec=spec, conditions=tuple(conditions), rules=rules, risk=decision.risk,
                         review=decision.review.model_dump(mode="json"), policy_digest=decision.policy_digest)


# -- inside the vote's transaction --------------------------------------------------------------------------


def consent(grant: ProposedGrant) -> dict[str, Any]:
    """What a vote records of its agreement to a grant."""
    return {**grant.spec.as_json(), "conditions": list(grant.conditions)}


def make_grant(tx: Tx, row: Row, grant: ProposedGrant, consents: Sequence[dict[str, Any]],
               approvers: Sequence[str], *, person: str, reviewer: str, reason: str | None, channel: str) -> str:
    """Chain `grant.created` (under a new grant's id) and index it. `consents`: every approver's agreement, the
    last one this vote's; the grant's terms are the narrowest of them."""
    grant_id = "g" + uuid.uuid4().hex
    for_s = min(float(c["for_s"]) for c in consents)
    uses = min(int(c["uses"]) for c in consents)
    conditions = list(dict.fromkeys(s for c in consents for s in c["conditions"]))
    expires = tx.now + for_s
    payload = {
        "request_id": row["id"], "principal": row["principal"], "on_behalf_of": row["on_behalf_of"],
        "tool": row["tool"], "rules": list(grant.rules), "risk": grant.risk, "review": grant.review,
        "policy_digest": grant.policy_digest, "conditions": conditions, "for_s": for_s, "uses": uses,
        "expires": expires, "approvers": list(approvers), "created_by": person, "reviewer": reviewer,
        "reason": reason, "channel": channel,
    }
    tx.insert_grant(grant_id, {"request_id": row["id"], "principal": row["principal"],
                               "on_behalf_of": row["on_behalf_of"], "tool": row["tool"],
                               "spec": canonical_json(payload), "expires": expires, "uses": uses})
    tx.append("grant.created", grant_id, payload)
    return grant_id


# -- using a grant -----------------------------------------------------------------------------------------


def _spec(row: Row) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(row["spec"])
    return spec


def covers(row: Row, call: ToolCall, decision: Decision, now: float) -> bool:
    """Whether the grant `row` covers `call`, decided as `decision` (see the module docstring)."""
    spec = _spec(row)
    if (row["state"] != "live" or row["expires"] <= now or row["used"] >= row["uses"]
            or row["principal"] != call.principal or row["on_behalf_of"] != call.on_behalf_of
            or row["tool"] != call.tool or decision.outcome != "review" or decision.review is None
            or spec.get("policy_digest") != decision.policy_digest):
        return False
    if {call.principal, call.on_behalf_of} & set(spec.get("approvers") or ()):
        return False  # no self-approval, whatever the directory says now
    rules = tuple(r.id for r in decision.rules if r.outcome == "review")
    if sorted(rules) != sorted(spec.get("rules") or ()) or any(r.outcome == "deny" for r in decision.rules):
        return False
    if RISK_ORDER[decision.risk] > RISK_ORDER.get(str(spec.get("risk")), -1):
        return False
    if decision.review.model_dump(mode="json") != spec.get("review"):
        return False
    if decision.facts.get("condition_errors"):
        return False
    conditions = spec.get("conditions") or []
    return bool(conditions) and all(holds(c, call.arguments, decision.facts) for c in conditions)


async def find_cover(ledger: Store, call: ToolCall, decision: Decision) -> Row | None:
    """The first live grant (oldest first) that covers `call`, as read now (the use re-checks it)."""
    now = time.time()
    for row in await ledger.live_grants(call.principal, call.tool):
        if covers(row, call, decision, now):
            return row
    return None


def _chain_problem(tx: Tx, row: Row) -> str | None:
    """What is wrong with the grant's chained events against its row, or None: it was created as indexed, and
    neither revoked nor expired, and its uses are those chained."""
    events = tx.call_events(row["id"], GRANT_KINDS)
    created = [p for kind, p in events if kind == "grant.created"]
    if len(created) != 1 or canonical_json(created[0]) != row["spec"]:
        return "its grant.created event is missing or differs from its row"
    if any(kind in ("grant.revoked", "grant.expired") for kind, _ in events):
        return "it has ended in the chain"
    used = sum(1 for kind, _ in events if kind == "grant.used")
    spec = created[0]
    if used != row["used"] or row["uses"] != spec.get("uses") or row["expires"] != spec.get("expires") \
            or row["principal"] != spec.get("principal") or row["tool"] != spec.get("tool") \
            or row["on_behalf_of"] != spec.get("on_behalf_of") or row["request_id"] != spec.get("request_id"):
        return "its row differs from its chained events"
    return None


def grant_problem(spec: Mapping[str, Any], request: Sequence[Event], directory: ReviewerDirectory) -> str | None:
    """What the chained events of the request a grant came from fail to prove, or None: the call was received from
    the grant's agent for its tool, approved once by exactly the grant's approvers (each a configured reviewer, not
    the requester, each voting to approve with their agreement to a grant), filling the review it asked for."""
    received = next((e for e in request if e.kind == "call.received"), None)
    requested = next((e for e in request if e.kind == "approval.requested"), None)
    granted = [e for e in request if e.kind == "approval.granted"]
    if received is None or requested is None or len(granted) != 1:
        return "its request's chain holds no single approval"
    p = received.payload
    if (p.get("principal"), p.get("on_behalf_of"), p.get("tool")) != (
            spec.get("principal"), spec.get("on_behalf_of"), spec.get("tool")):
        return "its request was another agent's or another tool's"
    approvers = list(spec.get("approvers") or ())
    if granted[0].payload.get("approvers") != approvers or \
            granted[0].payload.get("policy_digest") != spec.get("policy_digest"):
        return "its request's approval names other approvers or another policy"
    requester = {p.get("principal"), p.get("on_behalf_of")} - {None}
    agreed = []
    for vote in (e for e in request if e.kind == "vote" and e.seq < granted[0].seq):
        person, identity = vote.payload.get("person"), vote.payload.get("reviewer")
        if vote.payload.get("verdict") != "approve" or not isinstance(vote.payload.get("grant"), dict):
            return f"event {vote.seq} is not an approval agreeing to a grant"
        if directory.person(str(identity)) != person or person in requester or identity in requester:
            return f"event {vote.seq}: {identity} is not a reviewer who may approve this request"
        agreed.append(str(person))
    review = requested.payload.get("review")
    if agreed != approvers or not isinstance(review, dict) or \
            not quorum_met(ReviewSpec.model_validate(review), agreed, directory):
        return "its request's votes do not make this grant"
    return None


async def use_grant(ledger: Store, row: Row, call: ToolCall, redacted: dict[str, Any], decision: Decision,
                    holder: str, directory: ReviewerDirectory) -> UsedGrant | None:
    """Take one use of the grant `row` for `call` and record the call as running under it, in one transaction;
    None when the grant is no longer usable (ended, raced for its last use, its row and chain disagree, or the chain
    of the request it came from does not prove it)."""
    grant_id = row["id"]
    request, broken = await ledger.call_chain(str(_spec(row).get("request_id")))
    if broken is not None or (problem := grant_problem(_spec(row), request, directory)) is not None:
        log.error("grant %s is not used: %s", grant_id, broken or problem)
        return None

    def body(tx: Tx) -> UsedGrant | None:
        now_row = tx.grant_row(grant_id)
        if now_row is None or now_row["spec"] != row["spec"]:
            return None
        if (problem := _chain_problem(tx, now_row)) is not None:
            log.error("grant %s is not used: %s", grant_id, problem)
            return None
        if not tx.use_grant(grant_id):
            return None
        spec = _spec(now_row)
        use = int(now_row["used"]) + 1
        rules = rules_payload(decision)
        tx.insert_call(call.call_id, {
            "tool": call.tool, "principal": call.principal, "on_behalf_of": call.on_behalf_of, "model": call.model,
            "args_hash": call.args_hash, "arguments": canonical_json(redacted), "state": "running",
            "risk": decision.risk, "reason": decision.reason, "rules": canonical_json(rules),
            "review": decision.review.model_dump_json() if decision.review else None,
            "policy_digest": decision.policy_digest, "expires": None, "holder": holder, "outcome_reason": None,
        })
        tx.append("call.received", call.call_id, received_payload(call, redacted))
        tx.append("decision", call.call_id, decision_payload(decision, rules))
        tx.append("grant.used", grant_id, {"call_id": call.call_id, "principal": call.principal, "tool": call.tool,
                                           "args_hash": call.args_hash, "use": use, "uses": now_row["uses"]})
        tx.append("execution.started", call.call_id, {
            "holder": holder, "args_hash": call.args_hash,
            "grant": {"id": grant_id, "request_id": spec.get("request_id"), "approvers": spec.get("approvers"),
                      "use": use, "uses": now_row["uses"]}})
        if use >= int(now_row["uses"]) and tx.end_grant(grant_id, "expired", "its uses ran out"):
            tx.append("grant.expired", grant_id, {"reason": "its uses ran out", "used": use})
        return UsedGrant(id=grant_id, request_id=str(spec.get("request_id")),
                         approvers=tuple(spec.get("approvers") or ()), use=use, uses=int(now_row["uses"]),
                         expires=float(now_row["expires"]))

    result: UsedGrant | None = await ledger.transaction(body)
    return result


def grant_note(result: types.CallToolResult, used: UsedGrant) -> types.CallToolResult:
    """`result` with a first text block saying that it ran under a standing grant, and the grant in `_meta`."""
    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(used.expires))
    note = (f"keyturn: this call ran without waiting for a reviewer, under standing grant {used.id} (approved by "
            f"{', '.join(used.approvers)} on request {used.request_id}; use {used.use} of {used.uses}, until {until}).")
    meta = dict(result.meta or {})
    meta[GRANT_META_KEY] = {"grant": used.id, "request_id": used.request_id, "approvers": list(used.approvers),
                            "use": used.use, "uses": used.uses, "expires": used.expires}
    return result.model_copy(update={"content": [types.TextContent(type="text", text=note), *result.content],
                                     "meta": meta})


# -- ending grants -----------------------------------------------------------------------------------------


async def revoke(ledger: Store, grant_id: str, *, person: str, reviewer: str, reason: str,
                 channel: str) -> GrantRefused | None:
    """End a live grant now, chained as `grant.revoked` (who, why); or why not."""

    def body(tx: Tx) -> GrantRefused | None:
        row = tx.grant_row(grant_id)
        if row is None:
            return GrantRefused("unknown", f"no grant {grant_id}")
        if not tx.end_grant(grant_id, "revoked", reason):
            return GrantRefused("not_live", f"grant {grant_id} is {row['state']}, not live")
        tx.append("grant.revoked", grant_id, {"person": person, "reviewer": reviewer, "reason": reason,
                                              "channel": channel, "used": row["used"]})
        return None

    refused: GrantRefused | None = await ledger.transaction(body)
    return refused


async def expire_due(ledger: Store, now: float | None = None) -> int:
    """End, chained as `grant.expired`, every live grant whose time has passed or whose uses ran out (the
    housekeeping's round); how many."""
    now = time.time() if now is None else now
    count = 0
    for grant_id in await ledger.grants_due(now, EXPIRE_BATCH):
        def body(tx: Tx, grant_id: str = grant_id) -> bool:
            row = tx.grant_row(grant_id)
            if row is None:
                return False
            reason = "its uses ran out" if row["used"] >= row["uses"] else "its time passed"
            if not tx.end_grant(grant_id, "expired", reason):
                return False
            tx.append("grant.expired", grant_id, {"reason": reason, "used": row["used"]})
            return True

        try:
            if await ledger.transaction(body):
                count += 1
        except LedgerError as e:
            log.warning("could not expire grant %s: %s", grant_id, e)
    return count


def grant_json(row: Row) -> dict[str, Any]:
    """A grant as the API and the CLI show it."""
    spec = _spec(row)
    return {"id": row["id"], "state": row["state"], "request_id": row["request_id"], "principal": row["principal"],
            "on_behalf_of": row["on_behalf_of"], "tool": row["tool"], "rules": spec.get("rules"),
            "conditions": spec.get("conditions"), "when": " && ".join(f"({c})" for c in spec.get("conditions") or []),
            "approvers": spec.get("approvers"), "created_by": spec.get("created_by"), "reason": spec.get("reason"),
            "created": row["created"], "expires": row["expires"], "uses": row["uses"], "used": row["used"],
            "ended": row["ended"], "end_reason": row["end_reason"]}
