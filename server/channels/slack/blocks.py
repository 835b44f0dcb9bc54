"""Slack Block Kit rendering of held requests: the review message, its thread lines and the reason modal.

Everything here is pure: a `RequestView` (arguments already redacted) in, Slack JSON out. Every
string that came from the agent side is masked once more and escaped, so an argument can neither
leak a secret nor ping `@channel` or hide a link.
"""

from __future__ import annotations

import json
from typing import Any

from server.approvals.quorum import needs
from server.classify.secrets import mask
from server.models import Event, RequestView, ReviewSpec

APPROVE_ACTION = "keyturn_approve"
DENY_ACTION = "keyturn_deny"
EDIT_ACTION = "keyturn_edit"
REASON_CALLBACK = "keyturn_reason"
EDIT_CALLBACK = "keyturn_edit"
REVOKE_ACTION = "keyturn_revoke_grant"
REVOKE_CALLBACK = "keyturn_revoke_grant"
ARGUMENTS_BLOCK = "arguments"
ARGUMENTS_INPUT = "arguments"
MAX_INPUT = 3000  # Slack's limit for a plain text input
REASON_BLOCK = "reason"
REASON_INPUT = "reason"
MAX_REASON = 2000  # as the HTTP API

_CODE_KEYS = frozenset({"query", "statement", "sql", "command", "cmd", "script", "argv", "code", "body"})
_ARG_LIMIT = 1500
_MAX_ARG_BLOCKS = 12
_STATE_LINES = {
    "pending": ":hourglass_flowing_sand: *Waiting for approval*",
    "approved": ":white_check_mark: *Approved*, waiting for the agent to come back (runs once when it repeats the call)",
    "running": ":gear: *Approved*, running now",
    "executed": ":white_check_mark: *Approved and executed*",
    "failed": ":warning: *Approved, but the tool failed*",
    "denied": ":no_entry: *Denied*",
    "expired": ":alarm_clock: *Expired*: no reviewer decided in time; it did not run",
    "cancelled": ":heavy_multiplication_x: *Cancelled*",
    "abandoned": ":ghost: *Abandoned*: the keyturn process holding it stopped",
}
_RISK_EMOJI = {"low": ":large_green_circle:", "medium": ":large_yellow_circle:", "high": ":large_orange_circle:",
               "critical": ":red_circle:"}


