"""Slack end to end: a real `keyturn serve --http`, the SDK's MCP client as the agent, the fake Slack Web API,
and reviewers' clicks signed like Slack signs them, posted to the real `/slack/events`."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx2
import mcp_types as types

from tests.channels.slack.conftest import slack_config
from tests.channels.slack.fake_slack import FakeSlack
from tests.channels.slack.interactions import (
    action_values,
    block_action,
    edit_submission,
    message_text,
    post_signed,
    signed,
    view_submission,
)
from tests.conftest import TOKENS, Home, ReviewerAPI, agent_client, free_port
from tests.helpers import eventually

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
TERMINAL = {"executed", "failed", "denied", "expired", "cancelled", "abandoned"}


def text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


def terminal_events(home: Home, call_id: str) -> list[str]:
    return [e["kind"] for e in home.ledger_events(call_id) if e["kind"] in TERMINAL]


def payloads(home: Home, call_id: str, kind: str) -> list[dict[str, Any]]:
    return [e["payload"] for e in home.ledger_events(call_id) if e["kind"] == kind]


async def review_message(fake: FakeSlack, snippet: str) -> tuple[str, dict[str, Any]]:
    """The review message posted for the held call whose arguments contain `snippet`: (request id, its args)."""
    post = await fake.wait_for("chat.postMessage", lambda c: "keyturn_approve" in message_text(c.args)
                               and snippet in message_text(c.args))
    return action_values(post.args)[0], post.args


async def wait_until(check: Callable[[], bool], within_s: float = 15) -> None:
    await eventually(check, within=within_s)  # the state is in another process's database


async def held_call(base: str, token: str, statement: str,
                    reviewers: Callable[[], Awaitable[None]]) -> types.CallToolResult:
    """Make the agent's call and, while it is held, run `reviewers`; return the agent's result."""
    results: list[types.CallToolResult] = []
    with anyio.fail_after(60):
        async with agent_client(base, token) as client:
            async def agent() -> None:
                results.append(await client.call_tool("sql_execute", {"statement": statement}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                await reviewers()
    return results[0]


async def test_a_click_approves_the_held_call_which_runs_and_the_message_shows_it(
        slack_home: Home, fake_slack: FakeSlack) -> None:
    base = slack_home.serve_http()
    statement = f"DELETE FROM orders WHERE item = 'pear' -- deploy key {AWS_KEY}"
    seen: dict[str, Any] = {}

    async def alice_clicks() -> None:
        request_id, message = await review_message(fake_slack, "DELETE FROM orders")
        seen["id"], seen["message"] = request_id, message
        assert slack_home.rows("SELECT count(*) FROM orders") == [(3,)]  # held: nothing ran yet
        r = await post_signed(base, block_action(request_id, "keyturn_approve", "UALICE"))
        assert r.status_code == 200, r.text

    result = await held_call(base, TOKENS["agent-ci"], statement, alice_clicks)
    assert not result.is_error, text(result)
    assert slack_home.rows("SELECT item FROM orders ORDER BY id") == [("apple",), ("plum",)]
    request_id, message = seen["id"], seen["message"]
    shown = message_text(message)
    assert message["channel"] == "#ops-approvals" and "sql_execute" in shown and "agent-ci" in shown
    assert "writes-reviewed" in shown and "writes need a human" in shown and "1 approval from any reviewer" in shown
    assert "```DELETE FROM orders WHERE item = 'pear' -- deploy key «redacted»```" in shown
    final = await fake_slack.wait_for("chat.update", lambda c: "Approved and executed" in message_text(c.args))
    notified = next(p for p in payloads(slack_home, request_id, "notified") if p.get("ts"))
    assert (final.args["channel"], final.args["ts"]) == (notified["slack_channel"], notified["ts"]) == (
        "C0OPS", notified["ts"])
    assert "keyturn_approve" not in message_text(final.args) and "*alice*" in message_text(final.args)
    vote = payloads(slack_home, request_id, "vote")[0]
    assert (vote["reviewer"], vote["person"], vote["channel"]) == ("slack:T0KEYTURN/UALICE", "alice", "slack")
    assert terminal_events(slack_home, request_id) == ["executed"]
    assert AWS_KEY not in fake_slack.everything()  # not in a message, an update, a thread reply or a modal


async def test_deny_through_the_modal_with_a_reason_that_reaches_the_agent_and_the_ledger(
        slack_home: Home, fake_slack: FakeSlack) -> None:
    base = slack_home.serve_http()
    seen: dict[str, str] = {}

    async def carol_denies() -> None:
        request_id, _ = await review_message(fake_slack, "UPDATE orders SET qty = 0")
        seen["id"] = request_id
        await post_signed(base, block_action(request_id, "keyturn_deny", "UCAROL", trigger_id="trig-deny"))
        opened = await fake_slack.wait_for("views.open", lambda c: c.args["trigger_id"] == "trig-deny")
        assert "Reason" in json.dumps(opened.args["view"])
        r = await post_signed(base, view_submission(opened.args["view"]["private_metadata"],
                                                    "not during the sale", "UCAROL"))
        assert r.status_code == 200, r.text

    result = await held_call(base, TOKENS["agent-ci"], "UPDATE orders SET qty = 0", carol_denies)
    assert result.is_error and "not during the sale" in text(result) and "carol" in text(result)
    assert slack_home.rows("SELECT sum(qty) FROM orders") == [(15,)]
    request_id = seen["id"]
    assert terminal_events(slack_home, request_id) == ["denied"]
    denied = payloads(slack_home, request_id, "denied")[0]
    assert (denied["reviewer"], denied["reason"]) == ("slack:T0KEYTURN/UCAROL", "not during the sale")
    await fake_slack.wait_for("chat.update", lambda c: "Denied" in message_text(c.args)
                              and "not during the sale" in message_text(c.args))
    await fake_slack.wait_for("chat.postMessage", lambda c: c.args.get("thread_ts") is not None
                              and "Denied by carol" in c.args["text"])


async def test_forged_stale_and_replayed_clicks_and_a_race_each_get_exactly_the_right_outcome(
        slack_home: Home, fake_slack: FakeSlack) -> None:
    base = slack_home.serve_http()
    seen: dict[str, Any] = {}

    async def reviewers() -> None:
        request_id, _ = await review_message(fake_slack, "qty = 9")
        seen["id"] = request_id
        click = block_action(request_id, "keyturn_approve", "UALICE")
        forged = await post_signed(base, click, secret="a-guess")
        stale = await post_signed(base, click, timestamp=int(time.time()) - 6 * 60)
        bad_sig = await post_signed(base, click, signature="v0=" + "0" * 64)
        assert (forged.status_code, stale.status_code, bad_sig.status_code) == (401, 401, 401)
        assert not payloads(slack_home, request_id, "vote") and not payloads(slack_home, request_id, "vote.refused")
        # alice and carol click at the same moment: one vote decides, the other is refused
        body_a, headers_a = signed(click)
        seen["replay"] = (body_a, headers_a)
        async with anyio.create_task_group() as tg:
            for user in ("UALICE", "UCAROL"):
                tg.start_soon(post_signed, base, block_action(request_id, "keyturn_approve", user))

    result = await held_call(base, TOKENS["agent-ci"], "UPDATE orders SET qty = 9 WHERE id = 1", reviewers)
    assert not result.is_error, text(result)
    request_id = seen["id"]
    await wait_until(lambda: len(payloads(slack_home, request_id, "vote.refused")) == 1)
    votes, refused = payloads(slack_home, request_id, "vote"), payloads(slack_home, request_id, "vote.refused")
    assert len(votes) == 1 and refused[0]["code"] == "not_pending"
    loser = "UCAROL" if votes[0]["person"] == "alice" else "UALICE"
    assert refused[0]["reviewer"] == f"slack:T0KEYTURN/{loser}"
    await fake_slack.wait_for("chat.postEphemeral",
                              lambda c: c.args["user"] == loser and "not pending" in c.args["text"])
    # the very same signed request, replayed after the decision (inside Slack's five minutes)
    body, headers = seen["replay"]
    async with httpx2.AsyncClient() as http:
        replay = await http.post(base + "/slack/events", content=body, headers=headers)
    assert replay.status_code == 200
    await wait_until(lambda: len(payloads(slack_home, request_id, "vote.refused")) == 2)
    assert payloads(slack_home, request_id, "vote.refused")[1]["code"] == "not_pending"
    assert len(payloads(slack_home, request_id, "vote")) == 1
    assert terminal_events(slack_home, request_id) == ["executed"]
    assert slack_home.rows("SELECT qty FROM orders WHERE id = 1") == [(9,)]


async def test_the_requester_and_ineligible_users_are_refused_and_told_why(
        slack_home: Home, fake_slack: FakeSlack) -> None:
    base = slack_home.serve_http()
    seen: dict[str, Any] = {}

    async def reviewers() -> None:
        request_id, message = await review_message(fake_slack, "payroll")
        seen["id"], seen["message"] = request_id, message
        for user in ("UBOB", "UDAVE"):  # bob is who agent-bob acts for; dave is no DBA
            await post_signed(base, block_action(request_id, "keyturn_approve", user, channel="C0DBA"))
            await fake_slack.wait_for("chat.postEphemeral", lambda c, u=user: c.args["user"] == u)
        await post_signed(base, block_action(request_id, "keyturn_approve", "UALICE", channel="C0DBA"))
        await wait_until(lambda: len(payloads(slack_home, request_id, "vote")) == 1)
        await post_signed(base, block_action(request_id, "keyturn_approve", "UCAROL", channel="C0DBA"))

    result = await held_call(base, TOKENS["agent-bob"], "UPDATE payroll SET salary = 1", reviewers)
    assert not result.is_error, text(result)
    request_id = seen["id"]
    assert seen["message"]["channel"] == "#dba"  # the rule names the channel
    eph = {c.args["user"]: c.args for c in fake_slack.of("chat.postEphemeral")}
    assert "cannot approve or deny its own request" in eph["UBOB"]["text"] and eph["UBOB"]["channel"] == "C0DBA"
    assert "not eligible" in eph["UDAVE"]["text"]
    assert [p["code"] for p in payloads(slack_home, request_id, "vote.refused")] == ["self_approval", "not_eligible"]
    assert [p["person"] for p in payloads(slack_home, request_id, "vote")] == ["alice", "carol"]
    assert terminal_events(slack_home, request_id) == ["executed"]
    assert slack_home.rows("SELECT salary FROM payroll") == [(1,)]


async def test_a_policy_that_wants_reasons_asks_for_one_on_approve_too(slack_home: Home, fake_slack: FakeSlack) -> None:
    base = slack_home.serve_http()
    seen: dict[str, str] = {}

    async def erin_approves() -> None:  # erin has no configured Slack identity: her e-mail maps her
        request_id, _ = await review_message(fake_slack, "needs_reason")
        seen["id"] = request_id
        await post_signed(base, block_action(request_id, "keyturn_approve", "UERIN", trigger_id="trig-why"))
        opened = await fake_slack.wait_for("views.open", lambda c: c.args["trigger_id"] == "trig-why")
        assert opened.args["view"]["submit"]["text"] == "Approve"
        await post_signed(base, view_submission(opened.args["view"]["private_metadata"], "ticket OPS-9", "UERIN"))

    result = await held_call(base, TOKENS["agent-ci"], "UPDATE orders SET qty = 4 -- needs_reason", erin_approves)
    assert not result.is_error, text(result)
    vote = payloads(slack_home, seen["id"], "vote")[0]
    assert (vote["person"], vote["reviewer"], vote["reason"]) == ("erin", "slack:T0KEYTURN/UERIN", "ticket OPS-9")
    assert terminal_events(slack_home, seen["id"]) == ["executed"]


async def test_when_slack_fails_the_call_stays_decidable_and_nothing_is_approved_by_the_failure(
        slack_home: Home, fake_slack: FakeSlack) -> None:
    fake_slack.fail("chat.postMessage", "500", "500", "500")  # the first try and both retries
    base = slack_home.serve_http()
    api = ReviewerAPI(base)
    seen: dict[str, Any] = {}

    async def approve_by_api() -> None:
        req = await api.wait_pending("sql_execute")
        seen["id"] = req["id"]
        await wait_until(lambda: bool(payloads(slack_home, req["id"], "notify.failed")), within_s=20)
        assert slack_home.rows("SELECT count(*) FROM orders") == [(3,)]  # a failure approves nothing
        r = await api.vote(req["id"], "approve", "alice", "slack is down, approving here")
        assert r.status_code == 200

    result = await held_call(base, TOKENS["agent-ci"], "DELETE FROM orders WHERE id = 3", approve_by_api)
    assert not result.is_error, text(result)
    failed = payloads(slack_home, seen["id"], "notify.failed")[0]
    assert failed["channel"] == "slack" and "fatal_error" in failed["error"]
    assert [c.status for c in fake_slack.of("chat.postMessage", ok_only=False)] == [500, 500, 500]
    assert terminal_events(slack_home, seen["id"]) == ["executed"]

    # Rate limited once (retried after Retry-After), then Slack hangs on every update: nobody waits for it.
    fake_slack.fail("chat.postMessage", "429")
    fake_slack.fail("chat.update", *["hang"] * 10)

    async def approve_while_slack_hangs() -> None:
        request_id, _ = await review_message(fake_slack, "id = 2")
        seen["id"] = request_id
        started = time.monotonic()
        r = await api.vote(request_id, "approve", "carol", "fine")
        assert r.status_code == 200 and time.monotonic() - started < 5  # an update would wait 10 s
        seen["approved_at"] = time.monotonic()

    result = await held_call(base, TOKENS["agent-ci"], "DELETE FROM orders WHERE id = 2", approve_while_slack_hangs)
    assert not result.is_error, text(result)
    assert time.monotonic() - seen["approved_at"] < 5  # the agent's result did not wait for Slack either
    assert 429 in [c.status for c in fake_slack.of("chat.postMessage", ok_only=False)]
    assert fake_slack.of("chat.update", ok_only=False)  # it was tried (and hung)
    assert terminal_events(slack_home, seen["id"]) == ["executed"]
    assert slack_home.rows("SELECT count(*) FROM orders") == [(1,)]


def test_a_slack_section_without_its_tokens_refuses_to_start(home: Home) -> None:
    home.write_config(slack={"default_channel": "#ops-approvals"})
    out = home.keyturn("serve", "--http", f"127.0.0.1:{free_port()}", "--config", str(home.config), timeout=30)
    assert out.returncode == 2, out.stderr
    assert "KEYTURN_SLACK_BOT_TOKEN" in out.stderr and "Traceback" not in out.stderr
    home.write_config(**slack_config(home, defualt_channel="#x"))
    out = home.keyturn("serve", "--http", f"127.0.0.1:{free_port()}", "--config", str(home.config), timeout=30)
    assert out.returncode == 2 and "slack.defualt_channel" in out.stderr


async def test_the_events_endpoint_is_not_there_without_slack(home: Home) -> None:
    base = home.serve_http()
    async with httpx2.AsyncClient() as http:
        r = await http.post(base + "/slack/events", content=b"payload=%7B%7D")
    assert r.status_code == 404


async def test_signed_checkpoints_reach_the_reviewers_channel_as_a_witness(slack_home: Home,
                                                                          fake_slack: FakeSlack) -> None:
    """A quiet line with the latest signed checkpoint in the Slack channel: a copy a rewrite of the ledger file
    cannot reach, that `keyturn audit verify --checkpoint` accepts."""
    slack_home.write_config(**slack_config(slack_home), checkpoints={"every_s": 0.2})
    base = slack_home.serve_http()
    async with httpx2.AsyncClient() as http:
        assert (await http.get(base + "/healthz")).status_code == 200
    post = await fake_slack.wait_for("chat.postMessage", lambda c: "keyturn ledger checkpoint" in message_text(c.args))
    assert post.args["channel"] == "#ops-approvals"
    line = message_text(post.args)
    checkpoint = json.loads(line[line.index("{"):line.index("}") + 1])
    witness = slack_home.dir / "from-slack.jsonl"
    witness.write_text(json.dumps(checkpoint) + "\n")
    key = line.rsplit("--public-key ", 1)[1].rstrip(")")
    out = slack_home.keyturn("audit", "verify", "--config", str(slack_home.config), "--checkpoint", str(witness),
                             "--public-key", key)
    assert out.returncode == 0, out.stdout + out.stderr
    # Daily, not on every checkpoint: later checkpoints do not post again.
    assert len([c for c in fake_slack.of("chat.postMessage") if "keyturn ledger checkpoint" in message_text(c.args)]) == 1


async def test_an_approver_changes_their_mind_with_a_signed_deny_and_a_deny_stays_final(
        slack_home: Home, fake_slack: FakeSlack) -> None:
    base = slack_home.serve_http()
    seen: dict[str, Any] = {}

    async def alice_approves_then_denies() -> None:
        request_id, message = await review_message(fake_slack, "payroll")
        seen["id"] = request_id
        assert "2 approvals from group:dba (different people)" in message_text(message)  # not "1 of 1 + 1 of 1"
        await post_signed(base, block_action(request_id, "keyturn_approve", "UALICE", channel="C0DBA"))
        await wait_until(lambda: len(payloads(slack_home, request_id, "vote")) == 1)
        await fake_slack.wait_for("chat.update", lambda c: "1 of 2 approvals" in message_text(c.args))
        await post_signed(base, block_action(request_id, "keyturn_deny", "UALICE", channel="C0DBA",
                                             trigger_id="trig-change"))
        opened = await fake_slack.wait_for("views.open", lambda c: c.args["trigger_id"] == "trig-change")
        r = await post_signed(base, view_submission(opened.args["view"]["private_metadata"],
                                                    "the raise is not signed off", "UALICE"))
        assert r.status_code == 200, r.text

    result = await held_call(base, TOKENS["agent-bob"], "UPDATE payroll SET salary = 1", alice_approves_then_denies)
    assert result.is_error and "alice" in text(result) and "the raise is not signed off" in text(result)
    assert slack_home.rows("SELECT salary FROM payroll") == [(100,)]
    request_id = seen["id"]
    votes = payloads(slack_home, request_id, "vote")
    assert [(v["person"], v["verdict"], v.get("changed_from"), v["channel"]) for v in votes] == [
        ("alice", "approve", None, "slack"), ("alice", "deny", "approve", "slack")]
    assert terminal_events(slack_home, request_id) == ["denied"]
    await fake_slack.wait_for("chat.update", lambda c: "Denied" in message_text(c.args)
                              and "keyturn_approve" not in message_text(c.args))
    # A deny stays final: a signed approve afterwards, from alice or carol, is refused and recorded.
    for user in ("UALICE", "UCAROL"):
        await post_signed(base, block_action(request_id, "keyturn_approve", user, channel="C0DBA"))
        await fake_slack.wait_for("chat.postEphemeral", lambda c, u=user: c.args["user"] == u
                                  and "not pending" in c.args["text"])
    assert [p["code"] for p in payloads(slack_home, request_id, "vote.refused")] == ["not_pending", "not_pending"]
    assert terminal_events(slack_home, request_id) == ["denied"]


async def test_edit_and_approve_through_the_modal_runs_the_edited_call_and_the_agent_is_told(
        slack_home: Home, fake_slack: FakeSlack) -> None:
    base = slack_home.serve_http()
    seen: dict[str, Any] = {}

    async def alice_edits() -> None:
        request_id, _ = await review_message(fake_slack, "DELETE FROM orders")
        seen["id"] = request_id
        r = await post_signed(base, block_action(request_id, "keyturn_edit", "UALICE", trigger_id="trig-edit"))
        assert r.status_code == 200, r.text
        opened = await fake_slack.wait_for("views.open", lambda c: c.args["trigger_id"] == "trig-edit")
        modal = opened.args["view"]
        assert modal["callback_id"] == "keyturn_edit"
        assert '"statement": "DELETE FROM orders"' in modal["blocks"][1]["element"]["initial_value"]
        meta = modal["private_metadata"]
        # What the reviewer can fix is said in the dialog: not JSON, a call the policy denies.
        bad = await post_signed(base, edit_submission(meta, "DELETE FROM orders WHERE", "narrow", "UALICE"))
        assert bad.status_code == 200 and bad.json()["response_action"] == "errors"
        assert "JSON object" in bad.json()["errors"]["arguments"]
        drop = await post_signed(base, edit_submission(meta, '{"statement": "DROP TABLE orders"}', "drop", "UALICE"))
        assert drop.json()["response_action"] == "errors" and "denied by policy" in drop.json()["errors"]["arguments"]
        no_reason = await post_signed(base, edit_submission(meta, '{"statement": "DELETE FROM orders WHERE id = 2"}',
                                                            " ", "UALICE"))
        assert no_reason.json()["response_action"] == "errors" and "reason" in no_reason.json()["errors"]
        assert slack_home.rows("SELECT count(*) FROM orders") == [(3,)]
        ok = await post_signed(base, edit_submission(meta, '{"statement": "DELETE FROM orders WHERE id = 2"}',
                                                     "only the pear order", "UALICE"))
        assert ok.status_code == 200 and not ok.content, ok.text
        # The same submission again (a replay) is refused: the request is no longer pending for it.
        again = await post_signed(base, edit_submission(meta, '{"statement": "DELETE FROM orders WHERE id = 3"}',
                                                        "and the plum", "UALICE"))
        assert again.status_code == 200
        await fake_slack.wait_for("chat.postEphemeral", lambda c: "not counted" in str(c.args.get("text")))

    result = await held_call(base, TOKENS["agent-ci"], "DELETE FROM orders", alice_edits)
    assert not result.is_error, text(result)
    assert "alice changed the arguments" in text(result) and "only the pear order" in text(result)
    assert slack_home.rows("SELECT item FROM orders ORDER BY id") == [("apple",), ("plum",)]
    request_id = seen["id"]
    edited = payloads(slack_home, request_id, "arguments.edited")
    assert len(edited) == 1 and edited[0]["channel"] == "slack"
    assert edited[0]["reviewer"] == "slack:T0KEYTURN/UALICE" and edited[0]["reason"] == "only the pear order"
    assert edited[0]["arguments"] == {"statement": "DELETE FROM orders WHERE id = 2"}
    refused = [p["code"] for p in payloads(slack_home, request_id, "vote.refused")]
    assert refused == ["denied_by_policy", "not_pending"]
    assert terminal_events(slack_home, request_id) == ["executed"]
    await fake_slack.wait_for("chat.update", lambda c: "Approved and executed" in message_text(c.args))
    await fake_slack.wait_for("chat.postMessage", lambda c: c.args.get("thread_ts") is not None
                              and "alice edited the arguments: only the pear order" in c.args["text"])
