"""A reviewer in a real browser: signs in, sees a held call appear live, approves or denies it, reads its story.

Each test runs a real `keyturn serve --http` subprocess; the agent is the MCP SDK's client, whose call
is held in a background task while the reviewer works the page.
"""

from __future__ import annotations

import re
from typing import Any

import anyio
from mcp import Client
from playwright.async_api import expect

from tests.channels.inbox.conftest import screenshot, sign_in
from tests.conftest import TOKENS, Home, agent_client


def text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def agent_token_config(home: Home) -> None:
    import hashlib

    home.write_config(agents=[{"name": "agent-bob", "token_sha256": hashlib.sha256(TOKENS["agent-bob"].encode())
                               .hexdigest(), "on_behalf_of": "bob"}])


async def test_sign_in_see_a_held_call_live_approve_it_and_the_agent_call_completes(home: Home, page: Any) -> None:
    base = home.serve_http()
    await sign_in(page, base, "alice")
    await expect(page.locator("#requests .empty")).to_be_visible()
    await expect(page.locator("#live-status")).to_have_class(re.compile(r"\bon\b"))  # the event stream is open
    await page.evaluate("window.__sameDocument = true")
    results: list[Any] = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "DELETE FROM orders WHERE item = 'pear'"}))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                card = page.locator("article.request")
                await expect(card).to_have_count(1)  # arrived without a reload:
                assert await page.evaluate("window.__sameDocument") is True
                await expect(page.locator("#requests .empty")).to_be_hidden()
                await expect(card.locator("pre.code.sql")).to_have_text("DELETE FROM orders WHERE item = 'pear'")
                await expect(card).to_contain_text("writes need a human")
                await expect(card).to_contain_text("Asked by local")
                await expect(card.locator(".badge")).to_have_text("high risk")
                await expect(card.locator(".quorum")).to_contain_text("0 of 1")
                await expect(card.locator("time[data-expires]")).to_have_text(re.compile(r"^\d+m \d\ds left$"))
                assert home.rows("SELECT count(*) FROM orders") == [(3,)]  # held: nothing ran
                await screenshot(page, "inbox")
                await card.get_by_label("Reason").fill("checked with the team")
                await card.get_by_role("button", name="Approve").click()
                await expect(page.locator(".notice.good")).to_contain_text("approved: quorum reached")
    assert not results[0].is_error, text(results[0])
    assert home.rows("SELECT item FROM orders ORDER BY id") == [("apple",), ("plum",)]
    votes = [e for e in home.ledger_events() if e["kind"] == "vote"]
    assert [(v["payload"]["person"], v["payload"]["channel"], v["payload"]["reason"]) for v in votes] == [
        ("alice", "web", "checked with the team")]
    await expect(page.locator("article.request")).to_have_count(0)


async def test_deny_needs_a_reason_then_the_agent_hears_why_and_the_timeline_tells_the_story(
        home: Home, page: Any) -> None:
    base = home.serve_http()
    await sign_in(page, base, "carol")
    results: list[Any] = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 0"}))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                card = page.locator("article.request")
                await expect(card).to_have_count(1)
                request_id = await card.get_attribute("data-id")
                await card.get_by_role("button", name="Deny").click()  # no reason: the page says so first
                await expect(card.locator(".field-error")).to_be_visible()
                await card.get_by_label("Reason").fill("not during the sale")
                await card.get_by_role("button", name="Deny").click()
                await expect(page.locator(".notice.good")).to_contain_text("denied by carol")
    assert results[0].is_error and "not during the sale" in text(results[0]) and "carol" in text(results[0])
    assert home.rows("SELECT sum(qty) FROM orders") == [(15,)]

    await page.goto(f"{base}/inbox/requests/{request_id}")
    await expect(page.locator("h1")).to_contain_text("sql_execute")
    await expect(page.locator("header .state")).to_have_text("denied")
    events = page.locator("ol.events > li")
    titles = [t.strip() for t in await events.locator("h3").all_inner_texts()]
    assert [t.split("\n")[0] for t in titles] == [
        "Received call.received", "Policy decision decision", "Held for review approval.requested",
        "carol denied vote", "Denied by carol denied"]
    decision = events.nth(1)
    await expect(decision.locator("ul.rules")).to_contain_text("writes-reviewed")
    await expect(events.nth(3)).to_contain_text("not during the sale")
    ledger = home.ledger_events(request_id)
    for i, event in enumerate(ledger):
        await expect(events.nth(i).locator("dl.hashes")).to_contain_text(event["hash"])
        await expect(events.nth(i).locator(".seq")).to_have_text(f"#{event['seq']}")
    await expect(page.locator("form.vote")).to_have_count(0)  # closed: nothing to vote on
    await events.nth(3).locator("summary").click()  # the vote's ledger record
    await expect(events.nth(3).locator("pre.code")).to_contain_text('"channel": "web"')
    await screenshot(page, "request")


