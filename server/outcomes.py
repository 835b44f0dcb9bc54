"""Every way a call ends, in one table: the terminal ledger event, the call's final state and the states it may end
from. The agent is told the ledger's word (the `outcome` of its error result is the terminal event's kind), and who
ended it (`by`: policy, reviewer, keyturn) and why (`code`, `reason`) as the ledger's payload says: one vocabulary.
A call keyturn denies before any policy decision (arguments not valid for the tool, a call the tool declares it
would refuse, a call keyturn could not judge) is `denied` by `keyturn`, with its `code` (`REFUSALS`).

`Ledger.finish(call_id, outcome, ...)` is the one writer of a terminal event: one conditional state change and
the event, in one transaction, so a call that already ended never ends again. What the agent reads of an end
(the error results below) is written here too, so every channel and transport says the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import mcp_types as types

from server.models import RequestView

OPEN_STATES = ("received", "allowed", "pending", "approved", "running")

OUTCOME_META_KEY = "io.keyturn/outcome"
"""Where an error result of keyturn's own carries its details for programs (`outcome`, `request_id`, `reason` ...):
the result's `_meta`. Never `structuredContent`, which a client checks against the tool's output schema even in an
error result."""


@dataclass(frozen=True)
class Outcome:
    name: str
    kind: str  # the terminal event written to the ledger
    state: str  # the call's state afterwards
    ends: tuple[str, ...]  # the states a call ends from this way

    @property
    def label(self) -> str:
        """What the agent is told it was (the `outcome` of its result): the ledger's word, so both say the same."""
        return self.kind


OUTCOMES: dict[str, Outcome] = {o.name: o for o in (
    Outcome("executed", "executed", "executed", ("allowed", "running")),
    Outcome("failed", "failed", "failed", ("allowed", "running")),
    Outcome("denied_by_policy", "denied", "denied", ("received",)),
    # a reviewer's denial: while pending, or, from a reviewer who approved, while approved and not yet claimed to run
    Outcome("denied_by_reviewer", "denied", "denied", ("pending", "approved")),
    # keyturn could not judge the call (a classifier or policy error): a denial, never a pass
    Outcome("refused", "denied", "denied", ("received",)),
    # the arguments could not be judged (not valid for the tool): denied before anything is decided or runs
    Outcome("invalid", "denied", "denied", ("received",)),
    # the tool declares it would refuse the call when run (`GuardedTool.refuses`): denied before the policy
    Outcome("refused_by_tool", "denied", "denied", ("received",)),
    # approved in the tables, not by the chain: nothing runs
    Outcome("unproven", "denied", "denied", ("approved", "pending")),
    Outcome("expired", "expired", "expired", ("pending", "approved")),
    Outcome("cancelled", "cancelled", "cancelled", ("pending", "approved")),
    Outcome("abandoned", "abandoned", "abandoned", OPEN_STATES),
)}

REFUSALS: dict[str, str] = {
    "invalid_arguments": "invalid",
    "tool_refuses": "refused_by_tool",
    "error": "refused",
}
"""The `code` of a call keyturn denies before any policy decision (in the ledger's payload and the agent's `_meta`)
-> its outcome above."""


# -- what the agent reads -----------------------------------------------------------------------------


def error_result(text: str, **meta: Any) -> types.CallToolResult:
    """A refusal or an end other than a result: `text` for the agent, `meta` (its `outcome`, ids, reasons) for
    programs, in `_meta` under `OUTCOME_META_KEY`. No structured content: the result is valid whatever output
    schema the tool declares."""
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)],
        is_error=True,
        _meta={OUTCOME_META_KEY: meta} if meta else None,
    )


def closed_result(view: RequestView) -> types.CallToolResult:
    """A held call that ended without running for this caller: denied, expired, cancelled, already run ..."""
    if view.state == "denied":
        deny = next((v for v in reversed(view.votes) if v["verdict"] == "deny"), None)
        if deny is None:  # keyturn ended it (its policy changed, its approval was not proven ...): nobody voted no
            return error_result(f"Denied by keyturn: {view.outcome_reason or 'no reason recorded'}",
                                outcome=OUTCOMES["denied_by_reviewer"].label, by="keyturn", request_id=view.id,
                                reason=view.outcome_reason)
        return error_result(f"Denied by reviewer {deny['person']}: {deny['reason']}",
                            outcome=OUTCOMES["denied_by_reviewer"].label, by="reviewer", request_id=view.id,
                            reviewer=deny["person"], reason=deny["reason"])
    if view.state == "expired":
        return error_result(f"Request {view.id} expired: no reviewer decided in time; it did not run.",
                            outcome=OUTCOMES["expired"].label, request_id=view.id)
    if view.state == "executed":
        return error_result(f"Request {view.id} was already run once; an approval runs exactly once. "
                            "Call again to ask for a new approval.", outcome="already_executed", request_id=view.id)
    return error_result(f"Request {view.id} is {view.state}: {view.outcome_reason or ''}".strip(),
                        outcome=view.state, request_id=view.id)


def left_result(request_id: str) -> types.CallToolResult:
    """For a caller that is gone (nobody receives it; it says what the ledger says)."""
    return error_result(f"Request {request_id} is still open: call again with the same arguments to rejoin it.",
                        outcome="left", request_id=request_id)


def ran_before_result(request_id: str, kind: str, ran_at: float, reason: str | None) -> types.CallToolResult:
    """A retry of a held call that ran, whose result is not kept: when it ran and how it ended."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ran_at))
    how = "and failed" + (f": {reason}" if reason else "") if kind == "failed" else ""
    return error_result(
        f"Request {request_id} was approved and ran at {when} {how}".rstrip() + ". Its result is not kept "
        "(it may carry a secret, or its time has passed); it was not run again.",
        outcome="already_executed" if kind == "executed" else OUTCOMES["failed"].label, request_id=request_id,
        ran_at=ran_at)


def unrecorded_result(call_id: str, error: str) -> types.CallToolResult:
    """The tool ran and the ledger could not take its outcome: the result is withheld until it can."""
    return error_result(
        f"The tool ran, but keyturn could not record its outcome ({error}), so its result is withheld. "
        "Do not repeat the call: it has run. keyturn records the outcome as soon as its ledger is writable again.",
        outcome="unrecorded", call_id=call_id)
