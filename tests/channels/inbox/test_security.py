"""The pages' defences, against a real server: sign-in only with reviewer tokens, CSRF and Origin checks on
every state change, cookie flags, a strict Content-Security-Policy, sign-out, and no secret file for sessions."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import anyio
import httpx2
from playwright.async_api import expect

from tests.channels.inbox.conftest import screenshot, sign_in
from tests.conftest import TOKENS, Home, ReviewerAPI, agent_client


async def test_a_bad_token_or_an_agent_token_cannot_sign_in(home: Home, page: Any) -> None:
    home.write_config(agents=[{"name": "agent-ci", "token_sha256": hashlib.sha256(TOKENS["agent-ci"].encode())
                               .hexdigest()}])
    base = home.serve_http()
    await page.goto(base + "/inbox")
    await expect(page).to_have_url(re.compile(r"/login\?next=%2Finbox$"))  # not signed in: sent to sign in
    for token in ("not-a-token", TOKENS["agent-ci"]):
        await page.get_by_label("Reviewer token").fill(token)
        async with page.expect_response(lambda r: r.request.method == "POST") as answer:
            await page.get_by_role("button", name="Sign in").click()
        assert (await answer.value).status == 401
        await expect(page.locator(".notice.bad")).to_contain_text("not a reviewer token")
    await screenshot(page, "login")
    assert not [c for c in await page.context.cookies() if c["name"] == "keyturn_session"]
    await page.goto(base + "/audit")
    await expect(page).to_have_url(re.compile(r"/login"))


async def test_session_cookie_flags_security_headers_and_no_secret_file(home: Home, page: Any) -> None:
    base = home.serve_http()
    await sign_in(page, base, "alice")
    cookie = next(c for c in await page.context.cookies() if c["name"] == "keyturn_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]  # plain http here
    async with httpx2.AsyncClient(base_url=base, cookies={"keyturn_session": cookie["value"]}) as http, \
            httpx2.AsyncClient(base_url=base) as anonymous:
        for path in ("/inbox", "/audit", "/login", "/inbox/static/keyturn.js", "/inbox/static/keyturn.css"):
            r = await (anonymous if path == "/login" else http).get(path)
            assert r.status_code == 200, path
            csp = r.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        page_html = (await http.get("/inbox")).text
        assert "<script>" not in page_html and " on" + "click=" not in page_html  # no inline scripts
        assert "http://" not in page_html.replace(base, "") and "https://" not in page_html  # nothing external
        assert (await http.get("/inbox")).headers["cache-control"] == "no-store"
        r = await http.get("/inbox", headers={"Host": "evil.example"})
        assert r.status_code == 421  # the Host/Origin guard covers the pages too
    assert not home.db.with_name(home.db.name + ".web-secret").exists()  # sessions live in the database


async def test_posts_without_the_csrf_token_or_from_another_origin_are_refused(home: Home, page: Any) -> None:
    base = home.serve_http()
    await sign_in(page, base, "alice")
    results: list[Any] = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 3"}))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                card = page.locator("article.request")
                await expect(card).to_have_count(1)
                request_id = await card.get_attribute("data-id")
                # The browser's own form, with its synchronizer token removed:
                await card.locator("input[name=csrf]").evaluate("el => el.remove()")
                await card.get_by_label("Reason").fill("sneaky")
                async with page.expect_response(lambda r: r.request.method == "POST") as answer:
                    await card.get_by_role("button", name="Approve").click()
                assert (await answer.value).status == 403
                await expect(page.locator(".notice.bad")).to_contain_text("security token")

                cookie = next(c for c in await page.context.cookies() if c["name"] == "keyturn_session")
                await page.goto(f"{base}/inbox/requests/{request_id}")
                csrf = await page.locator("form.vote input[name=csrf]").get_attribute("value")
                vote = f"/inbox/requests/{request_id}/vote"
                form = {"csrf": csrf, "verdict": "approve", "reason": "forged"}
                async with httpx2.AsyncClient(base_url=base, cookies={"keyturn_session": cookie["value"]}) as http:
                    # a valid token, but the POST comes from another local origin (allowed by the Host guard)
                    other = await http.post(vote, data=form, headers={"Origin": "http://localhost:1"})
                    assert other.status_code == 403
                    bare = await http.post(vote, data=form)  # no Origin, no Referer
                    assert bare.status_code == 403
                    wrong = await http.post(vote, data={**form, "csrf": "x" * 43}, headers={"Origin": base})
                    assert wrong.status_code == 403
                    assert not [e for e in home.ledger_events(request_id) if e["kind"].startswith("vote")]
                    ok = await http.post(vote, data=form, headers={"Origin": base})
                    assert ok.status_code == 303
    assert not results[0].is_error
    votes = [e["payload"]["reason"] for e in home.ledger_events(request_id) if e["kind"] == "vote"]
    assert votes == ["forged"]  # only the request with token and origin counted


async def test_sign_out_ends_the_session_and_needs_a_token_too(home: Home, page: Any) -> None:
    base = home.serve_http()
    await sign_in(page, base, "alice")
    cookie = next(c for c in await page.context.cookies() if c["name"] == "keyturn_session")
    async with httpx2.AsyncClient(base_url=base, cookies={"keyturn_session": cookie["value"]}) as http:
        refused = await http.post("/logout", data={"csrf": ""}, headers={"Origin": base})
        assert refused.status_code == 403
        assert (await http.get("/inbox")).status_code == 200
    await page.get_by_role("button", name="Sign out").click()
    await expect(page).to_have_url(base + "/login")
    assert not [c for c in await page.context.cookies() if c["name"] == "keyturn_session"]
    async with httpx2.AsyncClient(base_url=base, cookies={"keyturn_session": cookie["value"]}) as http:
        r = await http.get("/inbox")  # the old cookie no longer works in this process
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        assert (await http.get("/inbox/events")).status_code == 401
    # the JSON API is untouched by the web session: it still wants a bearer token
    assert (await ReviewerAPI(base).request("GET", "/api/requests", None)).status_code == 401


def form_token(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


async def test_login_form_refuses_a_post_from_another_site(home: Home) -> None:
    base = home.serve_http()
    async with httpx2.AsyncClient(base_url=base) as http:
        first = form_token((await http.get("/login")).text)
        data = {"csrf": first, "token": TOKENS["alice"], "next": "/inbox"}
        r = await http.post("/login", data=data, headers={"Origin": "http://localhost:1"})
        assert r.status_code == 403 and "keyturn_session" not in r.cookies
        second = form_token(r.text)  # each form has its own token, bound to its cookie
        assert second != first
        r = await http.post("/login", data=data, headers={"Origin": base})
        assert r.status_code == 403  # the old form's token no longer matches the form cookie
        data["csrf"] = form_token(r.text)
        r = await http.post("/login", data={**data, "next": "https://evil.example/"}, headers={"Origin": base})
        assert r.status_code == 303 and r.headers["location"] == "/inbox"  # no open redirect
        assert "keyturn_session" in r.cookies
        huge = await http.post("/login", data={"token": "x" * 100_000}, headers={"Origin": base})
        assert huge.status_code == 413  # refused unread


async def test_what_an_agent_sends_is_shown_as_text_never_run_as_markup(home: Home, page: Any) -> None:
    base = home.serve_http()
    await sign_in(page, base, "alice")
    hostile = "UPDATE orders SET item = '<img src=x onerror=\"window.__xss=1\"><script>window.__xss=2</script>'"
    results: list[Any] = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": hostile}))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                card = page.locator("article.request")
                await expect(card.locator("pre.code.sql")).to_have_text(hostile)  # arrived live, as text
                await page.reload()
                await expect(card.locator("pre.code.sql")).to_have_text(hostile)  # and server-rendered
                assert await page.evaluate("window.__xss") is None
                assert await card.locator("img, script").count() == 0
                request_id = await card.get_attribute("data-id")
                await card.get_by_label("Reason").fill("<b>no</b>")
                await card.get_by_role("button", name="Deny").click()
                await expect(page.locator(".notice.good")).to_contain_text("denied by alice")
    assert results[0].is_error
    await page.goto(f"{base}/inbox/requests/{request_id}")
    await expect(page.locator("ol.events")).to_contain_text("reason: <b>no</b>")
    assert await page.locator("ol.events b, article img").count() == 0
    assert await page.evaluate("window.__xss") is None