async def test_an_approved_and_executed_request_shows_its_result_digest(home: Home, page: Any) -> None:
    base = home.serve_http()
    await sign_in(page, base, "alice")
    results: list[Any] = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 9"}))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                card = page.locator("article.request")
                await expect(card).to_have_count(1)
                await card.get_by_role("link", name=re.compile("timeline")).click()
                await page.get_by_label("Reason").fill("fine")
                await page.get_by_role("button", name="Approve").click()
                await expect(page.locator(".notice.good")).to_contain_text("approved")
    assert not results[0].is_error
    request_id = page.url.rsplit("/", 1)[1]
    executed = next(e for e in home.ledger_events(request_id) if e["kind"] == "executed")
    await page.reload()
    await expect(page.locator("header .state")).to_have_text("executed")
    last = page.locator("ol.events > li").last
    await expect(last).to_contain_text("Executed")
    await expect(last.locator(".hash")).to_contain_text(executed["payload"]["result_digest"])


async def test_the_requester_cannot_approve_its_own_call_through_the_web(home: Home, page: Any) -> None:
    agent_token_config(home)
    base = home.serve_http()
    await sign_in(page, base, "bob")
    results: list[Any] = []
    async with agent_client(base, TOKENS["agent-bob"]) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 2"}))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                card = page.locator("article.request")
                await expect(card).to_have_count(1)
                await expect(card).to_contain_text("on behalf of bob")
                request_id = await card.get_attribute("data-id")
                assert request_id
                await card.get_by_label("Reason").fill("looks fine to me")
                async with page.expect_response(lambda r: r.request.method == "POST") as answer:
                    await card.get_by_role("button", name="Approve").click()
                assert (await answer.value).status == 403
                await expect(page.locator(".notice.bad")).to_contain_text(
                    "the requester cannot approve or deny its own request")
                await expect(page.locator("header .state")).to_have_text("pending")
                await expect(page.get_by_label("Reason")).to_have_value("looks fine to me")  # kept for a retry
                assert await _api_vote(base, request_id, "alice") == 200
    assert not results[0].is_error
    refused = [e["payload"] for e in home.ledger_events(request_id) if e["kind"] == "vote.refused"]
    assert [(p["code"], p["channel"], p["person"]) for p in refused] == [("self_approval", "web", "bob")]


async def _api_vote(base: str, request_id: str, who: str) -> int:
    import httpx2

    async with httpx2.AsyncClient(timeout=30) as http:
        r = await http.post(f"{base}/api/requests/{request_id}/approve", json={"reason": "ok"},
                            headers={"Authorization": f"Bearer {TOKENS[who]}"})
    return int(r.status_code)


async def test_a_call_held_by_another_process_appears_live_and_a_web_approval_reaches_it(
        home: Home, page: Any) -> None:
    base = home.serve_http()  # serves the pages; the agent talks to a separate stdio process on the same ledger
    await sign_in(page, base, "alice")
    await expect(page.locator("#live-status")).to_have_class(re.compile(r"\bon\b"))
    results: list[Any] = []
    async with Client(home.stdio_params()) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "DELETE FROM orders WHERE id = 3"}))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                card = page.locator("article.request")
                await expect(card).to_have_count(1)  # noticed by polling the store's head
                await card.get_by_label("Reason").fill("ok from the web")
                await card.get_by_role("button", name="Approve").click()
                await expect(page.locator(".notice.good")).to_contain_text("approved")
    assert not results[0].is_error, text(results[0])
    assert home.rows("SELECT count(*) FROM orders") == [(2,)]


async def test_a_request_decided_elsewhere_is_marked_closed_on_an_open_page(home: Home, page: Any) -> None:
    base = home.serve_http()
    await sign_in(page, base, "alice")
    results: list[Any] = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 4"}))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                card = page.locator("article.request")
                await expect(card).to_have_count(1)
                await card.get_by_label("Reason").fill("half-typed")
                request_id = await card.get_attribute("data-id")
                assert request_id and await _api_vote(base, request_id, "carol") == 200
                await expect(card).to_have_class(re.compile(r"\bclosed\b"))
                await expect(card.locator(".closed-note")).to_contain_text("No longer pending")
                await expect(page.locator("#requests .empty")).to_be_visible()
    assert not results[0].is_error


