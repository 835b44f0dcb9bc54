"""What the ledger keeps of a call when it is opened: who asked for what (`call.received`, with the arguments
redacted) and what policy decided (`decision`), written in one transaction with the call's row."""

from __future__ import annotations

from typing import Any

from server.ledger import Store
from server.models import Decision, ToolCall
from server.policy.engine import compact_facts

UNCLASSIFIED = {"«unclassified»": True}
"""What is stored of arguments that could not be judged (only their hash is kept)."""


def rules_payload(decision: Decision) -> list[dict[str, Any]]:
    return [{"id": r.id, "outcome": r.outcome, "risk": r.risk, "reason": r.reason} for r in decision.rules]


def describe_rules(decision: Decision) -> str:
    """The rules that carried the decision (the most restrictive outcome), with their reasons."""
    winning = [r for r in decision.rules if r.outcome == decision.outcome]
    return "; ".join(f"rule {r.id!r}: {r.reason}" for r in winning) or decision.reason


def decision_payload(decision: Decision, rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "outcome": decision.outcome, "risk": decision.risk, "reason": decision.reason,
        "rules": rules if rules is not None else rules_payload(decision), "policy_digest": decision.policy_digest,
        "facts": compact_facts(decision.facts),  # only what differs from the defaults: a replay restores them
        "review": decision.review.model_dump() if decision.review else None,
    }


def impact_record(facts: dict[str, Any], actual_rows: int | None) -> dict[str, Any]:
    """What the ledger's terminal event keeps of a run's impact: the rows the tool reported it changed beside the
    estimate the decision was made on, and whether they differ ({} when neither is known)."""
    found = facts.get("sql")
    sql: dict[str, Any] = found if isinstance(found, dict) else {}
    estimated = sql.get("rows_affected") if sql.get("impact") == "measured" else None
    if actual_rows is None and not sql.get("impact"):
        return {}
    return {"impact": {
        "estimated_rows": estimated, "actual_rows": actual_rows, "table": sql.get("impact_table") or None,
        "differs": estimated is not None and actual_rows is not None and estimated != actual_rows,
    }}


def received_payload(call: ToolCall, redacted: dict[str, Any]) -> dict[str, Any]:
    return {
        "tool": call.tool, "arguments": redacted, "args_hash": call.args_hash, "principal": call.principal,
        "on_behalf_of": call.on_behalf_of, "model": call.model, "client": call.client, "session": call.session,
    }


async def open_call(
    ledger: Store, call: ToolCall, redacted: dict[str, Any], decision: Decision | None, *, state: str, holder: str,
    extra: list[tuple[str, dict[str, Any]]] | None = None, expires: float | None = None,
    finish: tuple[str, dict[str, Any]] | None = None, outcome_reason: str | None = None,
) -> None:
    """Record a call: its row, `call.received`, the `decision` (when there is one), `extra` events, and its end
    (`finish`: an outcome name of `server.outcomes` and its payload) when it ends at once."""
    rules = rules_payload(decision) if decision is not None else None
    decided = [("decision", decision_payload(decision, rules))] if decision is not None else []
    await ledger.open_call(
        call_id=call.call_id, tool=call.tool, principal=call.principal, on_behalf_of=call.on_behalf_of,
        model=call.model, args_hash=call.args_hash, redacted_arguments=redacted, state=state, holder=holder,
        risk=decision.risk if decision else None, reason=decision.reason if decision else None, rules=rules,
        review=decision.review if decision else None, policy_digest=decision.policy_digest if decision else None,
        expires=expires, outcome_reason=outcome_reason, finish=finish,
        events=[("call.received", received_payload(call, redacted)), *decided, *(extra or [])],
    )
