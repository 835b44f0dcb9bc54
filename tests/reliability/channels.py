"""One keyturn server with every reviewer channel on (the JSON API, Slack, a Teams bot, Teams decision links and the
web inbox), against the fake Slack and Teams services, and a reviewer who can vote through any of them.

Every vote is reported the way that channel reports it: a bearer token (API), a click signed with Slack's
signing secret, an `adaptiveCard/action` invoke with a Bot Framework JWT, a signed-in browser form with its
CSRF token and Origin, and a signed single-use decision link with a reviewer token. Whatever the channel, the
verdict lands in the ledger as `vote` or `vote.refused`; `Reviewers.vote` waits for it and returns it.
"""

from __future__ import annotations

import html
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any

import httpx2

from server.channels.teams.decision_link import LinkSigner
from tests.channels.slack.conftest import SLACK_USERS, slack_config, slack_env
from tests.channels.slack.fake_slack import TEAM, FakeSlack
from tests.channels.slack.interactions import block_action, post_signed, view_submission
from tests.channels.teams.conftest import (
    APP_PASSWORD,
    LINK_SECRET,
    OIDS,
    TENANT,
    FakeTeams,
    _handler,
    reviewers,
    teams_config,
)
from tests.conftest import TOKENS
from tests.helpers import eventually
from tests.reliability.conftest import RelHome

CHANNELS = ("api", "slack", "teams", "web", "link")


@contextmanager
def fake_services() -> Iterator[tuple[FakeSlack, FakeTeams]]:
    slack = FakeSlack().start()
    teams = FakeTeams()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(teams))
    teams.base = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield slack, teams
    finally:
        slack.stop()
        server.shutdown()
        server.server_close()


def configure_all_channels(home: RelHome, slack: FakeSlack, teams: FakeTeams, *, tools: list[dict[str, Any]] | None = None,
                           **extra: Any) -> None:
    cfg = slack_config(home, post_timeout_s=5, request_timeout_s=2, retries=1)
    del cfg["policy"]
    cfg["teams"] = teams_config(teams, webhook_url=teams.base + "/webhook", request_timeout_s=2, retries=1)
    cfg["reviewers"] = [*cfg["reviewers"], *(r for r in reviewers() if r["identity"].startswith("teams:"))]
    home.extra_env = {**slack_env(slack), "KEYTURN_TEAMS_APP_PASSWORD": APP_PASSWORD, "KEYTURN_LINK_SECRET": LINK_SECRET}
    home.configure(tools=tools, **{**cfg, **extra})


def identity(channel: str, person: str) -> str:
    if channel == "slack":
        return f"slack:{TEAM}/{SLACK_USERS[person]}"
    if channel == "teams":
        return f"teams:{TENANT}/{OIDS[person]}"
    return f"api:{person}"  # the web inbox and decision links authenticate with the person's reviewer token


@dataclass(frozen=True)
class Vote:
    channel: str
    person: str
    accepted: bool
    code: str  # "ok" or the refusal code
    payload: dict[str, Any]


