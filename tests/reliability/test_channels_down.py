"""Slack and Teams down or slow, both at once: their APIs hang (a fake Slack that never answers, a Bot Connector
that accepts connections and says nothing) or fail (5xx, 429 with Retry-After). Held calls stay held and
decidable through the HTTP API, calls whose time runs out expire (recorded as `expired`, never as a human's
denial), and no vote or approval appears that no reviewer gave.

The channels' own suites cover one channel at a time (tests/channels/slack/test_slack_e2e.py: 500, 429 and hung
updates; tests/channels/teams/test_bot_e2e.py: a 503 outage); these run the gate through both failing together.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from tests.channels.slack.conftest import slack_config, slack_env
from tests.channels.slack.fake_slack import FakeSlack
from tests.channels.teams.conftest import APP_PASSWORD, LINK_SECRET, FakeTeams, _handler, reviewers, teams_config
from tests.conftest import TOKENS, ReviewerAPI, agent_client
from tests.helpers import eventually, outcome_of
from tests.reliability.conftest import TERMINAL, RelHome, text


class BlackHole:
    """A TCP server that accepts connections and never answers: the slowest possible API."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.conns: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, name="black-hole", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/"

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.stopped = True
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def fakes() -> Iterator[tuple[FakeSlack, FakeTeams, BlackHole]]:
    from http.server import ThreadingHTTPServer

    slack = FakeSlack().start()
    teams = FakeTeams()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(teams))
    teams.base = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    hole = BlackHole()
    yield slack, teams, hole
    slack.stop()
    server.shutdown()
    server.server_close()
    hole.close()


def configure(rhome: RelHome, slack: FakeSlack, teams: FakeTeams, service_url: str | None = None) -> None:
    cfg = slack_config(rhome, post_timeout_s=3, request_timeout_s=1, retries=1, retry_backoff_s=0.05)
    cfg["teams"] = teams_config(teams, request_timeout_s=1, retries=2, retry_backoff_s=0.05)
    if service_url is not None:
        cfg["teams"]["service_url"] = service_url
    cfg["reviewers"] = [*cfg["reviewers"], *(r for r in reviewers() if r["identity"].startswith("teams:"))]
    del cfg["policy"]
    rhome.extra_env = {**slack_env(slack), "KEYTURN_TEAMS_APP_PASSWORD": APP_PASSWORD,
                       "KEYTURN_LINK_SECRET": LINK_SECRET}
    rhome.configure(**cfg)


async def run_scenario(rhome: RelHome, base: str) -> dict[str, Any]:
    """A held call approved through the API, one denied through it, and one left to expire: all while the
    channels fail. Returns the agents' results by tag."""
    api = ReviewerAPI(base)
    results: dict[str, Any] = {}

    async def call(tag: str) -> None:
        async with agent_client(base, TOKENS["agent-ci"]) as client:
            results[tag] = await client.call_tool("probe_run", {"tag": tag})

    with anyio.fail_after(90):
        async with anyio.create_task_group() as tg:
            for tag in ("hold-approve", "hold-deny", "expire-alone"):
                tg.start_soon(call, tag)
            await eventually(lambda: len(rhome.calls()) == 3)  # recorded (and listed) before anyone is told
            listed = {r["arguments"]["tag"]: r for r in await api.pending()}
            assert set(listed) == {"hold-approve", "hold-deny", "expire-alone"}
            started = time.monotonic()
            approved = await api.vote(listed["hold-approve"]["id"], "approve", "alice", "the API still works")
            denied = await api.vote(listed["hold-deny"]["id"], "deny", "carol", "not while chat is down")
            assert (approved.status_code, denied.status_code) == (200, 200), (approved.text, denied.text)
            assert time.monotonic() - started < 10  # deciding never waits on a channel (a channel call takes 3 s)
    return results


def assert_outcomes(rhome: RelHome, results: dict[str, Any]) -> None:
    assert not results["hold-approve"].is_error, text(results["hold-approve"])
    assert results["hold-deny"].is_error and "not while chat is down" in text(results["hold-deny"])
    expired = results["expire-alone"]
    assert expired.is_error and outcome_of(expired)["outcome"] == "expired", text(expired)
    assert [r["tag"] for r in rhome.runs()] == ["hold-approve"]
    by_tag = {e["payload"]["arguments"]["tag"]: e["call_id"] for e in rhome.ledger_events()
              if e["kind"] == "call.received"}
    votes = {tag: [(e["payload"]["person"], e["payload"]["verdict"], e["payload"]["channel"])
                   for e in rhome.ledger_events(call_id) if e["kind"] == "vote"] for tag, call_id in by_tag.items()}
    assert votes == {"hold-approve": [("alice", "approve", "api")], "hold-deny": [("carol", "deny", "api")],
                     "expire-alone": []}  # nothing from nowhere
    expire_events = rhome.ledger_events(by_tag["expire-alone"])
    assert [e["kind"] for e in expire_events if e["kind"] in TERMINAL] == ["expired"]
    assert not [e for e in expire_events if e["kind"] in ("approval.granted", "execution.started")]
    failed = {(e["call_id"], e["payload"]["channel"]) for e in rhome.ledger_events() if e["kind"] == "notify.failed"}
    assert {c for _, c in failed} == {"slack", "teams"}  # each channel's failure is on the record
    rhome.stop_all()
    rhome.verify()
    assert sorted(rhome.assert_one_outcome_each().values()) == ["denied", "executed", "expired"]


async def test_slack_and_teams_hanging_leave_calls_held_decidable_and_expiring(
        rhome: RelHome, fakes: tuple[FakeSlack, FakeTeams, BlackHole]) -> None:
    slack, teams, hole = fakes
    slack.fail("chat.postMessage", *["hang"] * 20)
    slack.fail("chat.update", *["hang"] * 50)
    configure(rhome, slack, teams, service_url=hole.url)
    base = rhome.serve_http()
    results = await run_scenario(rhome, base)
    assert_outcomes(rhome, results)
    assert hole.conns  # the Bot Connector was tried (and never answered)
    assert slack.of("chat.postMessage", ok_only=False)


async def test_slack_and_teams_failing_with_5xx_and_429_leave_calls_held_decidable_and_expiring(
        rhome: RelHome, fakes: tuple[FakeSlack, FakeTeams, BlackHole]) -> None:
    slack, teams, _ = fakes
    slack.fail("chat.postMessage", *["500", "429"] * 20)
    slack.fail("chat.update", *["500"] * 50)
    teams.always_fail = 429  # with Retry-After: 0, so retries are quick
    configure(rhome, slack, teams)
    base = rhome.serve_http()
    results = await run_scenario(rhome, base)
    assert_outcomes(rhome, results)
    assert {c.status for c in slack.of("chat.postMessage", ok_only=False)} <= {500, 429}