def escape(text: str) -> str:
    """Slack mrkdwn escaping: no `<!channel>`, `<@U..>` or `<url|label>` can be smuggled in."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def safe(text: str) -> str:
    return escape(mask(text))


def _code(text: str) -> str:
    return "```" + safe(text).replace("```", "`\u200b``") + "```"


def _clip(text: str, limit: int = _ARG_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more characters)"


def _date(ts: float | None) -> str:
    if ts is None:
        return "never"
    return f"<!date^{int(ts)}^{{date_short_pretty}} at {{time}}|{int(ts)} (unix time)>"


def needs_text(spec: ReviewSpec | None, votes: list[dict[str, Any]] | None = None) -> str:
    """What the request needs and where it stands (`quorum.needs`, as every channel says it), escaped."""
    need = needs(spec, votes or [])
    text = safe(need.requirement())
    if votes:
        text += f" · {safe(need.progress())}"
    return text + (" (a reason is required)" if need.require_reason else "")


def _argument_blocks(arguments: dict[str, Any]) -> list[dict[str, Any]]:
    items = list(arguments.items())
    blocks: list[dict[str, Any]] = []
    shown = items[:_MAX_ARG_BLOCKS] if len(items) <= _MAX_ARG_BLOCKS else items[: _MAX_ARG_BLOCKS - 1]
    for key, value in shown:
        if isinstance(value, str) and (key.lower() in _CODE_KEYS or "\n" in value or len(value) > 60):
            body = _code(_clip(value))
        elif isinstance(value, str):
            body = "`" + safe(_clip(value)).replace("`", "'") + "`"
        else:
            body = _code(_clip(json.dumps(value, ensure_ascii=False, indent=2, default=str)))
        blocks.append(_section(f"*{safe(str(key))}*\n{body}"))
    rest = items[len(shown):]
    if rest:
        more = json.dumps(dict(rest), ensure_ascii=False, indent=2, default=str)
        blocks.append(_section(f"*other arguments*\n{_code(_clip(more))}"))
    return blocks or [_section("_no arguments_")]


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}


def _context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": text[:3000]}]}


def vote_lines(view: RequestView) -> list[str]:
    lines = []
    for v in view.votes:
        mark = ":white_check_mark:" if v["verdict"] == "approve" else ":no_entry:"
        verb = "approved" if v["verdict"] == "approve" else "denied"
        reason = f": {safe(v['reason'])}" if v.get("reason") else ""
        lines.append(f"{mark} *{safe(v['person'])}* ({safe(v['reviewer'])}) {verb} {_date(v.get('ts'))}{reason}")
    return lines


def fallback_text(view: RequestView) -> str:
    """The notification text (no arguments in it: notifications show up in places blocks don't)."""
    state = "needs approval" if view.state == "pending" else view.state
    return f"keyturn: {safe(view.tool)} requested by {safe(view.principal)} {state} (request {view.id})"


def request_message(view: RequestView, mentions: list[str] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The review message for `view` in its current state: (fallback text, blocks). Approve and Deny while pending;
    Deny alone while approved and not yet run (an approver may change their mind until the call is claimed)."""
    who = safe(view.principal) + (f" on behalf of *{safe(view.on_behalf_of)}*" if view.on_behalf_of else "")
    risk = view.risk or "unknown"
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": f"Approval needed: {view.tool}"[:150]}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": f"*Requested by*\n{who}"},
            {"type": "mrkdwn", "text": f"*Model*\n{safe(view.model) if view.model else '_not reported_'}"},
            {"type": "mrkdwn", "text": f"*Risk*\n{_RISK_EMOJI.get(risk, '')} {safe(risk).upper()}"},
            {"type": "mrkdwn", "text": f"*Expires*\n{_date(view.expires)}"},
        ]},
    ]
    rules = [f"• `{safe(str(r.get('id', '?')))}` ({safe(str(r.get('risk', '?')))}): {safe(str(r.get('reason', '')))}"
             for r in view.rules if r.get("outcome") == "review"] or [f"• {safe(view.reason or 'policy default')}"]
    blocks.append(_section("*Why it was held*\n" + "\n".join(rules)))
    if view.review is not None and view.review.impact:
        blocks.append(_section(f"*What it would touch*\n{safe(_clip(view.review.impact, 500))}"))
    blocks.append(_section("*What it wants to run*"))
    blocks.extend(_argument_blocks(view.arguments))
    needs = f"*Needs* {needs_text(view.review, view.votes)}"
    if mentions:
        needs += "\n*Who can approve* " + ", ".join(f"<@{u}>" for u in mentions)
    blocks.append(_section(needs))
    votes = vote_lines(view)
    if votes:
        blocks.append(_section("*Votes*\n" + "\n".join(votes)))
    blocks.append({"type": "divider"})
    status = _STATE_LINES.get(view.state, f"*{safe(view.state)}*")
    if view.state not in ("pending", "approved", "running") and view.outcome_reason:
        status += f"\n{safe(_clip(view.outcome_reason, 500))}"
    blocks.append(_section(status))
    if view.state == "pending":
        blocks.append({"type": "actions", "block_id": "keyturn_vote", "elements": [
            {"type": "button", "action_id": APPROVE_ACTION, "style": "primary", "value": view.id,
             "text": {"type": "plain_text", "text": "Approve"}},
            {"type": "button", "action_id": DENY_ACTION, "style": "danger", "value": view.id,
             "text": {"type": "plain_text", "text": "Deny"}},
            {"type": "button", "action_id": EDIT_ACTION, "value": view.id,
             "text": {"type": "plain_text", "text": "Edit & approve"}},
        ]})
    elif view.state == "approved":  # not run yet: a reviewer who approved may still deny (keyturn checks who)
        blocks.append({"type": "actions", "block_id": "keyturn_vote", "elements": [
            {"type": "button", "action_id": DENY_ACTION, "style": "danger", "value": view.id,
             "text": {"type": "plain_text", "text": "Deny (take back my approval)"}},
        ]})
    blocks.append(_context(f"request `{view.id}` · arguments sha256 `{view.args_hash[:16]}` · "
                           f"policy `{(view.policy_digest or '-')[:12]}` · `keyturn show {view.id}`"))
    return fallback_text(view), blocks[:50]


def thread_line(event: Event) -> str | None:
    """One line for the message's thread about `event`, or None when the event needs none."""
    p = event.payload
    if event.kind == "vote" and p.get("verdict") == "approve":
        reason = f": {safe(str(p['reason']))}" if p.get("reason") else ""
        return f":white_check_mark: {safe(str(p.get('person')))} approved{reason}"
    if event.kind == "arguments.edited":
        return (f":pencil2: {safe(str(p.get('person')))} edited the arguments: {safe(str(p.get('reason') or ''))} "
                f"(now sha256 `{str(p.get('args_hash'))[:16]}`)")
    if event.kind == "denied":
        who = safe(str(p.get("person") or p.get("by") or "keyturn"))
        changed = " (who had approved)" if p.get("changed_vote") else ""
        return f":no_entry: Denied by {who}{changed}: {safe(str(p.get('reason') or ''))}"
    if event.kind == "approval.granted":
        return ":key: Approved by " + ", ".join(safe(str(a)) for a in p.get("approvers", [])) + "; it may run now."
    if event.kind == "executed":
        return ":white_check_mark: It ran."
    if event.kind == "failed":
        return f":warning: It ran and failed: {safe(str(p.get('error') or 'the tool reported an error'))}"
    if event.kind == "expired":
        return f":alarm_clock: Expired: {safe(str(p.get('reason') or 'nobody decided in time'))}"
    if event.kind == "cancelled":
        return f":heavy_multiplication_x: Cancelled by {safe(str(p.get('by')))}: {safe(str(p.get('reason') or ''))}"
    if event.kind == "abandoned":
        return f":ghost: Abandoned: {safe(str(p.get('reason') or ''))}"
    return None


def grant_message(grant_id: str, p: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """A thread reply announcing a standing grant made from the request (`grant.created`'s payload), with a Revoke
    button: (fallback text, blocks)."""
    who = safe(str(p.get("principal"))) + (f" on behalf of *{safe(str(p['on_behalf_of']))}*"
                                           if p.get("on_behalf_of") else "")
    conditions = " && ".join(f"({c})" for c in p.get("conditions") or [])
    text = (f":repeat: Standing grant `{safe(grant_id)}` by {', '.join(safe(str(a)) for a in p.get('approvers', []))}: "
            f"up to {int(p.get('uses') or 0)} more call(s) of `{safe(str(p.get('tool')))}` by {who} like this one run "
            f"without asking, until {_date(p.get('expires'))}.")
    blocks: list[dict[str, Any]] = [
        _section(text),
        _section("*When*\n" + _code(_clip(mask(conditions), 1200))),
        {"type": "actions", "block_id": "keyturn_grant", "elements": [
            {"type": "button", "action_id": REVOKE_ACTION, "style": "danger", "value": grant_id,
             "text": {"type": "plain_text", "text": "Revoke"}},
        ]},
    ]
    return f"keyturn: standing grant {grant_id} made", blocks


def revoke_modal(grant_id: str, metadata: dict[str, str]) -> dict[str, Any]:
    """The modal that asks why a standing grant is revoked (a reason is required)."""
    return {
        "type": "modal",
        "callback_id": REVOKE_CALLBACK,
        "private_metadata": json.dumps(metadata, separators=(",", ":")),
        "title": {"type": "plain_text", "text": "Revoke grant"},
        "submit": {"type": "plain_text", "text": "Revoke"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            _section(f"Revoke standing grant `{safe(grant_id)}`? Later calls it would cover wait for a reviewer again."),
            {"type": "input", "block_id": REASON_BLOCK, "label": {"type": "plain_text", "text": "Reason"},
             "element": {"type": "plain_text_input", "action_id": REASON_INPUT, "multiline": True,
                         "max_length": MAX_REASON,
                         "placeholder": {"type": "plain_text", "text": "Recorded in the ledger"}}},
        ],
    }


def reason_modal(view: RequestView, verdict: str, metadata: dict[str, str]) -> dict[str, Any]:
    """The modal that asks for a reason (always for Deny; for Approve when the policy requires one)."""
    verb = "Deny" if verdict == "deny" else "Approve"
    return {
        "type": "modal",
        "callback_id": REASON_CALLBACK,
        "private_metadata": json.dumps(metadata, separators=(",", ":")),
        "title": {"type": "plain_text", "text": f"{verb} request"},
        "submit": {"type": "plain_text", "text": verb},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            _section(f"{verb} `{safe(view.tool)}` requested by {safe(view.principal)} (request `{view.id}`)?"),
            {"type": "input", "block_id": REASON_BLOCK, "label": {"type": "plain_text", "text": "Reason"},
             "element": {"type": "plain_text_input", "action_id": REASON_INPUT, "multiline": True,
                         "max_length": MAX_REASON,
                         "placeholder": {"type": "plain_text",
                                         "text": "Recorded in the ledger and shown to the agent"}}},
        ],
    }


def edit_modal(view: RequestView, metadata: dict[str, str]) -> dict[str, Any] | None:
    """The modal that edits a held call's arguments (JSON), then approves the edited call, with a required reason;
    None when the arguments do not fit in Slack's input."""
    current = json.dumps(view.arguments, indent=2, ensure_ascii=False)
    if len(current) > MAX_INPUT:
        return None
    return {
        "type": "modal",
        "callback_id": EDIT_CALLBACK,
        "private_metadata": json.dumps(metadata, separators=(",", ":")),
        "title": {"type": "plain_text", "text": "Edit, then approve"},
        "submit": {"type": "plain_text", "text": "Approve edited"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            _section(f"Edit the arguments of `{safe(view.tool)}` requested by {safe(view.principal)} (request "
                     f"`{view.id}`), then approve the edited call. keyturn judges the edited call again: if it needs "
                     "more approvals or other approvers, it waits for them; if the policy denies it, it is refused."),
            {"type": "input", "block_id": ARGUMENTS_BLOCK, "label": {"type": "plain_text", "text": "Arguments (JSON)"},
             "element": {"type": "plain_text_input", "action_id": ARGUMENTS_INPUT, "multiline": True,
                         "max_length": MAX_INPUT, "initial_value": current}},
            {"type": "input", "block_id": REASON_BLOCK, "label": {"type": "plain_text", "text": "Reason"},
             "element": {"type": "plain_text_input", "action_id": REASON_INPUT, "multiline": True,
                         "max_length": MAX_REASON,
                         "placeholder": {"type": "plain_text",
                                         "text": "Why you changed them: recorded in the ledger and shown to the agent"}}},
        ],
    }
