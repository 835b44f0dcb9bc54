"""What reviewers see on the Teams card: the whole request, safely, and the outcome once decided."""

from __future__ import annotations

import json
import time
from typing import Any

from server.channels.teams.cards import (
    APPROVE_VERB,
    DENY_VERB,
    EDIT_ARGUMENTS_INPUT,
    EDIT_REASON_INPUT,
    EDIT_VERB,
    card_json,
    request_card,
)
from server.models import ApproverGroup, RequestView, ReviewSpec
from tests.channels.teams.conftest import card_text


def view(**overrides: Any) -> RequestView:
    fields: dict[str, Any] = {
        "id": "req-1", "tool": "sql_execute", "principal": "agent-bob", "on_behalf_of": "bob", "model": "m-1",
        "args_hash": "h", "arguments": {"statement": "UPDATE payroll SET salary = 1", "password": "«redacted»"},
        "state": "pending", "risk": "critical", "reason": "payroll changes need two DBAs",
        "rules": [{"id": "payroll-two-dbas", "outcome": "review", "risk": "critical",
                   "reason": "payroll changes need two DBAs"}],
        "review": ReviewSpec(groups=(ApproverGroup(name="dba", members=("group:dba",), quorum=2),)),
        "created": time.time(), "expires": time.time() + 600, "votes": [],
    }
    fields.update(overrides)
    return RequestView(**fields)


def test_a_pending_card_shows_the_whole_request_a_reason_input_and_approve_deny() -> None:
    card = card_json(request_card(view()))
    text = card_text(card)
    for expected in ("Approval needed", "sql_execute", "CRITICAL", "agent-bob on behalf of bob (model m-1)",
                     "payroll-two-dbas: payroll changes need two DBAs", "2 approvals from group:dba (different people)",
                     "UPDATE payroll SET salary = 1", "«redacted»", "Expires", "req-1", "none yet"):
        assert expected in text, expected
    assert card["version"] == "1.5"
    reason = next(e for e in card["body"] if e["type"] == "Input.Text")
    assert reason["id"] == "reason" and reason["isMultiline"] is True
    approve, deny = card["actions"]
    assert (approve["type"], approve["verb"]) == ("Action.Execute", APPROVE_VERB)
    assert approve["data"] == {"request_id": "req-1"}
    assert (deny["type"], deny["verb"], deny["title"]) == ("Action.Execute", DENY_VERB, "Deny")


def test_text_the_agent_controls_is_never_rendered_as_markdown() -> None:
    card = card_json(request_card(view(tool="x", arguments={"q": "**APPROVED** by [admin](https://evil.example)"})))
    for element in card["body"]:
        if element["type"] == "TextBlock":  # TextBlocks render markdown: only keyturn's own headings use them
            assert "evil" not in element["text"] and "APPROVED" not in element["text"]
    assert "[admin](https://evil.example)" in card_text(card)  # shown verbatim in a TextRun


def test_huge_arguments_are_truncated() -> None:
    text = card_text(card_json(request_card(view(arguments={"blob": "x" * 50_000}))))
    assert "more characters" in text and len(text) < 10_000


def test_a_decided_card_shows_the_outcome_and_who_decided_with_no_buttons() -> None:
    denied = view(state="denied", votes=[{"person": "alice", "reviewer": "teams:t/a", "verdict": "deny",
                                         "reason": "not during the sale", "groups": [], "ts": 1.0}])
    card = card_json(request_card(denied))
    assert "Denied by alice: not during the sale" in card_text(card)
    assert "actions" not in card and not any(e["type"] == "Input.Text" for e in card["body"])
    executed = view(state="executed", votes=[
        {"person": p, "reviewer": f"api:{p}", "verdict": "approve", "reason": None, "groups": [], "ts": 1.0}
        for p in ("alice", "carol")])
    assert "Approved and executed. Approved by alice, carol" in card_text(card_json(request_card(executed)))
    expired = card_json(request_card(view(state="expired", outcome_reason="no reviewer decided before the timeout")))
    assert "Expired" in card_text(expired) and "actions" not in expired


def test_the_webhook_card_links_to_the_decision_page_instead_of_buttons() -> None:
    card = card_json(request_card(view(), interactive=False, open_url="https://keyturn.example/teams/decide/abc"))
    assert card["actions"] == [{"type": "Action.OpenUrl", "title": "Open",
                                "url": "https://keyturn.example/teams/decide/abc"}]
    assert not any(e["type"] == "Input.Text" for e in card["body"])


def test_a_notice_is_shown_to_the_reviewer_it_is_returned_to() -> None:
    text = card_text(card_json(request_card(view(), notice="Your vote was not counted: you asked for this")))
    assert "Your vote was not counted: you asked for this" in text


def test_the_card_shows_what_is_needed_and_where_it_stands() -> None:
    one = {"person": "alice", "reviewer": "api:alice", "verdict": "approve", "reason": None, "groups": ["dba"],
           "ts": 1.0}
    assert "Needs: \n2 approvals from group:dba (different people) · 1 of 2 approvals" in card_text(
        card_json(request_card(view(votes=[one]))))


def test_an_approved_card_not_yet_run_keeps_a_deny_for_an_approver_who_changes_their_mind() -> None:
    votes = [{"person": p, "reviewer": f"api:{p}", "verdict": "approve", "reason": None, "groups": ["dba"], "ts": 1.0}
             for p in ("alice", "carol")]
    card = card_json(request_card(view(state="approved", votes=votes)))
    [deny] = card["actions"]  # no Approve: only the Deny that takes an approval back
    assert (deny["type"], deny["verb"], deny["data"]) == ("Action.Execute", DENY_VERB, {"request_id": "req-1"})
    assert any(e["type"] == "Input.Text" and e["id"] == "reason" for e in card["body"])
    running = card_json(request_card(view(state="running", votes=votes)))
    assert "actions" not in running  # claimed to run: the approval stands


def test_the_card_says_what_the_call_would_touch() -> None:
    spec = ReviewSpec(groups=(ApproverGroup(name="any", quorum=2),), impact="would delete 1,204 of 50,311 rows in orders")
    text = card_text(card_json(request_card(view(review=spec))))
    assert "Would touch: \nwould delete 1,204 of 50,311 rows in orders" in text
    assert "Would touch" not in card_text(card_json(request_card(view())))


def test_a_pending_card_with_editable_arguments_has_an_edit_form() -> None:
    arguments = {"statement": "DELETE FROM orders WHERE item = 'pear'"}
    card = card_json(request_card(view(arguments=arguments)))
    approve, deny, edit = card["actions"]
    assert (approve["verb"], deny["verb"]) == (APPROVE_VERB, DENY_VERB)
    assert (edit["type"], edit["title"]) == ("Action.ShowCard", "Edit & approve")
    inputs = {e["id"]: e for e in edit["card"]["body"] if e["type"] == "Input.Text"}
    assert "value" not in inputs[EDIT_ARGUMENTS_INPUT]  # the agent's text never goes into an action
    assert "pear" not in json.dumps(edit)
    assert inputs[EDIT_REASON_INPUT]["isRequired"] is True
    (submit,) = edit["card"]["actions"]
    assert (submit["type"], submit["verb"], submit["data"]) == ("Action.Execute", EDIT_VERB, {"request_id": "req-1"})
    # Masked values cannot be edited (keyturn does not hold them to show), nor can a decided request.
    assert len(card_json(request_card(view()))["actions"]) == 2
    assert "actions" not in card_json(request_card(view(arguments=arguments, state="denied")))
