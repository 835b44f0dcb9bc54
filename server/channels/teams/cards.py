"""What a reviewer sees of a held request, as an Adaptive Card (Teams SDK card models) and as plain facts.

The same content as the Slack message: tool, redacted arguments (`RequestView.arguments` is already
redacted), matched rules, risk, requester, quorum and expiry; while pending, a reason input and
**Approve** / **Deny** (`Action.Execute`) and **Edit & approve** (an `Action.ShowCard` form with the arguments as
JSON and a required reason, sent as `Action.Execute` with `EDIT_VERB`: the edited call is judged again,
`server.approvals.edits`), or an "Open" link for the no-bot fallback; once decided, the outcome and who decided.
Text the agent controls (arguments, tool, principal, reasons) goes into `TextRun`s, which Teams never renders as
markdown, so a crafted argument cannot draw a fake "approved" banner or a link.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from microsoft_teams.api.models.adaptive_card import AdaptiveCardActionCardResponse
from microsoft_teams.cards import (
    AdaptiveCard,
    CardElement,
    ExecuteAction,
    OpenUrlAction,
    RichTextBlock,
    ShowCardAction,
    TextBlock,
    TextColor,
    TextInput,
    TextRun,
)

from server.approvals.edits import has_masked
from server.approvals.quorum import needs
from server.models import RequestView

APPROVE_VERB = "keyturn.approve"
DENY_VERB = "keyturn.deny"
REVOKE_VERB = "keyturn.revokeGrant"
REASON_INPUT = "reason"
EDIT_VERB = "keyturn.edit"
EDIT_ARGUMENTS_INPUT = "edit_arguments"
EDIT_REASON_INPUT = "edit_reason"
ACTION_FIELDS = frozenset({"request_id", REASON_INPUT, EDIT_ARGUMENTS_INPUT, EDIT_REASON_INPUT})
REVOKE_FIELDS = frozenset({"grant_id", REASON_INPUT})
"""Every field a keyturn card's action sends (its data and its inputs): any other is refused, never ignored."""
MAX_EDIT_CHARS = 8000
MAX_ARGUMENTS_CHARS = 3000
MAX_REASON = 2000

OUTCOME_TITLES = {
    "pending": "Approval needed",
    "approved": "Approved, waiting for the agent to come back",
    "running": "Approved: running",
    "executed": "Approved and executed",
    "failed": "Approved, but the tool failed",
    "denied": "Denied",
    "expired": "Expired: no reviewer decided in time",
    "cancelled": "Cancelled by the requester",
    "abandoned": "Abandoned: keyturn stopped while holding it",
}
TITLE_COLORS: dict[str, TextColor] = {"pending": "Warning", "approved": "Good", "running": "Good", "executed": "Good",
                "denied": "Attention", "failed": "Attention"}


def format_time(ts: float | None, relative: bool = False) -> str:
    """An absolute UTC time (cards stay as sent, so they cannot say "in 5 min"); `relative` for live pages."""
    if ts is None:
        return "never"
    when = datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    left = int(ts - time.time())
    return f"{when} (in {left // 60} min {left % 60} s)" if relative and left > 0 else when


def arguments_text(view: RequestView) -> str:
    text = json.dumps(view.arguments, indent=2, ensure_ascii=False, sort_keys=True)
    if len(text) > MAX_ARGUMENTS_CHARS:
        text = text[:MAX_ARGUMENTS_CHARS] + f"\n… ({len(text) - MAX_ARGUMENTS_CHARS} more characters)"
    return text


def quorum_text(view: RequestView) -> str:
    """What the request needs and where it stands (`quorum.needs`, as every channel says it)."""
    need = needs(view.review, view.votes)
    text = need.requirement() + (" (a reason is required)" if need.require_reason else "")
    return text + (f" · {need.progress()}" if view.votes else "")


def requester_text(view: RequestView) -> str:
    text = view.principal
    if view.on_behalf_of:
        text += f" on behalf of {view.on_behalf_of}"
    if view.model:
        text += f" (model {view.model})"
    return text


def votes_text(view: RequestView) -> str:
    if not view.votes:
        return "none yet"
    return "; ".join(f"{v['person']} {'approved' if v['verdict'] == 'approve' else 'denied'}"
                     + (f": {v['reason']}" if v.get("reason") else "") for v in view.votes)


