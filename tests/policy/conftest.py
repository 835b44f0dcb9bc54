"""Helpers for policy tests: build a call, its facts, and decide it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.classify import ClassifyContext, extract_facts
from server.models import Decision
from server.policy import CompiledPolicy
from server.policy.testing import KNOWN_TOOL_CLASSIFIERS, call_for

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
CTX = ClassifyContext(roots=(Path("/srv/agent"),), keyturn_urls=("http://127.0.0.1:8765",))

Decide = Callable[..., Decision]


def decide_with(policy: CompiledPolicy, tool: str, args: dict[str, Any] | None = None, **kw: Any) -> Decision:
    args = args or {}
    call = call_for(tool, args, kw.pop("principal", "agent"), kw.pop("model", None), kw.pop("annotations", None))
    kinds = kw.pop("classifiers", KNOWN_TOOL_CLASSIFIERS.get(tool, {}))
    facts = extract_facts(tool, args, kinds, call.annotations, CTX)
    return policy.decide(call, facts, **kw)


@pytest.fixture
def policies_dir() -> Path:
    return POLICIES
