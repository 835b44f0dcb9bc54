"""Interaction payloads shaped like Slack's, signed with the app's signing secret and posted form-encoded."""

from __future__ import annotations

import json
import time
import urllib.parse
from typing import Any

import httpx2
from slack_sdk.signature import SignatureVerifier

from tests.channels.slack.fake_slack import SIGNING_SECRET, TEAM


def block_action(request_id: str, action: str, user: str, *, team: str = TEAM, channel: str = "C0OPS",
                 message_ts: str = "1700000000.000100", trigger_id: str = "trig-1") -> dict[str, Any]:
    """A click on one of the message's buttons (`keyturn_approve` / `keyturn_deny`)."""
    return {
        "type": "block_actions",
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": team},
        "api_app_id": "A0KEYTURN",
        "token": "legacy-verification-token",
        "container": {"type": "message", "message_ts": message_ts, "channel_id": channel, "is_ephemeral": False},
        "trigger_id": trigger_id,
        "team": {"id": team, "domain": "keyturn-test"},
        "enterprise": None,
        "is_enterprise_install": False,
        "channel": {"id": channel, "name": "ops-approvals"},
        "message": {"type": "message", "ts": message_ts, "text": "keyturn: approval needed"},
        "state": {"values": {}},
        "actions": [{"action_id": action, "block_id": "keyturn_vote", "value": request_id, "type": "button",
                     "action_ts": f"{time.time():.6f}", "text": {"type": "plain_text", "text": action}}],
    }


def view_submission(private_metadata: str, reason: str, user: str, *, team: str = TEAM) -> dict[str, Any]:
    """The reason modal, submitted."""
    return {
        "type": "view_submission",
        "team": {"id": team, "domain": "keyturn-test"},
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": team},
        "api_app_id": "A0KEYTURN",
        "token": "legacy-verification-token",
        "trigger_id": "trig-2",
        "view": {
            "id": "V0MODAL", "team_id": team, "type": "modal", "callback_id": "keyturn_reason",
            "private_metadata": private_metadata, "hash": "1700000000.abcdef", "app_id": "A0KEYTURN",
            "title": {"type": "plain_text", "text": "Deny request"},
            "state": {"values": {"reason": {"reason": {"type": "plain_text_input", "value": reason}}}},
        },
        "response_urls": [],
        "is_enterprise_install": False,
        "enterprise": None,
    }


def edit_submission(private_metadata: str, arguments: str, reason: str, user: str, *, team: str = TEAM) -> dict[str, Any]:
    """The "Edit & approve" modal, submitted."""
    payload = view_submission(private_metadata, reason, user, team=team)
    payload["view"]["callback_id"] = "keyturn_edit"
    payload["view"]["title"] = {"type": "plain_text", "text": "Edit, then approve"}
    payload["view"]["state"]["values"]["arguments"] = {"arguments": {"type": "plain_text_input", "value": arguments}}
    return payload


def signed(payload: dict[str, Any], *, secret: str = SIGNING_SECRET, timestamp: int | None = None,
           signature: str | None = None) -> tuple[str, dict[str, str]]:
    body = urllib.parse.urlencode({"payload": json.dumps(payload)})
    ts = str(int(time.time()) if timestamp is None else timestamp)
    sig = signature or SignatureVerifier(secret).generate_signature(timestamp=ts, body=body)
    return body, {"Content-Type": "application/x-www-form-urlencoded", "X-Slack-Request-Timestamp": ts,
                  "X-Slack-Signature": sig}


async def post_signed(base: str, payload: dict[str, Any], **kwargs: Any) -> httpx2.Response:
    body, headers = signed(payload, **kwargs)
    async with httpx2.AsyncClient(timeout=30) as http:
        return await http.post(base + "/slack/events", content=body, headers=headers)


def action_values(call_args: dict[str, Any]) -> list[str]:
    """The request ids on the buttons of a recorded chat.postMessage/chat.update."""
    return [e["value"] for b in call_args.get("blocks") or [] if b.get("type") == "actions" for e in b["elements"]]


def message_text(call_args: dict[str, Any]) -> str:
    return json.dumps(call_args.get("blocks") or [], ensure_ascii=False) + str(call_args.get("text", ""))