def outcome_text(view: RequestView) -> str | None:
    """Who decided and why, once the request is no longer pending."""
    if view.state == "pending":
        return None
    deny = next((v for v in reversed(view.votes) if v["verdict"] == "deny"), None)
    if view.state == "denied" and deny is not None:
        return f"Denied by {deny['person']}: {deny['reason']}"
    approvers = [v["person"] for v in view.votes if v["verdict"] == "approve"]
    if view.state in {"approved", "running", "executed", "failed"} and approvers:
        tail = f" ({view.outcome_reason})" if view.state == "failed" and view.outcome_reason else ""
        return f"{OUTCOME_TITLES[view.state]}. Approved by {', '.join(approvers)}{tail}"
    return f"{OUTCOME_TITLES.get(view.state, view.state)}" + (f": {view.outcome_reason}" if view.outcome_reason else "")


def request_facts(view: RequestView, relative: bool = False) -> list[tuple[str, str]]:
    """(label, value) pairs shown on every surface, in order."""
    rules = "; ".join(f"{r.get('id')}: {r.get('reason')}" for r in view.rules) or (view.reason or "-")
    return [
        ("Tool", view.tool),
        ("Risk", (view.risk or "unknown").upper()),
        ("Requested by", requester_text(view)),
        ("Rules", rules),
        *([("Would touch", view.review.impact)] if view.review is not None and view.review.impact else []),
        ("Needs", quorum_text(view)),
        ("Votes", votes_text(view)),
        ("Expires", format_time(view.expires, relative)),
        ("Request", view.id),
    ]


def _runs(*runs: TextRun) -> RichTextBlock:
    inlines: list[CardElement] = list(runs)
    return RichTextBlock(inlines=inlines, spacing="Small")


def _fact(label: str, value: str) -> RichTextBlock:
    return _runs(TextRun(text=f"{label}: ", weight="Bolder"), TextRun(text=value))


def request_card(view: RequestView, *, notice: str | None = None, notice_ok: bool = False,
                 open_url: str | None = None, interactive: bool = True) -> AdaptiveCard:
    """The card for `view` in its current state. `notice` is shown to the one reviewer it is returned to."""
    title = OUTCOME_TITLES.get(view.state, view.state.capitalize())
    body: list[CardElement] = [
        TextBlock(text=f"keyturn: {title}", weight="Bolder", size="Medium", wrap=True,
                  color=TITLE_COLORS.get(view.state, "Default")),
    ]
    if (outcome := outcome_text(view)) is not None:
        body.append(_runs(TextRun(text=outcome, weight="Bolder")))
    if notice:
        body.append(_runs(TextRun(text=notice, color="Good" if notice_ok else "Attention")))
    body += [_fact(label, value) for label, value in request_facts(view)]
    body += [
        TextBlock(text="Arguments (secrets masked)", weight="Bolder", spacing="Medium", wrap=True),
        _runs(TextRun(text=arguments_text(view), font_type="Monospace")),
    ]
    actions: list[ExecuteAction | OpenUrlAction | ShowCardAction] = []
    if view.state == "pending" and interactive:
        data: dict[str, Any] = {"request_id": view.id}
        body.append(TextInput(id=REASON_INPUT, label="Reason (required to deny)", is_multiline=True,
                              max_length=MAX_REASON, placeholder="Why you approve or deny this call"))
        actions = [ExecuteAction(title="Approve", verb=APPROVE_VERB, data=data, style="positive"),
                   ExecuteAction(title="Deny", verb=DENY_VERB, data=data, style="destructive")]
        if (form := edit_form(view)) is not None:
            actions.append(ShowCardAction(title="Edit & approve", card=form))
    elif view.state == "approved" and interactive:  # not run yet: an approver may still deny (keyturn checks who)
        body.append(TextInput(id=REASON_INPUT, label="Reason (required to deny)", is_multiline=True,
                              max_length=MAX_REASON, placeholder="Why you take back your approval"))
        actions = [ExecuteAction(title="Deny (take back my approval)", verb=DENY_VERB, data={"request_id": view.id},
                                 style="destructive")]
    elif view.state == "pending" and open_url:
        actions = [OpenUrlAction(title="Open", url=open_url)]
    return AdaptiveCard(version="1.5", body=body, actions=list(actions) or None,
                        fallback_text=f"keyturn: {title}: {view.tool} ({view.id})")


