"""The no-bot fallback end to end: an incoming-webhook card with an "Open" link to a signed, single-use,
expiring decision page on keyturn's HTTP app; the reviewer authenticates with their reviewer token."""

from __future__ import annotations

import hashlib
import html
import re
import stat
import time
from typing import Any

import anyio
import httpx2
import pytest

from server.channels.teams.decision_link import LinkSigner, link_secret_path
from tests.channels.teams.conftest import LINK_SECRET, TeamsHome
from tests.conftest import TOKENS, agent_client
from tests.helpers import eventually

TERMINAL = {"executed", "failed", "denied", "expired", "cancelled", "abandoned"}


def webhook_config(th: TeamsHome) -> dict[str, Any]:
    # no public_url: links point at the address `keyturn serve --http` listens on
    return {"webhook_url": th.fake.base + "/webhook", "retry_backoff_s": 0.05}


def kinds(th: TeamsHome, request_id: str) -> list[str]:
    return [e["kind"] for e in th.home.ledger_events(request_id)]


async def wait_link(th: TeamsHome, n: int = 1, within: float = 20) -> str:
    """The "Open" URL of the n-th webhook card that has one."""
    def nth_url() -> str | None:
        with th.fake.lock:
            posts = list(th.fake.webhook_posts)
        cards = [p["attachments"][0]["content"] for p in posts]
        urls = [c["actions"][0]["url"] for c in cards if c.get("actions")]
        return str(urls[n - 1]) if len(urls) >= n else None

    return str(await eventually(nth_url, within=within))


def nonce_of(page: str) -> str:
    match = re.search(r"name='nonce' value='([^']+)'", page)
    assert match, page
    return html.unescape(match.group(1))


async def open_page(url: str) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=30) as http:
        return await http.get(url)


async def submit(url: str, who: str | None, verdict: str, reason: str = "", nonce: str | None = None,
                 **headers: str) -> httpx2.Response:
    if nonce is None:
        nonce = nonce_of((await open_page(url)).text)
    form = {"nonce": nonce, "token": TOKENS[who] if who else "wrong-token", "verdict": verdict, "reason": reason}
    async with httpx2.AsyncClient(timeout=30) as http:
        return await http.post(url, data=form, headers=headers)


def agent_bob() -> dict[str, Any]:
    return {"name": "agent-bob", "token_sha256": hashlib.sha256(TOKENS["agent-bob"].encode()).hexdigest(),
            "on_behalf_of": "bob"}


async def test_the_link_shows_without_deciding_and_decides_once_with_a_reviewer_token(teams_home: TeamsHome) -> None:
    th = teams_home
    base = th.serve(teams=webhook_config(th), agents=[agent_bob()])
    results = []
    async with agent_client(base, TOKENS["agent-bob"]) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "DELETE FROM orders WHERE id = 3"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            url = await wait_link(th)
            assert url.startswith(f"{base}/teams/decide/")
            request_id = LinkSigner(LINK_SECRET.encode()).open(url.rpartition("/")[2]).request_id
            await eventually(lambda: "notified" in kinds(th, request_id))
            before = kinds(th, request_id)
            for _ in range(2):  # a link scanner, then the reviewer: GET decides nothing and writes nothing
                page = await open_page(url)
                assert page.status_code == 200 and "DELETE FROM orders WHERE id = 3" in page.text
                assert page.headers["referrer-policy"] == "no-referrer" and page.headers["cache-control"] == "no-store"
                assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
            assert kinds(th, request_id) == before
            nonce = nonce_of(page.text)
            assert (await submit(url, None, "approve", nonce=nonce)).status_code == 401
            assert (await submit(url, "alice", "approve", nonce="forged.1.x")).status_code == 400
            cross_site = await submit(url, "alice", "approve", nonce=nonce, Origin="https://evil.example")
            assert cross_site.status_code == 403
            selfie = await submit(url, "bob", "approve", "mine")  # the requester: refused, the link survives
            assert selfie.status_code == 403 and "requester cannot approve" in selfie.text
            assert (await submit(url, "alice", "deny", "")).status_code == 400  # a denial needs a reason
            ok = await submit(url, "alice", "approve", "fine", nonce=nonce)
            assert ok.status_code == 200 and "Recorded" in ok.text
            again = await submit(url, "carol", "approve", "me too", nonce=nonce)
            assert again.status_code == 409 and "already been used" in again.text
            assert (await open_page(url)).status_code == 409
    assert not results[0].is_error
    assert th.home.rows("SELECT count(*) FROM orders") == [(2,)]
    events = th.home.ledger_events(request_id)
    assert [e["kind"] for e in events if e["kind"] in TERMINAL] == ["executed"]
    vote = next(e["payload"] for e in events if e["kind"] == "vote")
    assert vote["reviewer"] == "api:alice" and vote["channel"] == "teams-link"
    assert [e["payload"]["code"] for e in events if e["kind"] == "vote.refused"] == ["self_approval", "reason_required"]
    assert [e["kind"] for e in events if e["kind"].startswith("link.")] == [
        "link.used", "link.released", "link.used", "link.released", "link.used"]
    # the outcome is posted to the channel too (webhook messages cannot be edited)
    await eventually(lambda: any("Approved" in p["attachments"][0]["content"]["body"][0]["text"]
                                 for p in th.fake.webhook_posts))


