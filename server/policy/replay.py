"""Replay: what would a candidate policy have decided for calls that were already decided?

A pure function over (call, facts, previous outcome) triples; the caller reads them from the
ledger. Facts are taken as recorded (the ledger only holds redacted arguments, so classifying
again could see less than the original decision did).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from server.config import Settings
from server.errors import KeyturnError, PolicyError
from server.models import OUTCOME_ORDER, ToolCall
from server.policy.engine import CompiledPolicy
from server.policy.loader import PolicyErrors, load_policy

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
    lines = [
        f"{total} call(s) replayed: {len(changes)} would change ({looser} looser, {len(changes) - looser} stricter)"
    ]
    for c in changes:
        lines.append(
            f"  {c['call_id']}  {c['tool']}  {c['before']} -> {c['after']}  [{', '.join(c['rules'])}] {c['reason']}"
        )
    return "\n".join(lines)


async def cmd_replay(path: Path, settings: Settings, limit: int = 10_000, *, out: TextIO | None = None) -> int:
    """`keyturn policy replay FILE`: the last `limit` decided calls in the ledger, re-decided under FILE."""
    from server.ledger.opening import store_for  # only this command needs the store

    out = out or sys.stdout
    try:
        policy = load_policy(path, groups=settings.groups, people=set(settings.people))
    except PolicyError as e:
        for p in e.problems if isinstance(e, PolicyErrors) else (e,):
            print(f"error: {p}", file=sys.stderr)
        return 1
    items: deque[ReplayItem] = deque(maxlen=max(1, limit))
    received: dict[str, dict[str, Any]] = {}
    try:
        ledger = store_for(settings)
        await ledger.open()
    except KeyturnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        after = 0
        while True:
            batch = await ledger.events(after_seq=after, limit=1000)
            if not batch:
                break
            for event in batch:
                after = event.seq
                if event.call_id is None:
                    continue
                if event.kind == "call.received":
                    received[event.call_id] = event.payload
                elif event.kind == "decision" and event.call_id in received:
                    item = recorded_item(event.call_id, received.pop(event.call_id), event.payload)
                    if item is not None:
                        items.append(item)
    finally:
        await ledger.close()
    print(summarise(replay(policy, items), len(items)), file=out)
    return 0


def recorded_item(call_id: str, received: Mapping[str, Any], decision: Mapping[str, Any]) -> ReplayItem | None:
    """A (call, facts, outcome) triple from a call's `call.received` and `decision` ledger payloads."""
    try:
        call = ToolCall(
            call_id=call_id,
            tool=received["tool"],
            arguments=dict(received.get("arguments") or {}),  # redacted: conditions on args see «redacted»
            args_hash=received.get("args_hash", ""),
            principal=received.get("principal", ""),
            on_behalf_of=received.get("on_behalf_of"),
            model=received.get("model"),
            client=received.get("client"),
            session=received.get("session"),
        )
    except (KeyError, TypeError, ValidationError):
        return None
    return call, dict(decision.get("facts") or {}), str(decision.get("outcome", ""))