def grant_card(grant_id: str, p: dict[str, Any], *, notice: str | None = None, notice_ok: bool = False,
               live: bool = True) -> AdaptiveCard:
    """The card announcing a standing grant (`grant.created`'s payload `p`), with a reason input and **Revoke**
    while `live`. Everything from the agent side or a reviewer goes into `TextRun`s."""
    who = str(p.get("principal")) + (f" on behalf of {p['on_behalf_of']}" if p.get("on_behalf_of") else "")
    body: list[CardElement] = [
        TextBlock(text="keyturn: standing grant" + ("" if live else " (ended)"), weight="Bolder", size="Medium",
                  wrap=True, color="Good" if live else "Default"),
    ]
    if notice:
        body.append(_runs(TextRun(text=notice, color="Good" if notice_ok else "Attention")))
    body += [_fact("Grant", grant_id), _fact("Tool", str(p.get("tool"))), _fact("Agent", who),
             _fact("Approved by", ", ".join(str(a) for a in p.get("approvers") or [])),
             _fact("From request", str(p.get("request_id"))),
             _fact("Covers", f"up to {int(p.get('uses') or 0)} call(s) until {format_time(p.get('expires'))}"),
             TextBlock(text="When", weight="Bolder", spacing="Medium", wrap=True),
             _runs(TextRun(text=" && ".join(f"({c})" for c in p.get("conditions") or [])[:MAX_ARGUMENTS_CHARS],
                           font_type="Monospace"))]
    actions: list[ExecuteAction] = []
    if live:
        body.append(TextInput(id=REASON_INPUT, label="Reason (required to revoke)", is_multiline=True,
                              max_length=MAX_REASON, placeholder="Why this grant should end now"))
        actions = [ExecuteAction(title="Revoke", verb=REVOKE_VERB, data={"grant_id": grant_id}, style="destructive")]
    return AdaptiveCard(version="1.5", body=body, actions=list(actions) or None,
                        fallback_text=f"keyturn: standing grant {grant_id} for {p.get('tool')}")


def edit_form(view: RequestView) -> AdaptiveCard | None:
    """The form that edits a held call's arguments (JSON), then approves the edited call, with a required reason; None
    when the arguments hold masked values (they cannot be edited). The agent's text never goes into an action: the
    input starts empty, and the reviewer copies the arguments shown on the card."""
    if has_masked(view.arguments):
        return None
    return AdaptiveCard(version="1.5", body=[
        _runs(TextRun(text="Edit the arguments, then approve the edited call. keyturn judges the edited call again: if "
                           "it needs more approvals or other approvers, it waits for them; if the policy denies it, "
                           "it is refused.")),
        TextInput(id=EDIT_ARGUMENTS_INPUT, label="Arguments (JSON: the whole arguments, as they are to run)",
                  is_multiline=True, max_length=MAX_EDIT_CHARS, is_required=True,
                  placeholder="Copy the arguments shown above and change them"),
        TextInput(id=EDIT_REASON_INPUT, label="Why you changed them (the agent reads it)", is_multiline=True,
                  max_length=MAX_REASON, is_required=True,
                  placeholder="Recorded in the ledger and shown to the agent"),
    ], actions=[ExecuteAction(title="Approve edited", verb=EDIT_VERB, data={"request_id": view.id},
                              style="positive")])


def checkpoint_card(line: str) -> AdaptiveCard:
    """A quiet card carrying a signed checkpoint of the ledger (a witness outside the ledger file)."""
    return AdaptiveCard(version="1.5", body=[
        TextBlock(text="keyturn: ledger checkpoint", weight="Bolder", wrap=True),
        _runs(TextRun(text=line, font_type="Monospace")),
    ], fallback_text=line)


def card_json(card: AdaptiveCard) -> dict[str, Any]:
    dumped: dict[str, Any] = card.model_dump(mode="json", by_alias=True, exclude_none=True)
    return dumped


def invoke_card(card: AdaptiveCard) -> dict[str, Any]:
    """The `adaptiveCard/action` invoke response that redraws the card for the reviewer who clicked."""
    body: dict[str, Any] = AdaptiveCardActionCardResponse(value=card).model_dump(
        mode="json", by_alias=True, exclude_none=True)
    return body


def invoke_error(status: int, message: str) -> dict[str, Any]:
    return {"statusCode": status, "type": "application/vnd.microsoft.error",
            "value": {"code": "BadRequest" if status < 500 else "InternalError", "message": message}}
