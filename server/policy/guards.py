"""Keyturn's built-in guards: refusals no policy file can drop, applied before any rule is read.

A policy a user writes (or an example copied from the docs) may forget the rules that protect keyturn itself.
These do not depend on it: a call whose facts say it acts on keyturn (its files, its API, its CLI, its key
material) and a call whose arguments could not be classified are denied, whatever the policy says, and the
decision names the guard (`keyturn:self-target`, `keyturn:classifier-error`). Self-approval is refused by the
approvals room on every channel. Policy rules decide everything else.

These guards read the classifiers' facts, so they are a signal on top of the boundary, not the boundary: what
an agent's tool can reach is limited by the sandbox, the roots and the address checks (see `server.execution`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.models import MatchedRule

__all__ = ["GUARDS", "GUARD_PREFIX", "builtin_guard"]

GUARD_PREFIX = "keyturn:"
GUARDS: dict[str, str] = {
    "keyturn:self-target": "a call that acts on keyturn itself (its files, API, CLI or keys) is never allowed",
    "keyturn:classifier-error": "a call whose arguments could not be classified is not allowed",
}


def builtin_guard(facts: Mapping[str, Any]) -> MatchedRule | None:
    """The built-in guard that refuses this call, if one does."""
    if facts.get("self_target"):
        reasons = "; ".join(str(r) for r in facts.get("self_target_reasons") or ()) or "it names keyturn's own files"
        return MatchedRule(id="keyturn:self-target", outcome="deny", risk="critical",
                           reason=f"acts on keyturn itself: {reasons}")
    if errors := facts.get("classifier_errors"):
        shown = "; ".join(str(e) for e in errors)[:500]
        return MatchedRule(id="keyturn:classifier-error", outcome="deny", risk="high",
                           reason=f"the arguments could not be classified: {shown}")
    return None
