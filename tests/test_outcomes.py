"""What the agent reads of a call's end: an error result whose details are in `_meta`, never in structured content
(which clients check against the tool's output schema, even in an error result)."""

from __future__ import annotations

import json

import mcp_types as types

from server.outcomes import OUTCOME_META_KEY, error_result, left_result, ran_before_result, unrecorded_result
from tests.helpers import outcome_of


def wire(result: types.CallToolResult) -> dict[str, object]:
    dumped: dict[str, object] = json.loads(result.model_dump_json(by_alias=True, exclude_none=True))
    return dumped


def test_an_error_result_carries_its_details_in_meta_and_no_structured_content() -> None:
    result = error_result("Denied by policy: no", outcome="denied", by="policy", call_id="c1", rules=["r"])
    sent = wire(result)
    assert sent["isError"] is True and "structuredContent" not in sent
    assert sent["_meta"] == {OUTCOME_META_KEY: {"outcome": "denied", "by": "policy", "call_id": "c1", "rules": ["r"]}}
    assert OUTCOME_META_KEY == "io.keyturn/outcome"
    assert sent["content"] == [{"type": "text", "text": "Denied by policy: no"}]
    assert outcome_of(result)["rules"] == ["r"]


def test_an_error_result_without_details_has_no_meta() -> None:
    sent = wire(error_result("request_id (a string) is required"))
    assert sent["isError"] is True and "_meta" not in sent and "structuredContent" not in sent


def test_every_end_the_agent_reads_is_an_error_result_without_structured_content() -> None:
    ends = {
        "left": left_result("r1"),
        "already_executed": ran_before_result("r2", "executed", 0.0, None),
        "failed": ran_before_result("r3", "failed", 0.0, "boom"),
        "unrecorded": unrecorded_result("c4", "disk full"),
    }
    for outcome, result in ends.items():
        assert result.is_error and result.structured_content is None, outcome
        assert "structuredContent" not in wire(result), outcome
        assert outcome_of(result)["outcome"] == outcome


def test_a_held_call_keyturn_denied_is_told_as_keyturns_not_a_reviewers() -> None:
    from server.models import RequestView
    from server.outcomes import closed_result

    base = dict(id="r1", tool="t", principal="p", on_behalf_of=None, model=None, args_hash="h", arguments={},
                state="denied", risk="high", reason="x", rules=[], review=None, created=0.0, expires=None)
    unproven = closed_result(RequestView(**base, votes=[], outcome_reason="the approval is not proven by the chain"))
    assert unproven.content[0].text == "Denied by keyturn: the approval is not proven by the chain"  # type: ignore[union-attr]
    assert outcome_of(unproven) == {"outcome": "denied", "by": "keyturn", "request_id": "r1",
                                    "reason": "the approval is not proven by the chain"}
    vote = {"person": "carol", "verdict": "deny", "reason": "not today", "reviewer": "api:carol"}
    denied = closed_result(RequestView(**base, votes=[vote]))
    assert denied.content[0].text == "Denied by reviewer carol: not today"  # type: ignore[union-attr]
    assert outcome_of(denied)["by"] == "reviewer" and outcome_of(denied)["reviewer"] == "carol"
