"""Replay: what would a candidate policy have decided for calls that were already decided?

A pure function over (call, facts, previous outcome) triples; the caller reads them from the
ledger. Facts are taken as recorded (the ledger only holds redacted arguments, so classifying
again could see less than the original decision did).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from server.models import OUTCOME_ORDER, ToolCall
from server.policy.engine import CompiledPolicy

ReplayItem = tuple[ToolCall, Mapping[str, Any], str]


def replay(policy: CompiledPolicy, calls: Iterable[ReplayItem]) -> list[dict[str, Any]]:
    """One change dict for every call whose outcome would differ under `policy`.

    Each dict: call_id, tool, principal, before, after, direction ("stricter" | "looser"),
    risk, rules (matched ids) and reason.
    """
    changes: list[dict[str, Any]] = []
    for call, facts, previous in calls:
        decision = policy.decide(call, facts)
        if decision.outcome == previous:
            continue
        stricter = OUTCOME_ORDER.get(decision.outcome, 2) > OUTCOME_ORDER.get(previous, -1)
        changes.append(
            {
                "call_id": call.call_id,
                "tool": call.tool,
                "principal": call.principal,
                "before": previous,
                "after": decision.outcome,
                "direction": "stricter" if stricter else "looser",
                "risk": decision.risk,
                "rules": [r.id for r in decision.rules],
                "reason": decision.reason,
            }
        )
    return changes


def summarise(changes: list[dict[str, Any]], total: int) -> str:
    """A short report: how many calls would change, and which way."""
    looser = sum(1 for c in changes if c["direction"] == "looser")
    lines = [f"{total} call(s) replayed: {len(changes)} would change ({looser} looser, {len(changes) - looser} stricter)"]
    for c in changes:
        lines.append(f"  {c['call_id']}  {c['tool']}  {c['before']} -> {c['after']}  [{', '.join(c['rules'])}] {c['reason']}")
    return "\n".join(lines)
