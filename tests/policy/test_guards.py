"""keyturn's built-in guards: no policy file can allow a call that acts on keyturn, or one that could not be
classified, and the decision (and `policy explain`) names the guard."""

from __future__ import annotations

import pytest

from server.classify import extract_facts
from server.cli.policy import render_explain
from server.errors import PolicyError
from server.policy import parse_policy
from server.policy.testing import call_for
from tests.policy.conftest import CTX, decide_with

ALLOW_EVERYTHING = "version: 1\ndefault: allow\ndefault_risk: low\nrules: []\n"
ALLOW_BY_RULE = """\
version: 1
default: review
rules:
  - {id: everything, tool: "*", outcome: allow, risk: low, reason: "anything goes"}
"""


@pytest.mark.parametrize("text", [ALLOW_EVERYTHING, ALLOW_BY_RULE])
@pytest.mark.parametrize(("tool", "args"), [
    ("shell_run", {"command": "keyturn approve r-1 --reason mine"}),
    ("http_request", {"method": "POST", "url": "http://2130706433:8765/api/requests/r-1/approve"}),
    ("shell_run", {"command": "curl -X POST http://localhost.:8765/api/requests/r-1/approve"}),
])
def test_a_call_on_keyturn_is_denied_whatever_the_policy_says(text: str, tool: str, args: dict) -> None:
    policy = parse_policy(text)
    decision = decide_with(policy, tool, args)
    assert (decision.outcome, decision.risk) == ("deny", "critical")
    assert [r.id for r in decision.rules] == ["keyturn:self-target"]
    assert decision.reason.startswith("acts on keyturn itself")


def test_an_unclassifiable_call_is_denied_whatever_the_policy_says() -> None:
    policy = parse_policy(ALLOW_EVERYTHING)
    call = call_for("report", {"q": "x"})
    decision = policy.decide(call, {"classifier_errors": ["sql: RuntimeError: boom"]})
    assert decision.outcome == "deny" and [r.id for r in decision.rules] == ["keyturn:classifier-error"]
    assert "boom" in decision.reason


def test_everything_else_is_the_policys() -> None:
    policy = parse_policy(ALLOW_EVERYTHING)
    decision = decide_with(policy, "shell_run", {"command": "rm -rf ./build"})
    assert decision.outcome == "allow" and decision.rules == ()


def test_explain_names_the_guard_and_says_no_rule_was_read() -> None:
    policy = parse_policy(ALLOW_BY_RULE)
    call = call_for("shell_run", {"command": "keyturn approve r-1"})
    facts = extract_facts("shell_run", call.arguments, {"command": "shell"}, call.annotations, CTX)
    trace = policy.explain(call, facts)
    assert trace["builtin_guard"] == "keyturn:self-target"
    [rule] = trace["rules"]
    assert not rule["matched"] and "built-in guard" in rule["why"]
    assert "guard     keyturn:self-target" in render_explain(trace)


def test_a_policy_cannot_name_a_rule_like_a_guard() -> None:
    text = 'version: 1\ndefault: review\nrules:\n  - {id: "keyturn:self-target", tool: "*", outcome: allow}\n'
    with pytest.raises(PolicyError, match="built-in guards"):
        parse_policy(text)
