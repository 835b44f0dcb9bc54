"""The compiled policy: which rules can see a call, what they say, and one decision out of many verdicts.

Semantics, in one place:
- every rule whose tool/principal/model globs match and whose condition is true *matches*;
- the most restrictive outcome among matches wins (deny > review > allow); risk is the highest;
- several review rules combine: all their approver groups (AND), and the timeout of the rule that sets the highest
  bar (the highest risk, then the most approvals needed; on a tie the shorter timeout): see `highest_bar`;
- no match: the policy's default outcome and risk;
- a condition that errors fails closed: a deny/review rule counts as matched ("condition error"),
  an allow rule counts as not matched; either way the error is in the decision's facts;
- keyturn's built-in guards (`guards.py`) come first: a call that acts on keyturn itself, or whose arguments
  could not be classified, is denied before any rule is read, and the decision names the guard;
- annotations may raise risk, never lower it: a call no rule matches, of a tool that declares itself
  destructive, is at least high (a matched rule's risk is the policy's own, more precise, word).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cel

from server.classify import Redaction, normalise_annotations
from server.classify.impact import describe_impact
from server.models import (
    OUTCOME_ORDER,
    RISK_ORDER,
    ApproverGroup,
    Decision,
    Escalation,
    MatchedRule,
    Outcome,
    ReviewSpec,
    RiskLevel,
    ToolCall,
)
from server.policy.conditions import FACT_SHAPE, Condition, Template
from server.policy.guards import builtin_guard

_GLOB_CHARS = frozenset("*?[")
_CACHE_LIMIT = 4096
_ANY = ("*",)


@dataclass(frozen=True)
class CompiledRule:
    index: int
    id: str
    line: int | None
    tools: tuple[str, ...]
    principals: tuple[str, ...]
    models: tuple[str, ...]
    condition: Condition | None
    outcome: Outcome
    risk: RiskLevel
    reason: Template
    review: ReviewSpec | None  # resolved against the policy's defaults; only for outcome review
    enabled: bool = True
    grants: bool = False  # a reviewer may turn an approval under it into a standing grant (review rules only)

    def matches_tool(self, tool: str) -> bool:
        return any(fnmatch.fnmatchcase(tool, g) for g in self.tools)

    def who_mismatch(self, principal: str, model: str) -> str | None:
        """Why the principal/model globs exclude this call, or None when they match."""
        if self.principals == _ANY and self.models == _ANY:
            return None
        if not _any_glob(principal, self.principals):
            return f"principal {principal!r} does not match {list(self.principals)}"
        if not _any_glob(model, self.models):
            return f"model {model or '(none)'!r} does not match {list(self.models)}"
        return None


def _any_glob(value: str, globs: tuple[str, ...]) -> bool:
    return any(g == "*" or fnmatch.fnmatchcase(value, g) for g in globs)


@dataclass(frozen=True)
class GrantLimits:
    """The policy's bounds on every standing grant (`review: {grants: {max_for, max_uses}}`)."""

    max_for_s: float = 8 * 3600.0
    max_uses: int = 100


DEFAULT_GRANT_LIMITS = GrantLimits()


@dataclass
class _Match:
    rule: CompiledRule
    reason: str
    error: str | None = None