async def test_quorum_progress_updates_live_as_reviewers_vote(home: Home, page: Any) -> None:
    base = home.serve_http()
    await sign_in(page, base, "alice")
    results: list[Any] = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "UPDATE payroll SET salary = 7"}))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                card = page.locator("article.request")
                await expect(card.locator(".quorum")).to_contain_text("0 of 2")
                await expect(card.locator("ul.groups")).to_contain_text("dba")
                await expect(card.locator(".badge")).to_have_text("critical risk")
                await card.get_by_label("Reason").fill("first DBA")
                await card.get_by_role("button", name="Approve").click()
                await expect(page.locator(".notice.good")).to_contain_text("vote recorded")
                await expect(card.locator(".quorum")).to_contain_text("1 of 2")
                await expect(card.locator("p.voted")).to_contain_text("You approved")  # no second vote offered
                await expect(card.locator("form.vote:not(.change)")).to_have_count(0)
                await expect(card.get_by_role("button", name="Approve")).to_have_count(0)
                await expect(card.get_by_role("button", name="Deny instead")).to_have_count(1)  # a change of mind
                await page.evaluate("window.__sameDocument = true")
                request_id = await card.get_attribute("data-id")
                assert request_id and await _api_vote(base, request_id, "carol") == 200
                await expect(card).to_have_class(re.compile(r"\bclosed\b"))  # approved elsewhere, seen live
                assert await page.evaluate("window.__sameDocument") is True
    assert not results[0].is_error
    assert home.rows("SELECT salary FROM payroll") == [(7,)]


async def test_a_reviewer_edits_the_arguments_in_the_browser_and_the_edited_call_runs(home: Home, page: Any) -> None:
    base = home.serve_http()
    await sign_in(page, base, "alice")
    results: list[Any] = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "DELETE FROM orders"}))

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                card = page.locator("article.request")
                await expect(card).to_have_count(1)
                await card.get_by_role("link", name=re.compile("timeline")).click()
                await page.get_by_text("Edit the arguments, then approve").click()
                form = page.locator("form.edit-form")
                edited = form.get_by_label("Arguments (JSON")
                await expect(edited).to_have_value(re.compile(r'"statement": "DELETE FROM orders"'))
                # Not JSON: refused with the text kept for another try, nothing recorded.
                await edited.fill('{"statement": "DELETE FROM orders WHERE item = \'pear\'"')
                await form.get_by_label("Why you changed them").fill("only the pear order")
                await form.get_by_role("button", name="Approve the edited call").click()
                await expect(page.locator(".notice.bad")).to_contain_text("JSON object")
                # A call the policy denies: refused, the request still waits.
                await expect(page.locator("details.edit")).to_have_attribute("open", "")  # kept open, and the text
                await expect(edited).to_have_value(re.compile(r"WHERE item = 'pear'\"$"))
                await edited.fill('{"statement": "DROP TABLE orders"}')
                await form.get_by_label("Why you changed them").fill("drop it")
                await form.get_by_role("button", name="Approve the edited call").click()
                await expect(page.locator(".notice.bad")).to_contain_text("denied by policy")
                assert home.rows("SELECT count(*) FROM orders") == [(3,)]
                await edited.fill('{"statement": "DELETE FROM orders WHERE item = \'pear\'"}')
                await form.get_by_label("Why you changed them").fill("only the pear order")
                await form.get_by_role("button", name="Approve the edited call").click()
                await expect(page.locator(".notice.good")).to_contain_text("arguments edited and approved")
    assert not results[0].is_error, text(results[0])
    assert "alice changed the arguments" in text(results[0]) and "only the pear order" in text(results[0])
    assert home.rows("SELECT item FROM orders ORDER BY id") == [("apple",), ("plum",)]
    request_id = page.url.rsplit("/", 1)[1]
    await page.goto(f"{base}/inbox/requests/{request_id}")
    await expect(page.locator("p.edited")).to_contain_text("edited by alice")
    await expect(page.locator("ul.diff")).to_contain_text("/statement")
    await expect(page.locator("details.edit")).to_have_count(0)  # ran: nothing left to edit
    entry = page.locator("ol.events > li", has_text="edited the arguments")
    await expect(entry).to_contain_text("only the pear order")
    await expect(entry).to_contain_text("DELETE FROM orders WHERE item = 'pear'")
    await screenshot(page, "request-edited")
    refused = [e["payload"]["code"] for e in home.ledger_events(request_id) if e["kind"] == "vote.refused"]
    assert refused == ["denied_by_policy"]
