"""The Slack channel in one process: a real ledger and broker, Bolt behind Starlette, the fake Slack API."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from starlette.applications import Starlette

from server.approvals import ApprovalBroker, ReviewerDirectory
from server.approvals.grants import GrantSpec, ProposedGrant
from server.channels.slack.channel import SlackChannel
from server.channels.slack.config import SlackConfig, SlackSecrets
from server.config import Person, Reviewer, Settings
from server.errors import ChannelError
from server.ledger import Ledger
from server.models import ApproverGroup, RequestView, ReviewSpec, Verdict
from tests.channels.slack.fake_slack import APP_TOKEN, BOT_TOKEN, SIGNING_SECRET, TEAM, FakeSlack
from tests.channels.slack.fake_socket import FakeSocketMode
from tests.channels.slack.interactions import block_action, message_text, signed, view_submission
from tests.helpers import eventually, until_event

SETTINGS = Settings(
    people={"alice": Person(groups=("dba",)), "carol": Person(groups=("dba",)), "bob": Person(),
            "erin": Person(groups=("dba",), email="erin@example.com")},
    reviewers=(Reviewer(identity=f"slack:{TEAM}/UALICE", person="alice"),
               Reviewer(identity=f"slack:{TEAM}/UCAROL", person="carol"),
               Reviewer(identity=f"slack:{TEAM}/UBOB", person="bob"),
               Reviewer(identity="api:carol", person="carol")),
)
DBA2 = ReviewSpec(groups=(ApproverGroup(name="dba", members=("group:dba",), quorum=2),))


@dataclass
class Rig:
    ledger: Ledger
    broker: ApprovalBroker
    channel: SlackChannel
    fake: FakeSlack
    http: httpx2.AsyncClient

    async def hold(self, request_id: str, review: ReviewSpec | None = None, principal: str = "agent-ci",
                   on_behalf_of: str | None = None) -> RequestView:
        await self.ledger.open_call(
            call_id=request_id, tool="sql_execute", principal=principal, on_behalf_of=on_behalf_of, model="m1",
            args_hash="0" * 64, redacted_arguments={"statement": "DELETE FROM orders -- «redacted»"},
            state="pending", holder=self.broker.instance_id, risk="high", reason="writes need a human",
            rules=[{"id": "writes", "outcome": "review", "risk": "high", "reason": "writes need a human"}],
            review=review or ReviewSpec(), policy_digest="p" * 64, expires=time.time() + 600,
            events=[("call.received", {"tool": "sql_execute"}), ("approval.requested", {})])
        view = await self.ledger.get_call(request_id)
        assert view is not None
        await self.broker.announce(view)
        return view

    async def kinds(self, request_id: str) -> list[str]:
        return [e.kind for e in await self.ledger.events(request_id)]

    async def wait_kind(self, request_id: str, kind: str) -> None:
        """Bolt acknowledges first and decides after: wait for the ledger to show it."""
        await until_event(self.ledger, request_id, kind)

    async def click(self, payload: dict[str, Any], **kwargs: Any) -> httpx2.Response:
        body, headers = signed(payload, **kwargs)
        return await self.http.post("http://keyturn.test/slack/events", content=body, headers=headers)


def make_channel(ledger: Ledger, broker: ApprovalBroker, url: str, **config: Any) -> SlackChannel:
    cfg = SlackConfig(**{"default_channel": "#ops-approvals", "post_timeout_s": 3, "retry_backoff_s": 0.01,
                         "map_email": True, **config})
    return SlackChannel(ledger=ledger, broker=broker, settings=SETTINGS, config=cfg,
                        secrets=SlackSecrets(BOT_TOKEN, SIGNING_SECRET, None, url))


@pytest.fixture
async def rig(tmp_path: Path, fake_slack: FakeSlack) -> AsyncIterator[Rig]:
    ledger = await Ledger(tmp_path / "ledger.db").open()
    directory = ReviewerDirectory(identities={r.identity: r.person for r in SETTINGS.reviewers},
                                  groups_of={n: frozenset(p.groups) for n, p in SETTINGS.people.items()})
    broker = ApprovalBroker(ledger=ledger, directory=directory)
    channel = make_channel(ledger, broker, fake_slack.url)
    broker.notifiers.append(channel)
    await channel.catch_up()
    app = Starlette(routes=channel.routes())
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app)) as http:
        yield Rig(ledger, broker, channel, fake_slack, http)
    await ledger.close()


async def test_a_held_request_is_posted_and_its_message_recorded_in_the_ledger(rig: Rig) -> None:
    await rig.hold("r1")
    post = rig.fake.of("chat.postMessage")[0]
    assert post.args["channel"] == "#ops-approvals" and post.token == BOT_TOKEN
    assert "DELETE FROM orders" in message_text(post.args) and "keyturn_approve" in message_text(post.args)
    notified = [e.payload for e in await rig.ledger.events("r1") if e.kind == "notified"]
    assert notified[0] == {"channel": "slack", "slack_channel": "C0OPS", "ts": notified[0]["ts"],
                           "target": "#ops-approvals"}
    assert notified[1] == {"channel": "slack"}  # the broker's own record of the delivery


async def test_targets_follow_the_rule_then_the_default_and_dm_eligible_reviewers(rig: Rig) -> None:
    view = await rig.hold("r1", DBA2.model_copy(update={"channels": ("slack:#dba", "teams:ops", "slack:@U0X")}))
    assert rig.channel.targets(view) == ["#dba", "U0X"]
    assert rig.channel.targets(view.model_copy(update={"review": ReviewSpec()})) == ["#ops-approvals"]
    dm = view.model_copy(update={"review": DBA2.model_copy(update={"channels": ("slack:reviewers", "slack")})})
    assert rig.channel.targets(dm) == ["UALICE", "UCAROL", "#ops-approvals"]  # bob is not a DBA
    selfish = dm.model_copy(update={"on_behalf_of": "alice"})
    assert "UALICE" not in rig.channel.targets(selfish)  # never ask the requester


async def test_votes_and_the_outcome_update_the_message_in_place_and_in_its_thread(rig: Rig) -> None:
    await rig.hold("r1", DBA2)
    notified = next(e.payload for e in await rig.ledger.events("r1") if e.payload.get("ts"))
    await rig.broker.decide(Verdict(request_id="r1", reviewer=f"slack:{TEAM}/UALICE", verdict="approve"))
    await rig.channel.catch_up()
    update = rig.fake.of("chat.update")[-1]
    assert (update.args["channel"], update.args["ts"]) == ("C0OPS", notified["ts"])
    assert "*alice*" in message_text(update.args) and "keyturn_approve" in message_text(update.args)  # still open
    await rig.broker.decide(Verdict(request_id="r1", reviewer="api:carol", verdict="approve", reason="ok"))
    await rig.channel.catch_up()
    final = rig.fake.of("chat.update")[-1]
    assert "Approved" in message_text(final.args) and "keyturn_approve" not in message_text(final.args)
    thread = [c.args["text"] for c in rig.fake.of("chat.postMessage") if c.args.get("thread_ts")]
    assert thread == [":white_check_mark: alice approved", ":white_check_mark: carol approved: ok",
                      ":key: Approved by alice, carol; it may run now."]
    assert {c.args["thread_ts"] for c in rig.fake.of("chat.postMessage") if c.args.get("thread_ts")} == {
        notified["ts"]}
    updates = len(rig.fake.of("chat.update"))
    await rig.channel.catch_up()
    assert len(rig.fake.of("chat.update")) == updates  # nothing changed, nothing sent


async def test_a_process_that_did_not_post_finds_the_message_through_the_ledger(rig: Rig) -> None:
    await rig.hold("r1")
    other = make_channel(rig.ledger, rig.broker, rig.fake.url)  # knows nothing of the post
    await other.catch_up()
    assert await rig.broker.expire("r1")
    await other.catch_up()
    update = rig.fake.of("chat.update")[-1]
    notified = next(e.payload for e in await rig.ledger.events("r1") if e.payload.get("ts"))
    assert (update.args["channel"], update.args["ts"]) == (notified["slack_channel"], notified["ts"])
    assert "Expired" in message_text(update.args)
    assert not [c for c in rig.fake.of("chat.postMessage") if c.args.get("thread_ts")]  # replies: the poster's job
    await rig.channel.catch_up()
    replies = [c.args["text"] for c in rig.fake.of("chat.postMessage") if c.args.get("thread_ts")]
    assert len(replies) == 1 and "Expired" in replies[0]


async def test_rate_limits_and_server_errors_are_retried(rig: Rig) -> None:
    rig.fake.fail("chat.postMessage", "429", "500")
    with anyio.fail_after(10):
        await rig.hold("r1")
    attempts = [c.status for c in rig.fake.of("chat.postMessage", ok_only=False)]
    assert attempts == [429, 500, 200]
    assert "notify.failed" not in await rig.kinds("r1")


async def test_a_post_that_keeps_failing_is_recorded_and_nothing_is_approved(rig: Rig) -> None:
    rig.fake.fail("chat.postMessage", *["500"] * 10)
    await rig.hold("r1")
    kinds = await rig.kinds("r1")
    failed = [e.payload for e in await rig.ledger.events("r1") if e.kind == "notify.failed"]
    assert "notified" not in kinds and "fatal_error" in failed[0]["error"]
    assert (await rig.ledger.get_call("r1")).state == "pending"  # type: ignore[union-attr]
    result = await rig.broker.decide(Verdict(request_id="r1", reviewer="api:carol", verdict="approve"))
    assert result.state == "approved"  # still decidable through the other channels


async def test_a_hanging_slack_never_holds_up_a_decision_and_posts_are_bounded(rig: Rig) -> None:
    rig.channel.config = rig.channel.config.model_copy(update={"post_timeout_s": 1.0})
    await rig.hold("r1")
    rig.fake.fail("chat.update", "hang")
    with anyio.fail_after(3):  # far below the 30 s the fake hangs for
        await rig.broker.decide(Verdict(request_id="r1", reviewer="api:carol", verdict="approve"))
    with anyio.fail_after(5):
        await rig.channel.catch_up()  # gives up after post_timeout_s, keeps the update for later
    rig.fake.release.set()
    await rig.channel.catch_up()
    assert "Approved" in message_text(rig.fake.of("chat.update")[-1].args)
    rig.fake.release.clear()
    rig.fake.fail("chat.postMessage", "hang")
    started = time.monotonic()
    with pytest.raises(ChannelError, match="did not answer in time"):
        await rig.channel.request_opened(await rig.ledger.get_call("r1"))  # type: ignore[arg-type]
    assert time.monotonic() - started < 5
    rig.fake.release.set()


async def test_a_signed_click_is_a_vote_by_the_slack_identity(rig: Rig) -> None:
    await rig.hold("r1")
    r = await rig.click(block_action("r1", "keyturn_approve", "UALICE"))
    assert r.status_code == 200
    await rig.wait_kind("r1", "approval.granted")
    vote = next(e.payload for e in await rig.ledger.events("r1") if e.kind == "vote")
    assert (vote["reviewer"], vote["person"], vote["channel"]) == (f"slack:{TEAM}/UALICE", "alice", "slack")


async def test_forged_and_stale_requests_are_rejected_before_anything_runs(rig: Rig) -> None:
    await rig.hold("r1")
    forged = await rig.click(block_action("r1", "keyturn_approve", "UALICE"), secret="not-the-secret")
    stale = await rig.click(block_action("r1", "keyturn_approve", "UALICE"), timestamp=int(time.time()) - 301)
    unsigned = await rig.http.post("http://keyturn.test/slack/events", content=b"payload=%7B%7D",
                                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert (forged.status_code, stale.status_code, unsigned.status_code) == (401, 401, 401)
    assert not {"vote", "vote.refused"} & set(await rig.kinds("r1"))
    assert rig.fake.of("auth.test") == []  # rejected before authorisation


async def test_deny_asks_for_a_reason_in_a_modal_then_denies(rig: Rig) -> None:
    await rig.hold("r1")
    await rig.click(block_action("r1", "keyturn_deny", "UCAROL", trigger_id="trig-77"))
    opened = await rig.fake.wait_for("views.open")
    assert opened.args["trigger_id"] == "trig-77"
    metadata = opened.args["view"]["private_metadata"]
    assert json.loads(metadata) == {"r": "r1", "v": "deny", "c": "C0OPS"}
    blank = await rig.click(view_submission(metadata, "   ", "UCAROL"))
    assert blank.json() == {"response_action": "errors", "errors": {"reason": blank.json()["errors"]["reason"]}}
    ok = await rig.click(view_submission(metadata, "not during the sale", "UCAROL"))
    assert ok.status_code == 200 and not ok.content
    await rig.wait_kind("r1", "denied")
    denied = next(e.payload for e in await rig.ledger.events("r1") if e.kind == "denied")
    assert (denied["person"], denied["reason"]) == ("carol", "not during the sale")


async def test_refusals_are_recorded_and_explained_to_the_clicker_only(rig: Rig) -> None:
    await rig.hold("r1", principal="agent-bob", on_behalf_of="bob")
    await rig.click(block_action("r1", "keyturn_approve", "UBOB"))
    await rig.click(block_action("r1", "keyturn_approve", "UNOBODY"))
    await rig.fake.wait_for("chat.postEphemeral", lambda c: c.args["user"] == "UNOBODY")
    eph = {c.args["user"]: c.args for c in rig.fake.of("chat.postEphemeral")}
    assert "cannot approve or deny its own request" in eph["UBOB"]["text"] and eph["UBOB"]["channel"] == "C0OPS"
    assert "not a configured reviewer" in eph["UNOBODY"]["text"]
    refused = [e.payload for e in await rig.ledger.events("r1") if e.kind == "vote.refused"]
    assert sorted(p["code"] for p in refused) == ["self_approval", "unknown_reviewer"]
    assert (await rig.ledger.get_call("r1")).state == "pending"  # type: ignore[union-attr]


async def test_an_unmapped_user_counts_as_the_person_whose_email_matches(rig: Rig) -> None:
    await rig.hold("r1", DBA2)
    await rig.click(block_action("r1", "keyturn_approve", "UERIN"))
    await rig.wait_kind("r1", "vote")
    vote = next(e.payload for e in await rig.ledger.events("r1") if e.kind == "vote")
    assert (vote["reviewer"], vote["person"]) == (f"slack:{TEAM}/UERIN", "erin")
    assert rig.fake.of("users.info")[0].args["user"] == "UERIN"
    await rig.click(block_action("r1", "keyturn_approve", "UGUEST"))  # a guest account with the same e-mail
    await rig.fake.wait_for("chat.postEphemeral", lambda c: c.args["user"] == "UGUEST")
    assert rig.broker.directory.person(f"slack:{TEAM}/UGUEST") is None
    refused = await rig.broker.decide(Verdict(request_id="r1", reviewer=f"slack:{TEAM}/UGUEST", verdict="approve"))
    assert not refused.accepted and "not a configured reviewer" in refused.message


async def test_socket_mode_receives_clicks_without_a_public_url(tmp_path: Path, fake_slack: FakeSlack) -> None:
    socket = FakeSocketMode().start()
    fake_slack.socket_url = socket.url
    async with Ledger(tmp_path / "socket.db") as ledger, httpx2.AsyncClient() as http:
        directory = ReviewerDirectory(identities={r.identity: r.person for r in SETTINGS.reviewers},
                                      groups_of={n: frozenset(p.groups) for n, p in SETTINGS.people.items()})
        broker = ApprovalBroker(ledger=ledger, directory=directory)
        channel = SlackChannel(ledger=ledger, broker=broker, settings=SETTINGS,
                               config=SlackConfig(default_channel="#ops-approvals", socket_mode=True),
                               secrets=SlackSecrets(BOT_TOKEN, None, APP_TOKEN, fake_slack.url))
        broker.notifiers.append(channel)
        assert channel.routes() == []  # no signing secret: no HTTP way in at all
        try:
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(channel.run)
                    await socket.wait_connected()
                    rig = Rig(ledger, broker, channel, fake_slack, http)
                    await rig.hold("r1")
                    socket.push({"envelope_id": "env-1", "type": "interactive", "accepts_response_payload": True,
                                 "payload": block_action("r1", "keyturn_approve", "UCAROL")})
                    await rig.wait_kind("r1", "approval.granted")
                    await eventually(lambda: socket.acks)
                    await fake_slack.wait_for("chat.update", lambda c: "Approved" in message_text(c.args))
                    tg.cancel_scope.cancel()
        finally:
            socket.stop()
    assert socket.acks[0]["envelope_id"] == "env-1"
    assert fake_slack.of("apps.connections.open")[0].token == APP_TOKEN


def revoke_submission(metadata: str, reason: str, user: str) -> dict[str, Any]:
    payload = view_submission(metadata, reason, user)
    payload["view"]["callback_id"] = "keyturn_revoke_grant"
    return payload


async def test_a_grant_is_announced_in_its_requests_thread_and_revoked_with_its_button(rig: Rig) -> None:
    await rig.hold("r1")
    message = next(e.payload for e in await rig.ledger.events("r1") if e.payload.get("ts"))
    grant = ProposedGrant(spec=GrantSpec(600, 3), conditions=('args == {"statement": "DELETE FROM orders"}',),
                          rules=("writes",), risk="high", review=ReviewSpec().model_dump(mode="json"),
                          policy_digest="p" * 64)
    result = await rig.broker.decide(Verdict(request_id="r1", reviewer=f"slack:{TEAM}/UALICE", verdict="approve"),
                                     grant=grant)
    assert result.accepted and "standing grant" in result.message, result
    (row,) = await rig.ledger.grants()
    await rig.channel.catch_up()
    reply = await rig.fake.wait_for("chat.postMessage", lambda c: c.args.get("thread_ts") == message["ts"]
                                    and "keyturn_revoke_grant" in message_text(c.args))
    shown = message_text(reply.args)
    assert row["id"] in shown and "alice" in shown and "up to 3 more call(s)" in shown
    assert reply.args["channel"] == message["slack_channel"]

    # A forged click revokes nothing; a signed one opens the reason dialog; a blank reason is refused there.
    forged = await rig.click(block_action(row["id"], "keyturn_revoke_grant", "UCAROL"), secret="not-the-secret")
    assert forged.status_code == 401
    await rig.click(block_action(row["id"], "keyturn_revoke_grant", "UCAROL", trigger_id="trig-9"))
    opened = await rig.fake.wait_for("views.open", lambda c: c.args["trigger_id"] == "trig-9")
    assert opened.args["view"]["callback_id"] == "keyturn_revoke_grant"
    metadata = opened.args["view"]["private_metadata"]
    blank = await rig.click(revoke_submission(metadata, "  ", "UCAROL"))
    assert blank.json()["response_action"] == "errors"
    assert (await rig.ledger.grant(row["id"]))["state"] == "live"  # type: ignore[index]
    # Someone who is not a reviewer cannot revoke; a reviewer can, and it is chained with who and why.
    await rig.click(revoke_submission(metadata, "mine now", "UNOBODY"))
    await rig.fake.wait_for("chat.postEphemeral", lambda c: c.args["user"] == "UNOBODY")
    ok = await rig.click(revoke_submission(metadata, "the migration is done", "UCAROL"))
    assert ok.status_code == 200
    events = await until_event(rig.ledger, row["id"], "grant.revoked")
    revoked = next(e.payload for e in events if e.kind == "grant.revoked")
    assert (revoked["person"], revoked["reviewer"], revoked["channel"], revoked["reason"]) == (
        "carol", f"slack:{TEAM}/UCAROL", "slack", "the migration is done")
    await rig.fake.wait_for("chat.postEphemeral", lambda c: c.args["user"] == "UCAROL" and "revoked" in c.args["text"])
    again = await rig.click(revoke_submission(metadata, "twice", "UCAROL"))
    assert again.status_code == 200
    await rig.fake.wait_for("chat.postEphemeral", lambda c: "not live" in c.args["text"])
    assert [e.kind for e in await rig.ledger.events(row["id"])] == ["grant.created", "grant.revoked"]
