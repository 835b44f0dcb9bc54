"""Canary secrets: an AWS access key, a GitHub token and a private key block, planted in the arguments of several
tools on every path a call can take (held then approved, run and failed, denied by a reviewer on Slack and on
Teams, denied by policy with the secret quoted in the reason, refused as invalid with the secret echoed by the
validator, and a tool error quoting it). Then every output is grepped for them, and for keyturn's own credentials:
the ledger file (with its WAL and shared memory), everything sent to Slack and Teams, the server's log (at debug
level), the reviewer API, the web pages and the audit exports, `keyturn audit` output, and every error text keyturn
returned to the agent.

What the agent may see: a successful tool result is the tool's business (an approved `SELECT` of a column holding
a key returns it: the agent asked for that data). Everything keyturn itself says (its refusals, denials, and the
errors it relays from a failed tool) is masked: an error text travels to agent logs and transcripts, and keyturn
must not be the amplifier.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import httpx2
import pytest

from tests.channels.slack.fake_slack import BOT_TOKEN, SIGNING_SECRET
from tests.channels.teams.conftest import APP_PASSWORD, LINK_SECRET
from tests.conftest import TOKENS, ReviewerAPI, agent_client
from tests.helpers import outcome_of
from tests.reliability.channels import Reviewers, configure_all_channels, fake_services, hold, pending_request
from tests.reliability.conftest import RelHome, text

AWS = "AKIA" + "KTCANARY" + "7Q2W4E6R"
GITHUB = "ghp_" + "KeyturnCanary" + "0123456789abcdefghijklmnopq"
KEY_MATERIAL = "MIIEpAIBAAKCAQEAkeyturnCanaryPrivateKeyMaterial0123456789"
PRIVATE_KEY = f"-----BEGIN RSA PRIVATE KEY-----\n{KEY_MATERIAL}\n-----END RSA PRIVATE KEY-----"
CANARIES = {"aws": AWS, "github": GITHUB, "private key": KEY_MATERIAL}
OWN_SECRETS = {**{f"token of {k}": v for k, v in TOKENS.items()}, "slack bot token": BOT_TOKEN,
               "slack signing secret": SIGNING_SECRET, "teams app password": APP_PASSWORD, "link secret": LINK_SECRET}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reviewers]:
    d = tmp_path_factory.mktemp("canary")
    home = RelHome(dir=d, config=d / "keyturn.yaml", db=d / "ledger.db", data_db=d / "app.db")
    import sqlite3

    with sqlite3.connect(home.data_db) as conn:
        conn.executescript("CREATE TABLE orders(id INTEGER PRIMARY KEY, item TEXT); INSERT INTO orders(item) VALUES ('a');")
    (d / "root").mkdir()
    (d / "work").mkdir()
    with fake_services() as (slack, teams):
        configure_all_channels(home, slack, teams, tools=[
            {"module": "tools.files", "options": {"roots": [str(d / "root")]}},
            {"module": "tools.shell", "options": {"cwd_roots": [str(d / "work")]}},
            {"module": "tools.http", "options": {"allow_hosts": ["example.invalid"]}}])
        try:
            yield Reviewers(home, home.serve_http(None, "--log-level", "debug"), slack, teams)
        finally:
            home.stop_all()


def found_in(haystack: bytes | str, secrets: dict[str, str]) -> list[str]:
    data = haystack if isinstance(haystack, bytes) else haystack.encode("utf-8", "surrogatepass")
    return [name for name, value in secrets.items() if value.encode() in data or
            json.dumps(value).encode()[1:-1] in data]  # also as a JSON-escaped string


async def decided_call(world: Reviewers, tool: str, args: dict[str, Any], tag: str, channel: str, verdict: str,
                       agent_texts: list[str]) -> str:
    """Make a held call; decide it through `channel`; keep what keyturn told the agent. Returns the request id."""
    results: dict[str, Any] = {}
    with anyio.fail_after(90):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold, world.home, world.base, "agent-ci", tool, args, results, "call")
            request_id = await pending_request(world.home, tag) if tool.startswith("probe") else await _pending(
                world, tool)
            vote = await world.vote(channel, "alice", request_id, verdict, f"{verdict} via {channel}")
            assert vote.accepted, vote
    result = results["call"]
    if result.is_error:
        agent_texts.append(text(result))
    return request_id


async def _pending(world: Reviewers, tool: str) -> str:
    return str((await ReviewerAPI(world.base).wait_pending(tool))["id"])


async def test_canary_secrets_never_leave_keyturn_except_in_a_result_the_agent_asked_for(world: Reviewers) -> None:
    keyturn_said: list[str] = []
    # Held, approved and run; the tool's successful result carries the secret back (the agent's own data).
    await decided_call(world, "sql_query", {"query": f"SELECT '{AWS}' AS k"}, "", "api", "approve", keyturn_said)
    # Held, approved, and the driver's error quotes the secret ("no such column: AKIA...").
    await decided_call(world, "sql_query", {"query": f"SELECT {AWS} FROM orders"}, "", "slack", "approve", keyturn_said)
    # Held, approved; the tool raises an error quoting its argument.
    await decided_call(world, "probe_fail", {"tag": "hold-fail", "note": f"deploy with {GITHUB}"}, "hold-fail",
                       "teams", "approve", keyturn_said)
    # Held and denied by reviewers in Slack (modal) and in Teams.
    await decided_call(world, "shell_run", {"command": f"git push https://x:{GITHUB}@github.com/o/r"}, "", "slack",
                       "deny", keyturn_said)
    await decided_call(world, "http_request", {"method": "POST", "url": "https://example.invalid/keys",
                                               "headers": {"Authorization": f"token {GITHUB}"}, "body": PRIVATE_KEY},
                       "", "teams", "deny", keyturn_said)
    # Held, approved through the web inbox and run: a write whose statement holds the key (now in the app's table).
    await decided_call(world, "sql_execute", {"statement": f"UPDATE orders SET item = '{PRIVATE_KEY}'"}, "", "web",
                       "approve", keyturn_said)
    async with agent_client(world.base, TOKENS["agent-ci"]) as client:
        # Denied by policy, the reason template quoting the argument that holds the secret.
        denied = await client.call_tool("probe_run", {"tag": f"deny-{AWS}", "note": PRIVATE_KEY})
        # Refused as invalid: validators echo the offending value or name.
        invalid_path = await client.call_tool("files_read", {"path": f"/etc/{AWS}/{GITHUB}"})
        invalid_name = await client.call_tool("probe_run", {"tag": "allow-x", AWS: GITHUB})
        invalid_url = await client.call_tool("http_request", {"method": "GET", "url": f"https://{GITHUB}.evil/"})
        for result in (denied, invalid_path, invalid_name, invalid_url):
            assert result.is_error and outcome_of(result)["outcome"] in ("denied", "refused"), text(result)
            keyturn_said.append(text(result))
            keyturn_said.append(json.dumps([result.structured_content, result.meta]))
    assert len(keyturn_said) >= 9

    leaks: dict[str, list[str]] = {}

    def check(where: str, haystack: bytes | str, secrets: dict[str, str] = CANARIES) -> None:
        if hits := found_in(haystack, secrets):
            leaks[where] = hits

    all_secrets = {**CANARIES, **OWN_SECRETS}
    for i, said in enumerate(keyturn_said):
        check(f"keyturn's error text #{i}: {said[:120]!r}", said, all_secrets)
    for f in sorted(world.home.dir.glob("ledger.db*")):
        if f.is_file():
            check(f"ledger file {f.name}", f.read_bytes(), all_secrets)
    check("Slack (everything sent)", world.slack.everything(), all_secrets)
    with world.teams.lock:
        teams_out = json.dumps([world.teams.sent, world.teams.updated, world.teams.webhook_posts])
    check("Teams (cards sent, updated, webhook posts)", teams_out, all_secrets)
    check("server log", world.home.log_text(), all_secrets)
    api = ReviewerAPI(world.base)
    listing = await api.request("GET", "/api/requests?state=executed,failed,denied", "alice")
    check("reviewer API list", listing.text, all_secrets)
    for request in listing.json()["requests"]:
        check(f"reviewer API {request['id']}", (await api.request("GET", f"/api/requests/{request['id']}", "alice")).text,
              all_secrets)
    check("reviewer API audit tail", (await api.request("GET", "/api/audit/tail?n=1000", "alice")).text, all_secrets)
    async with world.web_session("carol") as web:
        for path in ("/inbox", "/audit", "/audit/export.csv", "/audit/export.jsonl"):
            check(f"web {path}", (await web.get(path)).text, all_secrets)
        for request in listing.json()["requests"]:
            check(f"web request page {request['id']}", (await web.get(f"/inbox/requests/{request['id']}")).text,
                  all_secrets)
    async with httpx2.AsyncClient(timeout=30) as http:
        for request in listing.json()["requests"]:
            check(f"decision link page {request['id']}", (await http.get(world.link(request["id"]))).text, all_secrets)
    for args in (["audit", "tail", "-n", "1000"], ["audit", "tail", "-n", "1000", "--json"]):
        out = world.home.keyturn(*args, "--config", str(world.home.config))
        check(f"keyturn {' '.join(args)}", out.stdout + out.stderr, all_secrets)
    for request in listing.json()["requests"]:
        out = world.home.keyturn("audit", "show", request["id"], "--json", "--config", str(world.home.config))
        check(f"keyturn audit show {request['id']}", out.stdout + out.stderr, all_secrets)
    assert leaks == {}, json.dumps(leaks, indent=2)

    # The canaries were really there: masked where shown, and the successful result the agent asked for has its key.
    assert "redacted" in world.slack.everything()  # (JSON-escaped guillemets)
    assert (world.home.dir / "app.db").read_bytes().count(KEY_MATERIAL.encode()) >= 1  # the approved UPDATE ran
    world.home.verify()


def test_the_canaries_look_like_secrets_to_keyturn() -> None:
    from server.classify.secrets import find_kinds

    assert find_kinds(AWS) == ["aws_access_key_id"]
    assert find_kinds(GITHUB) == ["github_token"]
    assert "private_key" in find_kinds(PRIVATE_KEY)