async def test_each_vote_of_a_quorum_gets_a_fresh_link_and_old_links_stay_spent(teams_home: TeamsHome) -> None:
    th = teams_home
    base = th.serve(teams=webhook_config(th))
    results = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "UPDATE payroll SET salary = 2"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            first = await wait_link(th)
            carols_form = nonce_of((await open_page(first)).text)  # both reviewers open the first link
            assert (await submit(first, "alice", "approve", "ok")).status_code == 200
            second = await wait_link(th, 2)
            assert second != first
            assert (await submit(first, "carol", "approve", "ok", nonce=carols_form)).status_code == 409
            assert (await submit(second, "carol", "approve", "ok")).status_code == 200
    assert not results[0].is_error
    assert th.home.rows("SELECT salary FROM payroll") == [(2,)]


async def test_expired_and_forged_links_are_refused(teams_home: TeamsHome) -> None:
    th = teams_home
    base = th.serve(teams=webhook_config(th))
    async with agent_client(base) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.call_tool, "sql_execute", {"statement": "UPDATE orders SET qty = 4"})
        url = await wait_link(th)
        signer = LinkSigner(LINK_SECRET.encode())
        request_id = signer.open(url.rpartition("/")[2]).request_id
        expired = f"{base}/teams/decide/{signer.mint(request_id, time.time() - 1)}"
        assert (await open_page(expired)).status_code == 410
        page = await open_page(url)
        forged_nonce = nonce_of(page.text)
        assert (await submit(expired, "alice", "approve", nonce=forged_nonce)).status_code == 410
        forged = LinkSigner(b"not-the-secret-0123456789").mint(request_id, time.time() + 60)
        assert (await open_page(f"{base}/teams/decide/{forged}")).status_code == 404
        assert (await submit(f"{base}/teams/decide/{forged}", "alice", "approve", nonce="x")).status_code == 404
        assert "vote" not in kinds(th, request_id)
        assert (await submit(url, "alice", "deny", "not now")).status_code == 200
        tg.cancel_scope.cancel()
    assert [k for k in kinds(th, request_id) if k in TERMINAL] == ["denied"]


async def test_without_a_configured_secret_the_link_key_is_kept_beside_the_database(
        teams_home: TeamsHome, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYTURN_LINK_SECRET")
    th = teams_home
    base = th.serve(teams=webhook_config(th))
    path = link_secret_path(th.home.db)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    async with agent_client(base) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.call_tool, "sql_execute", {"statement": "UPDATE orders SET qty = 6"})
        url = await wait_link(th)
        LinkSigner(path.read_text().strip().encode()).open(url.rpartition("/")[2])
        assert (await submit(url, "alice", "approve", "ok")).status_code == 200
        tg.cancel_scope.cancel()


async def test_the_decision_form_refuses_fields_it_does_not_know(teams_home: TeamsHome) -> None:
    th = teams_home
    base = th.serve(teams=webhook_config(th))
    results = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "DELETE FROM orders WHERE id = 3"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            url = await wait_link(th)
            request_id = LinkSigner(LINK_SECRET.encode()).open(url.rpartition("/")[2]).request_id
            nonce = nonce_of((await open_page(url)).text)
            form = [("nonce", nonce), ("token", TOKENS["alice"]), ("verdict", "approve"), ("reason", "fine")]
            async with httpx2.AsyncClient(timeout=30) as http:
                extra = await http.post(url, data=dict([*form, ("arguments", '{"statement": "DELETE FROM orders"}')]))
                assert extra.status_code == 400 and "unknown field(s) &#x27;arguments&#x27;" in extra.text
                twice = await http.post(url, content="&".join(f"{k}={v}" for k, v in [*form, ("verdict", "deny")]),
                                        headers={"content-type": "application/x-www-form-urlencoded"})
                assert twice.status_code == 400 and "more than once" in twice.text
            assert not [k for k in kinds(th, request_id) if k.startswith(("vote", "link."))]  # nothing decided
            ok = await submit(url, "alice", "approve", "fine")
            assert ok.status_code == 200 and "Recorded" in ok.text
    assert not results[0].is_error
    assert th.home.rows("SELECT count(*) FROM orders") == [(2,)]