class CompiledPolicy:
    """A loaded, validated policy. Immutable; `decide` is safe to call from any task."""

    def __init__(
        self,
        *,
        rules: tuple[CompiledRule, ...],
        default_outcome: Outcome,
        default_risk: RiskLevel,
        default_review: ReviewSpec,
        variables: Mapping[str, Any],
        digest: str,
        path: Path | None,
        source: str = "<string>",
        grant_limits: GrantLimits | None = DEFAULT_GRANT_LIMITS,
    ) -> None:
        self.rules = rules
        self.grant_limits = grant_limits
        """The bounds on standing grants; None: this policy forbids them."""
        self.default_outcome: Outcome = default_outcome
        self.default_risk: RiskLevel = default_risk
        self.default_review = default_review
        self.vars = dict(variables)
        self.digest = digest
        self.path = path
        self.source = source
        self._exact: dict[str, list[CompiledRule]] = {}
        self._globbed: list[CompiledRule] = []
        for rule in rules:
            if not rule.enabled:
                continue
            if any(_GLOB_CHARS & set(g) for g in rule.tools):
                self._globbed.append(rule)
            else:
                for tool in rule.tools:
                    self._exact.setdefault(tool, []).append(rule)
        self._cache: dict[str, tuple[CompiledRule, ...]] = {}
        self.warnings: tuple[str, ...] = tuple(
            f"rule {r.id!r} (line {r.line}): unknown function {name!r}: the condition will fail (closed) at call time"
            for r in rules
            if r.condition is not None
            for name in r.condition.unknown_functions
        )

    def __repr__(self) -> str:
        return f"CompiledPolicy({self.source!r}, rules={len(self.rules)}, digest={self.digest[:12]})"

    def reviews(self) -> list[tuple[str, ReviewSpec]]:
        """(rule id, review) of every enabled review rule, and ("default", review) when the default is review."""
        out = [(r.id, r.review or self.default_review) for r in self.rules if r.enabled and r.outcome == "review"]
        return out + ([("default", self.default_review)] if self.default_outcome == "review" else [])

    def grant_refusal(self, decision: Decision) -> str | None:
        """Why a reviewer may not turn an approval of a call decided as `decision` into a standing grant, or None.
        Every review rule that carried the decision must allow grants (`grants:`, by default every risk but
        critical); a call no rule matched follows the policy's default risk."""
        if self.grant_limits is None:
            return "this policy forbids standing grants (review: {grants: false})"
        if decision.outcome != "review" or decision.policy_digest != self.digest:
            return "only a held call under the policy in force can become a grant"
        if decision.facts.get("condition_errors"):
            return "a rule's condition failed on this call, so it cannot become a grant"
        by_id = {r.id: r for r in self.rules}
        winning = [r.id for r in decision.rules if r.outcome == "review"]
        if not winning:
            if self.default_risk == "critical" or decision.risk == "critical":
                return "critical calls cannot become grants"
            return None
        for rule_id in winning:
            rule = by_id.get(rule_id)
            if rule is None or not rule.grants:
                return f"rule {rule_id!r} forbids standing grants" + (
                    " (grants: false; the default for critical risk)" if rule is not None else "")
        return None

    def candidates(self, tool: str) -> tuple[CompiledRule, ...]:
        """The enabled rules whose tool globs match `tool`, in file order (cached per tool name)."""
        hit = self._cache.get(tool)
        if hit is None:
            found = {r.index: r for r in self._exact.get(tool, ())}
            found.update((r.index, r) for r in self._globbed if r.matches_tool(tool))
            hit = tuple(found[i] for i in sorted(found))
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[tool] = hit
        return hit

    def decide(self, call: ToolCall, facts: Mapping[str, Any], *, now: datetime | None = None,
               redaction: Redaction | None = None) -> Decision:
        """`redaction`: the call's own (the gate's). Reasons that quote the arguments see them redacted (without
        one, a redaction is made here when a reason needs it); with one, the secrets it found are masked wherever the
        decision's reasons and facts quote them (they go to chat and the ledger)."""
        decision = self._evaluate(call, facts, now, None, redaction)
        return decision if redaction is None or not redaction.values else masked(decision, redaction)

    def explain(self, call: ToolCall, facts: Mapping[str, Any], *, now: datetime | None = None) -> dict[str, Any]:
        """The decision plus a trace: every rule in the policy, whether it matched, and why."""
        trace: dict[int, dict[str, Any]] = {}
        redaction = Redaction.of(call.arguments, complete_facts(facts))
        decision = self._evaluate(call, facts, now, trace, redaction)
        candidates = {r.index for r in self.candidates(call.tool)}
        rules = []
        for rule in self.rules:
            entry: dict[str, Any] = {"id": rule.id, "line": rule.line, "outcome": rule.outcome, "risk": rule.risk}
            if not rule.enabled:
                entry.update(considered=False, matched=False, why="rule is disabled")
            elif rule.index not in candidates:
                entry.update(
                    considered=False, matched=False, why=f"tool {call.tool!r} does not match {list(rule.tools)}"
                )
            else:
                entry.update(trace.get(rule.index, {"considered": False, "matched": False, "why": "not evaluated"}))
            if rule.condition is not None:
                entry["when"] = rule.condition.source
            rules.append(entry)
        return {
            "policy": {"digest": self.digest, "path": str(self.path) if self.path else self.source},
            "call": {
                "tool": call.tool,
                "principal": call.principal,
                "model": call.model,
                "arguments": redaction.arguments,
            },
            "facts": decision.facts,
            "builtin_guard": next((r.id for r in decision.rules if r.id.startswith("keyturn:")), None),
            "rules": rules,
            "decision": decision.model_dump(mode="json", exclude={"facts"}),
            "timeout": self._timeout_source(decision),
        }

    def _timeout_source(self, decision: Decision) -> dict[str, Any] | None:
        """Which rule's timeout a review has, and why (see `highest_bar`)."""
        if decision.review is None:
            return None
        by_id = {r.id: r for r in self.rules}
        held = [by_id[m.id] for m in decision.rules if m.outcome == "review" and m.id in by_id]
        timeout = decision.review.timeout_s
        if not held:
            return {"rule": None, "timeout_s": timeout, "why": "no rule matched: the policy's default review applies"}
        specs = [r.review or self.default_review for r in held]
        bar = held[highest_bar([r.risk for r in held], specs)]
        if len(held) == 1:
            return {"rule": bar.id, "timeout_s": timeout, "why": f"the only rule that asked for a review ({bar.id})"}
        others = ", ".join(f"{r.id} {s.timeout_s:g}s" for r, s in zip(held, specs, strict=True) if r is not bar)
        needed = approvals_needed(bar.review or self.default_review)
        return {"rule": bar.id, "timeout_s": timeout,
                "why": f"{bar.id} sets the highest bar of the {len(held)} review rules that matched (risk {bar.risk}, "
                       f"{needed} approval(s)); its own timeout applies (the others: {others})"}

    # -- evaluation -------------------------------------------------------------------------

    def _evaluate(
        self, call: ToolCall, facts: Mapping[str, Any], now: datetime | None, trace: dict[int, dict[str, Any]] | None,
        redaction: Redaction | None = None,
    ) -> Decision:
        now = now or datetime.now(UTC)
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        full = complete_facts(facts)
        guard = builtin_guard(full)
        if guard is not None:  # before any rule: no policy file can drop it
            if trace is not None:
                for rule in self.rules:
                    trace[rule.index] = {"considered": False, "matched": False,
                                         "why": f"not evaluated: keyturn's built-in guard {guard.id!r} refused first"}
            return Decision(outcome="deny", risk=guard.risk, reason=guard.reason, rules=(guard,),
                            policy_digest=self.digest, facts=full)
        model = call.model or ""
        live: list[CompiledRule] = []
        for rule in self.candidates(call.tool):
            why = rule.who_mismatch(call.principal, model)
            if why is None:
                live.append(rule)
            elif trace is not None:
                trace[rule.index] = {"considered": True, "matched": False, "why": why}
        if redaction is None and any(p.startswith("args") for r in live for p in r.reason.paths):
            redaction = Redaction.of(call.arguments, full)  # once per call, for every reason that quotes arguments
        activation = self._activation(call, full, now, live)
        context = None
        if activation is not None:
            functions = {n: f for r in live if r.condition is not None for n, f in r.condition.functions}
            context = cel.Context(variables=activation, functions=functions)
        matches: list[_Match] = []
        errors: list[dict[str, str]] = []
        for rule in live:
            result: Any = True
            error: str | None = None
            if rule.condition is not None:
                try:
                    result = rule.condition.evaluate(context)
                except Exception as e:  # CEL raises KeyError/TypeError/RuntimeError/ValueError at call time
                    error = _error_text(e)
                else:
                    if not isinstance(result, bool):
                        error = f"condition returned {type(result).__name__}, not a bool"
            if error is not None:
                errors.append({"rule": rule.id, "error": error})
                if rule.outcome == "allow":
                    _note(trace, rule, False, f"condition error: {error} (an allow rule that errors does not apply)")
                    continue
                matches.append(_Match(rule, f"condition error: {error}", error))
                _note(trace, rule, True, f"condition error: {error} (fails closed: counts as matched)")
            elif result:
                matches.append(_Match(rule, self._reason(rule, call, full, now, redaction)))
                _note(trace, rule, True, "condition true" if rule.condition else "no condition: matches every call")
            else:
                _note(trace, rule, False, "condition false")
        if errors:
            full = {**full, "condition_errors": errors}
        return self._combine(matches, full)

    def _activation(
        self, call: ToolCall, facts: dict[str, Any], now: datetime, live: list[CompiledRule]
    ) -> dict[str, Any] | None:
        """Only the values the live rules read: converting values into CEL is the expensive part."""
        slots: dict[str, tuple[str, ...]] = {}
        conditions = False
        for rule in live:
            if rule.condition is not None:
                conditions = True
                slots.update(rule.condition.slots)
        if not conditions:
            return None
        full = _full_activation(call, facts, now, self.vars)
        out: dict[str, Any] = {}
        for name, path in slots.items():
            value: Any = full
            for part in path:
                value = value[part]
            out[name] = value
        return out

    def _reason(
        self, rule: CompiledRule, call: ToolCall, facts: dict[str, Any], now: datetime, redaction: Redaction | None,
    ) -> str:
        if not rule.reason.paths:
            return rule.reason.source
        activation = _full_activation(call, facts, now, self.vars)
        if any(p.startswith("args") for p in rule.reason.paths):  # reasons go to chat and the ledger
            activation["args"] = (redaction or Redaction.of(call.arguments, facts)).arguments
        return rule.reason.render(activation)

    def _combine(self, matches: list[_Match], facts: dict[str, Any]) -> Decision:
        matched = tuple(
            MatchedRule(id=m.rule.id, outcome=m.rule.outcome, risk=m.rule.risk, reason=m.reason) for m in matches
        )
        if matches:
            outcome: Outcome = max((m.rule.outcome for m in matches), key=OUTCOME_ORDER.__getitem__)
            risk: RiskLevel = max((m.rule.risk for m in matches), key=RISK_ORDER.__getitem__)
            winners = [m for m in matches if m.rule.outcome == outcome]
            reason = "; ".join(dict.fromkeys(m.reason for m in winners))
            specs = [m.rule.review or self.default_review for m in winners]
            risks = [m.rule.risk for m in winners]
        else:
            outcome, risk = self.default_outcome, self.default_risk
            reason = f"no rule matched: the policy default is {outcome}"
            specs = [self.default_review]
            risks = [risk]
            if facts.get("annotations", {}).get("destructive") is True and RISK_ORDER[risk] < RISK_ORDER["high"]:
                # No rule speaks for this call: the tool's own word that it is destructive raises the default.
                risk = "high"
        return Decision(
            outcome=outcome,
            risk=risk,
            reason=reason,
            rules=matched,
            review=combine_reviews(specs, risks).model_copy(update={"impact": describe_impact(facts)})
            if outcome == "review" else None,
            policy_digest=self.digest,
            facts=facts,
        )


