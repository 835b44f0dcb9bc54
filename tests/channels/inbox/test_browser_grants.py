"""Standing grants in a real browser: a reviewer approves a held call with a grant from its page, sees keyturn's
proposed condition, finds the grant under Grants, and revokes it there; later calls like it then run at once,
then wait again. A grant the policy forbids is refused on the page and the request still waits."""

from __future__ import annotations

import re
from typing import Any

import anyio
from playwright.async_api import expect

from server.config import default_policy_path
from tests.channels.inbox.conftest import sign_in
from tests.conftest import Home, ReviewerAPI, agent_client


def text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


async def test_approve_with_a_grant_in_the_browser_then_revoke_it_on_the_grants_page(home: Home, page: Any) -> None:
    home.write_config(policy=str(default_policy_path()))
    base = home.serve_http()
    api = ReviewerAPI(base)
    await sign_in(page, base, "alice")
    results: list[Any] = []
    async with agent_client(base) as client:
        async def agent(statement: str) -> None:
            results.append(await client.call_tool("sql_execute", {"statement": statement}))

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent, "DELETE FROM orders")  # sql-mass-change: critical, grants forbidden
                req = await api.wait_pending("sql_execute")
                await page.goto(f"{base}/inbox/requests/{req['id']}")
                await page.get_by_text("Approve, and let calls like this one run without asking").click()
                form = page.locator("form.grant-form")
                await form.get_by_label("Why calls like this may run without asking").fill("routine")
                await form.get_by_role("button", name="Approve with a standing grant").click()
                await expect(page.locator(".notice.bad")).to_contain_text("forbids standing grants")
                assert (await api.request("GET", f"/api/requests/{req['id']}", "alice")).json()[
                    "request"]["state"] == "pending"
                assert (await api.vote(req["id"], "deny", "carol", "no mass deletes")).status_code == 200
        assert results.pop().is_error

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent, "UPDATE orders SET qty = 1 WHERE id = 1")
                req = await api.wait_pending("sql_execute")
                await page.goto(f"{base}/inbox/requests/{req['id']}")
                await page.get_by_text("Approve, and let calls like this one run without asking").click()
                form = page.locator("form.grant-form")
                await expect(form.locator("pre")).to_contain_text('facts.sql.tables == ["orders"]')
                await form.get_by_label("For how long").fill("9h")
                await form.get_by_role("button", name="Approve with a standing grant").click()
                await expect(page.locator(".notice.bad")).to_contain_text("max_for")  # over the cap: refused
                await expect(page.locator("details.grant")).to_have_attribute("open", "")
                await form.get_by_label("For how long").fill("30m")
                await form.get_by_label("How many calls").fill("3")
                await form.get_by_label("Narrow it further").fill("args.statement.endsWith('id = 1')")
                await form.get_by_role("button", name="Approve with a standing grant").click()
                await expect(page.locator(".notice.good")).to_contain_text("standing grant g")
        assert not results.pop().is_error

        ran = await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 2 WHERE id = 1"})
        assert not ran.is_error and "standing grant" in text(ran)

        await page.get_by_role("link", name="Grants").click()
        grant = page.locator("li.grant")
        await expect(grant).to_have_count(1)
        await expect(grant).to_contain_text("1 of 3 uses")
        await expect(grant).to_contain_text("args.statement.endsWith('id = 1')")
        await grant.get_by_label("Why you revoke it").fill("done for today")
        await grant.get_by_role("button", name="Revoke").click()
        await expect(page.locator(".notice.good")).to_contain_text("You revoked grant")
        await expect(page.locator("li.grant")).to_have_count(0)

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent, "UPDATE orders SET qty = 3 WHERE id = 1")
                req = await api.wait_pending("sql_execute")  # revoked: it waits again
                assert (await api.vote(req["id"], "deny", "alice", "revoked")).status_code == 200
        assert results.pop().is_error
    assert home.rows("SELECT qty FROM orders WHERE id = 1") == [(2,)]
    revoked = [e for e in home.ledger_events() if e["kind"] == "grant.revoked"]
    assert [(e["payload"]["person"], e["payload"]["channel"], e["payload"]["reason"]) for e in revoked] == [
        ("alice", "web", "done for today")]
    assert re.match(r"^g[0-9a-f]{32}$", revoked[0]["call_id"])