class Reviewers:
    def __init__(self, home: RelHome, base: str, slack: FakeSlack, teams: FakeTeams) -> None:
        self.home, self.base, self.slack, self.teams = home, base, slack, teams
        self.signer = LinkSigner(LINK_SECRET.encode())

    def _votes(self, request_id: str) -> list[dict[str, Any]]:
        return [dict(e["payload"], kind=e["kind"], seq=e["seq"]) for e in self.home.ledger_events(request_id)
                if e["kind"] in ("vote", "vote.refused")]

    async def vote(self, channel: str, person: str, request_id: str, verdict: str = "approve",
                   reason: str | None = "reviewed", **extra: Any) -> Vote:
        """Vote through `channel` as `person`; wait for the ledger to record it; return what it recorded."""
        seen = {v["seq"] for v in self._votes(request_id)}
        who = identity(channel, person)
        await getattr(self, f"_{channel}")(person, request_id, verdict, reason, **extra)

        def recorded() -> dict[str, Any] | None:
            return next((v for v in self._votes(request_id) if v["seq"] not in seen and v["reviewer"] == who), None)

        await eventually(lambda: recorded() is not None, within=20)
        found = recorded()
        assert found is not None
        return Vote(channel, person, found["kind"] == "vote", found.get("code", "ok"), found)

    async def _api(self, person: str, request_id: str, verdict: str, reason: str | None, *,
                   body: dict[str, Any] | None = None) -> None:
        async with httpx2.AsyncClient(base_url=self.base, timeout=30) as http:
            await http.post(f"/api/requests/{request_id}/{verdict}", json=body or {"reason": reason},
                            headers={"Authorization": f"Bearer {TOKENS[person]}"})

    async def _slack(self, person: str, request_id: str, verdict: str, reason: str | None) -> None:
        user = SLACK_USERS[person]
        trigger = f"trig-{time.monotonic_ns()}"
        await post_signed(self.base, block_action(request_id, f"keyturn_{verdict}", user, trigger_id=trigger))
        if verdict == "deny":  # Slack asks for the reason in a modal, then the modal is submitted
            opened = await self.slack.wait_for("views.open", lambda c: c.args.get("trigger_id") == trigger)
            await post_signed(self.base, view_submission(opened.args["view"]["private_metadata"], reason or "", user))

    async def _teams(self, person: str, request_id: str, verdict: str, reason: str | None) -> None:
        activity = {
            "type": "invoke", "name": "adaptiveCard/action", "id": f"a-{time.monotonic_ns()}", "channelId": "msteams",
            "serviceUrl": self.teams.service_url, "timestamp": "2026-01-01T00:00:00Z",
            "from": {"id": f"29:{person}", "name": person, "aadObjectId": OIDS[person]},
            "recipient": {"id": "28:bot", "name": "keyturn"},
            "conversation": {"id": "19:c", "conversationType": "channel", "tenantId": TENANT},
            "channelData": {"tenant": {"id": TENANT}},
            "value": {"action": {"type": "Action.Execute", "verb": f"keyturn.{verdict}",
                                 "data": {"request_id": request_id, **({"reason": reason} if reason else {})}},
                      "trigger": "manual"},
        }
        async with httpx2.AsyncClient(timeout=30) as http:
            await http.post(self.base + "/teams/messages", json=activity,
                            headers={"Authorization": f"Bearer {self.teams.jwt()}"})

    @asynccontextmanager
    async def web_session(self, person: str) -> AsyncIterator[httpx2.AsyncClient]:
        """A browser-like client signed in to the inbox as `person` (form token, cookies, same Origin)."""
        async with httpx2.AsyncClient(base_url=self.base, timeout=30, headers={"Origin": self.base}) as http:
            page = (await http.get("/login")).text
            csrf = html.unescape(re.search(r'name="csrf" value="([^"]+)"', page).group(1))  # type: ignore[union-attr]
            r = await http.post("/login", data={"csrf": csrf, "token": TOKENS[person], "next": "/inbox"})
            assert r.status_code == 303, r.text[:500]
            yield http

    async def web_form(self, http: httpx2.AsyncClient, request_id: str) -> str:
        page = (await http.get(f"/inbox/requests/{request_id}")).text
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found, page[:2000]
        return html.unescape(found.group(1))

    async def _web(self, person: str, request_id: str, verdict: str, reason: str | None) -> None:
        async with self.web_session(person) as http:
            csrf = await self.web_form(http, request_id)
            await http.post(f"/inbox/requests/{request_id}/vote",
                            data={"csrf": csrf, "verdict": verdict, "reason": reason or "", "back": "request"})

    def link(self, request_id: str, expires: float | None = None) -> str:
        return f"{self.base}/teams/decide/{self.signer.mint(request_id, expires or time.time() + 600)}"

    async def link_form(self, url: str) -> str:
        """Open a decision link's page (as a reviewer's browser does) and return its one-time form nonce."""
        async with httpx2.AsyncClient(timeout=30) as http:
            page = (await http.get(url)).text
        nonce = re.search(r"name='nonce' value='([^']+)'", page)
        assert nonce, page[:2000]
        return html.unescape(nonce.group(1))

    async def _link(self, person: str, request_id: str, verdict: str, reason: str | None, *,
                    url: str | None = None, nonce: str | None = None) -> None:
        url = url or self.link(request_id)
        nonce = nonce or await self.link_form(url)
        async with httpx2.AsyncClient(timeout=30) as http:
            await http.post(url, data={"nonce": nonce, "token": TOKENS[person], "verdict": verdict,
                                       "reason": reason or ""}, headers={"Origin": self.base})


async def hold(home: RelHome, base: str, agent: str, tool: str, args: dict[str, Any],
               results: dict[str, Any], key: str) -> None:
    """Make a call as `agent` and keep waiting on it; the result lands in `results[key]`."""
    from tests.conftest import agent_client

    async with agent_client(base, TOKENS[agent]) as client:
        results[key] = await client.call_tool(tool, args)


async def pending_request(home: RelHome, tag: str, within: float = 20) -> str:
    def find() -> str | None:
        for e in home.ledger_events():
            if e["kind"] == "call.received" and e["payload"]["arguments"].get("tag") == tag:
                return str(e["call_id"]) if home.calls().get(e["call_id"]) == "pending" else None
        return None

    return str(await eventually(find, within=within))