def masked(decision: Decision, redaction: Redaction) -> Decision:
    """`decision` with the call's secrets masked in the text that can quote arguments: reasons and facts. What the
    policy itself says (outcome, risk, rule ids, review, digest) is kept as it is, whatever a short secret matches."""
    review = decision.review
    if review is not None and review.impact:  # the impact line can quote a database's error about the arguments
        review = review.model_copy(update={"impact": redaction.scrub(review.impact)})
    return decision.model_copy(update={
        "review": review,
        "reason": redaction.scrub(decision.reason),
        "rules": tuple(r.model_copy(update={"reason": redaction.scrub(r.reason)}) for r in decision.rules),
        "facts": redaction.scrub(decision.facts),
    })


def complete_facts(facts: Mapping[str, Any]) -> dict[str, Any]:
    """`facts` with every family present (given values win over the defaults, one level deep)."""
    out: dict[str, Any] = {}
    for key, default in FACT_SHAPE.items():
        given = facts.get(key, default)
        if given is not default and type(default) is dict and isinstance(given, (dict, Mapping)):
            out[key] = {**default, **given}
        else:
            out[key] = given
    for key, value in facts.items():
        if key not in out:
            out[key] = value
    return out


def compact_facts(facts: Mapping[str, Any]) -> dict[str, Any]:
    """`facts` less what equals the defaults (one level deep, type included): what the ledger records.
    `complete_facts(compact_facts(f)) == complete_facts(f)`, so a replay decides on exactly the same facts."""
    out: dict[str, Any] = {}
    for key, value in facts.items():
        default = FACT_SHAPE.get(key, _NO_DEFAULT)
        if default is _NO_DEFAULT:
            out[key] = value
        elif value == default and _same_types(key, value, default):  # the common case: a family with nothing to say
            continue
        elif type(default) is dict and isinstance(value, Mapping):
            differs = {k: v for k, v in value.items() if k not in default or not _same(v, default[k])}
            if differs:
                out[key] = differs
        elif not _same(value, default):
            out[key] = value
    return out


