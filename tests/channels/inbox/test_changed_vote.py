"""The inbox with the shipped policy, against a real server: what a request needs, in the words every channel uses,
and an approver who denies instead, through the same signed-in form (CSRF token and Origin) as any vote."""

from __future__ import annotations

import html
import re

import anyio
import httpx2

from tests.conftest import ROOT, TOKENS, Home, ReviewerAPI, agent_client
from tests.helpers import eventually


def form_token(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None
    return found.group(1)


async def signed_in(http: httpx2.AsyncClient, base: str, who: str) -> None:
    token = form_token((await http.get("/login")).text)
    r = await http.post("/login", data={"csrf": token, "token": TOKENS[who], "next": "/inbox"},
                        headers={"Origin": base})
    assert r.status_code == 303, r.text


async def test_an_approver_denies_instead_from_the_inbox_and_the_counts_are_the_real_quorum(home: Home) -> None:
    home.write_config(policy=str(ROOT / "policies" / "default.yaml"))
    base = home.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.call_tool, "sql_execute", {"statement": "DELETE FROM orders"})
            req = await api.wait_pending("sql_execute")
            tg.cancel_scope.cancel()  # the agent gives up; its request stays
    await eventually(lambda: any(e["kind"] == "client.left" for e in home.ledger_events(req["id"])))
    page_path = f"/inbox/requests/{req['id']}"
    vote_path = f"{page_path}/vote"
    async with httpx2.AsyncClient(base_url=base) as http:
        await signed_in(http, base, "alice")
        inbox = html.unescape((await http.get("/inbox")).text)
        assert "<strong>0</strong> of 2" in inbox  # sql-write and sql-mass-change: two people, not 0 of 3
        assert "Needs 2 approvals from any reviewer (different people)" in inbox
        r = await http.post(vote_path, data={"csrf": form_token(inbox), "verdict": "approve", "reason": "ok",
                                             "back": "request"}, headers={"Origin": base})
        assert r.status_code == 303, r.text
        page = html.unescape((await http.get(page_path)).text)
        assert "<strong>1</strong> of 2" in page and "Deny instead" in page
        assert 'value="approve"' not in page  # no second approval to give
        r = await http.post(vote_path, data={"csrf": form_token(page), "verdict": "deny", "reason": "",
                                             "back": "request"}, headers={"Origin": base})
        assert r.status_code == 400  # a denial needs a reason, here too
        r = await http.post(vote_path, data={"csrf": form_token(page), "verdict": "deny", "reason": "wrong table",
                                             "back": "request"}, headers={"Origin": base})
        assert r.status_code == 303, r.text
        after = html.unescape((await http.get(page_path)).text)
        assert "changed their vote from approve to deny" in after and "Deny instead" not in after
        r = await http.post(vote_path, data={"csrf": form_token(after), "verdict": "approve", "reason": "again",
                                             "back": "request"}, headers={"Origin": base})
        assert r.status_code == 409  # a deny stays final
    votes = [e["payload"] for e in home.ledger_events(req["id"]) if e["kind"] == "vote"]
    assert [(v["verdict"], v.get("changed_from"), v["channel"]) for v in votes] == [
        ("approve", None, "web"), ("deny", "approve", "web")]
    assert [e["kind"] for e in home.ledger_events(req["id"])].count("denied") == 1
    assert home.rows("SELECT count(*) FROM orders") == [(3,)]
