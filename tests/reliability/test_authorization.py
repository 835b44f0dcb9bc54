"""Who may decide, through every channel at once (JSON API, Slack, Teams bot, Teams decision link, web inbox).

The requester (an agent acting for bob) never decides its own call, whichever of bob's identities votes and
whatever the agent sends; a reviewer outside the rule's groups is refused; one person counts once toward a
quorum whatever channels they use, and a token speaks only for its own reviewer; a replayed decision and a
decision on an expired request are refused; racing decisions resolve the request exactly once.
Slack and Teams replays of the very same signed request are in tests/channels/slack and tests/channels/teams (e2e).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import httpx2
import pytest

from tests.conftest import TOKENS, ReviewerAPI, agent_client
from tests.helpers import eventually, outcome_of
from tests.reliability.channels import CHANNELS, Reviewers, configure_all_channels, fake_services, hold, pending_request
from tests.reliability.conftest import TERMINAL, RelHome, text


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reviewers]:
    d = tmp_path_factory.mktemp("authz")
    home = RelHome(dir=d, config=d / "keyturn.yaml", db=d / "ledger.db", data_db=d / "app.db")
    (d / "work").mkdir()
    with fake_services() as (slack, teams):
        configure_all_channels(home, slack, teams, tools=[
            {"module": "tools.http", "options": {"allow_hosts": ["127.0.0.1", "localhost"]}},
            {"module": "tools.shell", "options": {"cwd_roots": [str(d / "work")]}},
            {"module": "tools.files", "options": {"roots": [str(d / "work")]}}])
        try:
            yield Reviewers(home, home.serve_http(), slack, teams)
        finally:
            home.stop_all()


def outcome_events(world: Reviewers, request_id: str) -> list[str]:
    return [e["kind"] for e in world.home.ledger_events(request_id) if e["kind"] in TERMINAL]


async def test_the_requester_cannot_decide_its_own_call_through_any_channel_or_any_tool(world: Reviewers) -> None:
    results: dict[str, Any] = {}
    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold, world.home, world.base, "agent-bob", "probe_run", {"tag": "hold-self"}, results, "call")
            request_id = await pending_request(world.home, "hold-self")
            for channel in CHANNELS:  # bob is the person agent-bob acts for
                for verdict in ("approve", "deny"):
                    vote = await world.vote(channel, "bob", request_id, verdict, "it's mine")
                    assert (vote.accepted, vote.code) == (False, "self_approval"), (channel, verdict, vote)
            # The agent itself: its token is not a reviewer token, and no tool call can reach the reviewer API.
            api = ReviewerAPI(world.base)
            r = await api.request("POST", f"/api/requests/{request_id}/approve", "agent-bob", {"reason": "me"})
            assert r.status_code == 401
            async with agent_client(world.base, TOKENS["agent-bob"]) as agent:
                attempts = {
                    "http_request": {"method": "POST", "url": f"{world.base}/api/requests/{request_id}/approve",
                                     "headers": {"Authorization": f"Bearer {TOKENS['alice']}"}, "body": "{}"},
                    "shell_run": {"command": f"keyturn approve {request_id} --reason mine"},
                    "files_write": {"path": str(world.home.db), "content": "x", "overwrite": True},
                }
                for tool, args in attempts.items():
                    attempt = await agent.call_tool(tool, args)
                    if tool == "shell_run":  # keyturn's built-in self-target guard
                        assert attempt.is_error and outcome_of(attempt)["outcome"] == "denied", (tool, text(attempt))
                        assert outcome_of(attempt)["rules"] == ["keyturn:self-target"], outcome_of(attempt)
                    else:  # the structure: a loopback address, a path outside the roots
                        assert attempt.is_error and outcome_of(attempt)["code"] == "invalid_arguments", (tool, text(attempt))
            assert world.home.calls()[request_id] == "pending"
            assert (await world.vote("teams", "alice", request_id, "approve", "the right person")).accepted
    assert not results["call"].is_error
    assert outcome_events(world, request_id) == ["executed"]
    assert [r["tag"] for r in world.home.runs()].count("hold-self") == 1


async def test_a_reviewer_outside_the_rules_groups_is_refused_on_every_channel(world: Reviewers) -> None:
    results: dict[str, Any] = {}
    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold, world.home, world.base, "agent-ci", "probe_run", {"tag": "dba-groups"}, results, "call")
            request_id = await pending_request(world.home, "dba-groups")
            for channel in CHANNELS:
                vote = await world.vote(channel, "dave", request_id, "approve", "not a DBA")  # dave has no groups
                assert (vote.accepted, vote.code) == (False, "not_eligible"), (channel, vote)
            assert world.home.calls()[request_id] == "pending"
            assert (await world.vote("slack", "carol", request_id, "deny", "a DBA says no")).accepted
    assert results["call"].is_error and "a DBA says no" in text(results["call"])
    assert outcome_events(world, request_id) == ["denied"]


async def test_one_person_counts_once_whatever_channel_and_a_token_speaks_only_for_its_reviewer(
        world: Reviewers) -> None:
    results: dict[str, Any] = {}
    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold, world.home, world.base, "agent-ci", "probe_run", {"tag": "two-quorum"}, results, "call")
            request_id = await pending_request(world.home, "two-quorum")  # needs two distinct DBAs
            first = await world.vote("api", "alice", request_id, "approve", "one")
            assert first.accepted and world.home.calls()[request_id] == "pending"
            for channel in ("slack", "teams", "web", "link"):
                again = await world.vote(channel, "alice", request_id, "approve", "alice again")
                assert (again.accepted, again.code) == (False, "duplicate"), (channel, again)
            # alice's token, claiming in the body to be carol: a body with fields keyturn does not know is refused,
            # naming them, before anything is judged (never ignored); nothing is recorded for carol.
            async with httpx2.AsyncClient(base_url=world.base, timeout=30) as http:
                claim = await http.post(f"/api/requests/{request_id}/approve", json={
                    "reason": "as carol", "reviewer": "api:carol", "person": "carol", "identity": "api:carol"},
                    headers={"Authorization": f"Bearer {TOKENS['alice']}"})
            assert claim.status_code == 400 and claim.json()["fields"] == ["identity", "person", "reviewer"]
            # With a body keyturn knows, alice's token speaks for alice (refused as her second vote).
            forged = await world.vote("api", "alice", request_id, "approve", "as carol")
            assert (forged.accepted, forged.payload["person"], forged.code) == (False, "alice", "duplicate")
            assert not any(e["payload"].get("person") == "carol" for e in world.home.ledger_events(request_id))
            assert world.home.calls()[request_id] == "pending"
            second = await world.vote("link", "carol", request_id, "approve", "two")
            assert second.accepted
    assert not results["call"].is_error
    kinds = [e["kind"] for e in world.home.ledger_events(request_id)]
    assert kinds.count("approval.granted") == 1 and kinds.count("execution.started") == 1
    granted = next(e for e in world.home.ledger_events(request_id) if e["kind"] == "approval.granted")
    assert granted["payload"]["approvers"] == ["alice", "carol"]


async def test_replayed_decisions_are_refused(world: Reviewers) -> None:
    results: dict[str, Any] = {}
    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold, world.home, world.base, "agent-ci", "probe_run", {"tag": "hold-replay"}, results, "c")
            request_id = await pending_request(world.home, "hold-replay")
            url = world.link(request_id)
            nonce = await world.link_form(url)  # alice opened the link while it was pending
            async with world.web_session("carol") as web:
                csrf = await world.web_form(web, request_id)
                form = {"csrf": csrf, "verdict": "approve", "reason": "web", "back": "request"}
                first = await web.post(f"/inbox/requests/{request_id}/vote", data=form)
                assert first.status_code == 303  # accepted: the request is approved and runs
                replay = await web.post(f"/inbox/requests/{request_id}/vote", data=form)
                assert replay.status_code == 409 and "not pending" in replay.text
            await eventually(lambda: "c" in results)
            api_replay = await ReviewerAPI(world.base).vote(request_id, "approve", "carol", "web")
            assert api_replay.status_code == 409
            link = await world.vote("link", "alice", request_id, "approve", "late", url=url, nonce=nonce)
            assert (link.accepted, link.code) == (False, "not_pending")
    assert not results["c"].is_error
    assert outcome_events(world, request_id) == ["executed"]
    assert [e["kind"] for e in world.home.ledger_events(request_id)].count("vote") == 1


async def test_decisions_on_an_expired_request_are_refused_on_every_channel(world: Reviewers) -> None:
    results: dict[str, Any] = {}
    with anyio.fail_after(120):
        await hold(world.home, world.base, "agent-ci", "probe_run", {"tag": "expire-late"}, results, "call")
    assert outcome_of(results["call"])["outcome"] == "expired"
    request_id = outcome_of(results["call"])["request_id"]
    for channel in CHANNELS:
        if channel == "link":
            continue  # a link never outlives its request: below
        vote = await world.vote(channel, "alice", request_id, "approve", "too late")
        assert (vote.accepted, vote.code) == (False, "not_pending"), (channel, vote)
    shown = await ReviewerAPI(world.base).request("GET", f"/api/requests/{request_id}", "alice")
    expires = shown.json()["request"]["expires"]  # links are minted to expire with their request at the latest
    async with httpx2.AsyncClient(timeout=30) as http:
        page = await http.get(world.link(request_id, expires=expires))
    assert page.status_code == 410
    assert outcome_events(world, request_id) == ["expired"]
    assert "hold-late" not in [r["tag"] for r in world.home.runs()]


@pytest.mark.parametrize("tag", ["hold-race-1", "hold-race-2", "two-race"])
async def test_racing_decisions_through_five_channels_resolve_the_request_exactly_once(
        world: Reviewers, tag: str) -> None:
    results: dict[str, Any] = {}
    voters = [("api", "alice", "approve"), ("teams", "carol", "deny"), ("slack", "alice", "approve"),
              ("web", "dave", "deny"), ("link", "carol", "approve")]
    votes: list[Any] = []
    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold, world.home, world.base, "agent-ci", "probe_run", {"tag": tag}, results, "call")
            request_id = await pending_request(world.home, tag)
            url = world.link(request_id)
            opened = {"url": url, "nonce": await world.link_form(url)}  # the link's page is open before the race

            async def cast(channel: str, person: str, verdict: str) -> None:
                extra = opened if channel == "link" else {}
                votes.append(await world.vote(channel, person, request_id, verdict, f"{channel} says {verdict}",
                                              **extra))

            async with anyio.create_task_group() as race:
                for voter in voters:
                    race.start_soon(cast, *voter)
    accepted = [v for v in votes if v.accepted]
    terminal = outcome_events(world, request_id)
    assert len(terminal) == 1, terminal
    kinds = [e["kind"] for e in world.home.ledger_events(request_id)]
    assert kinds.count("approval.granted") <= 1 and kinds.count("execution.started") <= 1
    ran = [r["tag"] for r in world.home.runs()].count(tag)
    if terminal == ["executed"]:
        assert ran == 1 and not results["call"].is_error
        assert "denied" not in kinds
    else:
        assert terminal == ["denied"] and ran == 0 and results["call"].is_error
        assert sum(1 for v in accepted if v.payload["verdict"] == "deny") == 1
    for v in votes:
        assert v.accepted or v.code in ("not_pending", "duplicate", "not_eligible"), v