_NO_DEFAULT: Any = object()


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _same_types(key: str, value: Any, default: Any) -> bool:
    """Equal values (`value == default`) that are also alike in type, one level deep (`True == 1` in Python)."""
    if type(value) is not type(default):
        return False
    if type(default) is dict:
        if tuple(map(type, value.values())) == _SHAPE_TYPES[key]:  # (the keys in the defaults' order: one C pass)
            return True
        return all(type(v) is type(default[k]) for k, v in value.items())
    return True


_SHAPE_TYPES = {k: tuple(map(type, d.values())) for k, d in FACT_SHAPE.items() if type(d) is dict}


def _full_activation(
    call: ToolCall, facts: dict[str, Any], now: datetime, variables: Mapping[str, Any]
) -> dict[str, Any]:
    annotations = facts.get("annotations")
    return {
        "tool": call.tool,
        "args": call.arguments,
        "facts": facts,
        "principal": call.principal,
        "model": call.model or "",
        "on_behalf_of": call.on_behalf_of or "",
        "client": call.client or "",
        "session": call.session or "",
        "annotations": annotations if isinstance(annotations, Mapping) else normalise_annotations(call.annotations),
        "time": now,
        "vars": variables,
    }


def approvals_needed(spec: ReviewSpec) -> int:
    """Distinct approvals `spec` needs at least: the groups of one requirement add up; requirements overlap."""
    totals: dict[str, int] = {}
    for g in spec.groups:
        totals[g.requirement] = totals.get(g.requirement, 0) + max(1, g.quorum)
    return max(totals.values(), default=0)


