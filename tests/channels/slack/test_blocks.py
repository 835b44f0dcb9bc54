"""What a reviewer sees in Slack: the request, why it was held, who must approve; nothing the agent could abuse."""

from __future__ import annotations

import json
import time
from typing import Any

from server.channels.slack import blocks as ui
from server.models import ApproverGroup, Event, RequestView, ReviewSpec


def view(**changes: Any) -> RequestView:
    base: dict[str, Any] = dict(
        id="req123", tool="sql_execute", principal="agent-bob", on_behalf_of="bob", model="claude-x",
        args_hash="ab" * 32, arguments={"statement": "UPDATE orders SET qty = 0 -- AKIAIOSFODNN7EXAMPLE"},
        state="pending", risk="high", reason="writes need a human",
        rules=[{"id": "writes-reviewed", "outcome": "review", "risk": "high", "reason": "writes need a human"},
               {"id": "reads-allowed", "outcome": "allow", "risk": "low", "reason": "not shown"}],
        review=ReviewSpec(groups=(ApproverGroup(name="dba", members=("group:dba",), quorum=2),)),
        created=time.time(), expires=time.time() + 600, votes=[], policy_digest="d" * 64)
    base.update(changes)
    return RequestView(**base)


def dump(blocks: list[dict[str, Any]]) -> str:
    return json.dumps(blocks, ensure_ascii=False)


def test_a_pending_request_shows_what_why_who_and_until_when_with_two_buttons() -> None:
    text, blocks = ui.request_message(view())
    shown = dump(blocks)
    assert "sql_execute" in text and "req123" in text and "UPDATE" not in text  # no arguments in notifications
    assert "```UPDATE orders SET qty = 0 -- «redacted»```" in shown  # SQL as code, the key masked
    assert "writes-reviewed" in shown and "writes need a human" in shown and "not shown" not in shown
    assert "agent-bob" in shown and "*bob*" in shown and "claude-x" in shown and "HIGH" in shown
    assert "2 approvals from group:dba" in shown
    assert "<!date^" in shown  # the expiry in each reader's own time zone
    actions = [b for b in blocks if b["type"] == "actions"]
    assert [(e["action_id"], e["value"], e.get("style")) for e in actions[0]["elements"]] == [
        ("keyturn_approve", "req123", "primary"), ("keyturn_deny", "req123", "danger"), ("keyturn_edit", "req123", None)]


def test_agent_supplied_text_cannot_mention_link_or_break_out_of_code() -> None:
    sneaky = view(principal="<!channel>", arguments={"statement": "x ``` <!here> <https://evil|click>",
                                                      "note": "<@U0ADMIN>", "n": {"k": [1, 2]}})
    shown = dump(ui.request_message(sneaky)[1])
    assert "<!channel>" not in shown and "<!here>" not in shown and "<@U0ADMIN>" not in shown
    assert "<https://evil" not in shown and "&lt;!here&gt;" in shown
    assert "x `\u200b`` " in shown  # the argument's own backticks cannot close the code block
    assert '\\"k\\": [' in shown  # structured arguments as JSON


def test_long_and_many_arguments_stay_within_slack_limits() -> None:
    many = view(arguments={f"a{i}": "v" * 5000 for i in range(30)})
    blocks = ui.request_message(many)[1]
    assert len(blocks) <= 50
    assert all(len(b.get("text", {}).get("text", "")) <= 3000 for b in blocks)
    assert "more characters" in dump(blocks) and "other arguments" in dump(blocks)


def test_a_decided_request_has_no_buttons_and_shows_votes_and_outcome() -> None:
    votes = [{"person": "alice", "reviewer": "slack:T1/UALICE", "verdict": "deny", "reason": "not <now>",
              "groups": ["dba"], "ts": time.time()}]
    text, blocks = ui.request_message(view(state="denied", votes=votes, outcome_reason="denied by alice: not now"))
    shown = dump(blocks)
    assert not [b for b in blocks if b["type"] == "actions"]
    assert "Denied" in shown and "*alice*" in shown and "not &lt;now&gt;" in shown and "denied" in text
    for state in ("running", "executed", "failed", "expired", "cancelled", "abandoned"):
        assert not [b for b in ui.request_message(view(state=state))[1] if b["type"] == "actions"]
    # Approved and not run yet: no Approve, only the Deny an approver may use to take their approval back.
    [actions] = [b for b in ui.request_message(view(state="approved"))[1] if b["type"] == "actions"]
    assert [e["action_id"] for e in actions["elements"]] == [ui.DENY_ACTION]


def test_thread_lines_for_votes_and_outcomes() -> None:
    def event(kind: str, **payload: Any) -> Event:
        return Event(seq=1, ts=0.0, kind=kind, call_id="req123", payload=payload, prev_hash="", hash="")

    assert ui.thread_line(event("vote", verdict="approve", person="alice", reason="ok")) == \
        ":white_check_mark: alice approved: ok"
    assert ui.thread_line(event("vote", verdict="deny", person="alice")) is None  # `denied` says it
    assert "Denied by alice: no" in str(ui.thread_line(event("denied", person="alice", reason="no")))
    assert "Denied by alice (who had approved): no" in str(
        ui.thread_line(event("denied", person="alice", reason="no", changed_vote=True)))
    assert "alice, carol" in str(ui.thread_line(event("approval.granted", approvers=["alice", "carol"])))
    assert ui.thread_line(event("executed")) == ":white_check_mark: It ran."
    assert "Expired" in str(ui.thread_line(event("expired", reason="nobody decided")))
    assert ui.thread_line(event("notified", channel="slack")) is None


def test_the_reason_modal_carries_the_request_and_verdict() -> None:
    modal = ui.reason_modal(view(), "deny", {"r": "req123", "v": "deny", "c": "C0OPS"})
    assert modal["callback_id"] == ui.REASON_CALLBACK and modal["submit"]["text"] == "Deny"
    assert json.loads(modal["private_metadata"]) == {"r": "req123", "v": "deny", "c": "C0OPS"}
    field = modal["blocks"][1]
    assert field["block_id"] == ui.REASON_BLOCK and field["element"]["action_id"] == ui.REASON_INPUT
    assert field["element"]["max_length"] == ui.MAX_REASON
    assert ui.reason_modal(view(), "approve", {})["submit"]["text"] == "Approve"
    assert "a reason is required" in ui.needs_text(ReviewSpec(require_reason=True))


def test_the_message_says_what_the_call_would_touch_before_anyone_approves() -> None:
    spec = ReviewSpec(impact="would delete 1,204 of 50,311 rows in orders")
    shown = dump(ui.request_message(view(review=spec))[1])
    assert "*What it would touch*\\nwould delete 1,204 of 50,311 rows in orders" in shown
    unknown = dump(ui.request_message(view(review=ReviewSpec(impact="impact unknown: <!channel> *took* too long")))[1])
    assert "impact unknown: &lt;!channel&gt; \\\\*took\\\\* too long" in unknown or "&lt;!channel&gt;" in unknown
    assert "<!channel>" not in unknown  # a database's words are text, never a mention
    assert "What it would touch" not in dump(ui.request_message(view())[1])
