"""Every way a call ends, in one table: the terminal ledger event, the call's final state, the states it may end
from, and how the end reads to the agent (the `outcome` of its error result).

`Ledger.finish(call_id, outcome, ...)` is the one writer of a terminal event: one conditional state change and
the event, in one transaction, so a call that already ended never ends again.
"""

from __future__ import annotations

from dataclasses import dataclass

OPEN_STATES = ("received", "allowed", "pending", "approved", "running")


@dataclass(frozen=True)
class Outcome:
    name: str
    kind: str  # the terminal event written to the ledger
    state: str  # the call's state afterwards
    ends: tuple[str, ...]  # the states a call ends from this way
    label: str  # what the agent is told it was (the `outcome` of its result)


OUTCOMES: dict[str, Outcome] = {o.name: o for o in (
    Outcome("executed", "executed", "executed", ("allowed", "running"), "executed"),
    Outcome("failed", "failed", "failed", ("allowed", "running"), "failed"),
    Outcome("denied_by_policy", "denied", "denied", ("received",), "denied"),
    Outcome("denied_by_reviewer", "denied", "denied", ("pending",), "denied"),
    # keyturn could not judge the call (a classifier or policy error): a denial, never a pass
    Outcome("refused", "denied", "denied", ("received",), "refused"),
    # the arguments could not be judged (not valid for the tool): the call fails before anything runs
    Outcome("invalid", "failed", "failed", ("received",), "refused"),
    # approved in the tables, not by the chain: nothing runs
    Outcome("unproven", "denied", "denied", ("approved", "pending"), "refused"),
    Outcome("expired", "expired", "expired", ("pending", "approved"), "expired"),
    Outcome("cancelled", "cancelled", "cancelled", ("pending", "approved"), "cancelled"),
    Outcome("abandoned", "abandoned", "abandoned", OPEN_STATES, "abandoned"),
)}