def highest_bar(risks: Sequence[RiskLevel], specs: Sequence[ReviewSpec]) -> int:
    """The index of the review that sets the highest bar: the highest risk, then the most distinct approvals
    needed; on a tie, the shorter timeout (then the first in file order). Its own timeout is the combined review's:
    the strictest rule keeps the time its author gave its reviewers, and a request that times out is refused."""
    return min(range(len(specs)), key=lambda i: (-RISK_ORDER[risks[i]], -approvals_needed(specs[i]),
                                                 specs[i].timeout_s, i))


def combine_reviews(specs: list[ReviewSpec], risks: Sequence[RiskLevel] | None = None) -> ReviewSpec:
    """Several review rules at once: every rule's approver groups must be satisfied (AND; each rule is a
    separate `requirement`, so one person may count toward each), the timeout of the rule that sets the highest
    bar (`highest_bar`; without `risks`, by approvals needed alone), a reason if any asks for one, every channel and
    escalation."""
    if len(specs) == 1:
        return specs[0]
    # Each rule's approver groups stay one requirement of their own: every requirement must be met
    # (AND across rules), and within one requirement distinct people fill the slots.
    groups: dict[tuple[str, str, tuple[str, ...]], ApproverGroup] = {}
    for i, spec in enumerate(specs):
        for g in spec.groups:
            labelled = g.model_copy(update={"requirement": g.requirement or f"r{i}"})
            groups[(labelled.requirement, g.name, g.members)] = labelled
    escalations: dict[tuple[float, tuple[str, ...], tuple[str, ...]], Escalation] = {}
    for spec in specs:
        for e in spec.escalation:
            escalations.setdefault((e.after_s, e.notify, e.channels), e)
    bar = highest_bar(risks if risks is not None else ["low"] * len(specs), specs)
    return ReviewSpec(
        groups=tuple(groups.values()),
        timeout_s=specs[bar].timeout_s,
        require_reason=any(s.require_reason for s in specs),
        channels=tuple(dict.fromkeys(c for s in specs for c in s.channels)),
        escalation=tuple(escalations[k] for k in sorted(escalations)),
    )


def _note(trace: dict[int, dict[str, Any]] | None, rule: CompiledRule, matched: bool, why: str) -> None:
    if trace is not None:
        trace[rule.index] = {"considered": True, "matched": matched, "why": why}


def _error_text(e: Exception) -> str:
    if isinstance(e, KeyError):
        return f"no such key {e.args[0]!r}" if e.args else "no such key"
    text = str(e).split(". CEL does not coerce")[0]
    return f"{type(e).__name__}: {text}"[:300]
