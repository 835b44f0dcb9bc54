"""Reviewers' single sign-on, in headless Chromium against a real OpenID Connect provider (node-oidc-provider on
127.0.0.1, started by the test): sign in through the provider, approve a held call, sign out. Then what an
attacker tries: a callback with a forged `state`, a replayed code, a callback from a sign-in another browser
started (login CSRF), an ID token for another client, and an account that is not a reviewer."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from playwright.async_api import expect

from tests.clients.conftest import NODE22
from tests.conftest import ROOT, Home, agent_client, free_port

PROVIDER = ROOT / "tests" / "channels" / "inbox" / "oidc_provider.mjs"
MODULES = ROOT / ".test-deps" / "oidc" / "node_modules"
CLIENT_ID, CLIENT_SECRET = "keyturn-inbox", "inbox-client-secret-7d2f"
ACCOUNTS = {"alice": {"email": "alice@example.com"}, "mallory": {"email": "mallory@example.com"},
            "unverified": {"email": "carol@example.com", "email_verified": False}}


@dataclass
class Provider:
    url: str
    proc: subprocess.Popen[str]


@pytest.fixture
def keyturn_port() -> int:
    return free_port()


@pytest.fixture
def provider(keyturn_port: int) -> Iterator[Provider]:
    if not NODE22.exists() or not (MODULES / "oidc-provider").exists():
        pytest.fail("the single sign-on stories need Node 22 and oidc-provider: run scripts/test-deps .venv",
                    pytrace=False)
    port = free_port()
    proc = subprocess.Popen(
        [str(NODE22), str(PROVIDER), str(MODULES), str(port), CLIENT_ID, CLIENT_SECRET,
         f"http://127.0.0.1:{keyturn_port}/login/sso/callback", json.dumps(ACCOUNTS)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "ready":
            break
    else:
        pytest.fail(f"the OpenID provider did not start (exit {proc.wait()})")
    yield Provider(f"http://127.0.0.1:{port}", proc)
    proc.terminate()
    proc.wait(10)
    proc.stdout.close()


def configure(home: Home, provider: Provider, client_id: str = CLIENT_ID) -> None:
    home.write_config(
        people={"alice": {"groups": ["dba"]}, "carol": {"groups": ["dba"]}},
        reviewers=[{"identity": "oidc:alice@example.com", "person": "alice"},
                   {"identity": "oidc:carol@example.com", "person": "carol"}],
        sso={"issuer": provider.url, "client_id": client_id, "client_secret_env": "KEYTURN_SSO_SECRET",
             "redirect_url": f"http://127.0.0.1:{home_port(home)}/login/sso/callback", "label": "Example SSO"})


def home_port(home: Home) -> int:
    return int(home.dir.joinpath("port").read_text())


async def provider_sign_in(page: Any, login: str) -> None:
    """The provider's own pages: its login form (any login name), then its consent page."""
    await page.locator("input[name=login]").fill(login)
    await page.locator("input[name=password]").fill("any")
    await page.locator("button[type=submit]").click()
    await page.wait_for_load_state()
    consent = page.locator("button[autofocus], button[type=submit]")
    if "/interaction/" in page.url:
        await consent.first.click()


@pytest.fixture
def sso_home(home: Home, provider: Provider, keyturn_port: int, monkeypatch: pytest.MonkeyPatch) -> Home:
    monkeypatch.setenv("KEYTURN_SSO_SECRET", CLIENT_SECRET)
    home.dir.joinpath("port").write_text(str(keyturn_port))
    configure(home, provider)
    return home


async def test_sign_in_through_the_provider_approve_and_sign_out(sso_home: Home, keyturn_port: int,
                                                                  provider: Provider, page: Any) -> None:
    home = sso_home
    base = home.serve_http(keyturn_port)
    await page.goto(base + "/inbox")
    await page.get_by_role("link", name="Sign in with Example SSO").click()
    await provider_sign_in(page, "alice")
    await expect(page).to_have_url(re.compile(re.escape(base) + r"/inbox$"))
    await expect(page.locator("header.top")).to_contain_text("alice")
    results: list[Any] = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "DELETE FROM orders WHERE item = 'pear'"}))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                card = page.locator("article.request")
                await expect(card).to_have_count(1)
                await card.get_by_label("Reason").fill("signed in through SSO")
                await card.get_by_role("button", name="Approve").click()
                await expect(page.locator(".notice.good")).to_contain_text("approved")
    assert not results[0].is_error
    votes = [e["payload"] for e in home.ledger_events() if e["kind"] == "vote"]
    assert [(v["person"], v["reviewer"], v["channel"]) for v in votes] == [("alice", "oidc:alice@example.com", "web")]
    await page.get_by_role("button", name="Sign out").click()
    # keyturn's session is over, and the browser is sent to the provider to end its session there too (RP-initiated
    # logout): the provider asks, then sends the browser back to keyturn's sign-in page.
    await expect(page).to_have_url(re.compile(re.escape(provider.url) + r"/session/end"))
    await page.locator("button[autofocus], button[type=submit]").first.click()
    await expect(page).to_have_url(re.compile(re.escape(base) + r"/login$"))
    await page.goto(base + "/inbox")
    await expect(page).to_have_url(re.compile(r"/login"))  # the session is over
    # Signing in again asks for the password: the provider's own session ended too (a shared computer's next
    # user is not signed in as alice by one click).
    await page.get_by_role("link", name="Sign in with Example SSO").click()
    await expect(page.locator("input[name=login]")).to_be_visible()


async def _callback_url(page: Any, base: str, login: str) -> tuple[str, list[Any]]:
    """A sign-in up to the provider's redirect back to keyturn, with this browser's sign-in cookie taken away first:
    keyturn refuses that callback before using its code, so the callback URL (returned, with the cookie) is
    still good for whoever holds the matching cookie."""
    await page.goto(base + "/login/sso")
    cookies = [c for c in await page.context.cookies() if c["name"] == "keyturn_sso"]
    assert len(cookies) == 1
    await page.context.clear_cookies(name="keyturn_sso")  # (the provider's own cookies stay)
    await provider_sign_in(page, login)
    await expect(page).to_have_url(re.compile(re.escape(base) + r"/login/sso/callback\?"))
    await expect(page.locator(".notice.bad")).to_contain_text("not started here")
    return page.url, cookies


async def test_forged_state_replayed_code_and_another_browsers_sign_in_are_refused(
        sso_home: Home, keyturn_port: int, browser: Any) -> None:
    base = sso_home.serve_http(keyturn_port)
    victim = await (await browser.new_context()).new_page()
    attacker = await (await browser.new_context()).new_page()

    # Login CSRF: the attacker's own sign-in, finished in the victim's browser, is refused (the state was derived
    # from the attacker's browser secret, not the victim's).
    await victim.goto(base + "/login/sso")  # the victim has a sign-in of their own under way
    stolen, _ = await _callback_url(attacker, base, "mallory")
    r = await victim.goto(stolen)
    assert r is not None and r.status == 403
    await expect(victim.locator(".notice.bad")).to_contain_text("not started here")

    # A forged state in the attacker's own browser: refused.
    forged = re.sub(r"state=[^&]+", "state=forged", stolen)
    r = await attacker.goto(forged)
    assert r is not None and r.status == 403

    # The real callback works once (mallory is no reviewer, so it ends in a 403 naming her: the code was good)...
    fresh = await (await browser.new_context()).new_page()  # (no provider session yet: its login form again)
    await fresh.goto(base + "/login/sso")
    await provider_sign_in(fresh, "mallory")
    await expect(fresh.locator(".notice.bad")).to_contain_text("mallory@example.com, who is not a keyturn reviewer")
    callback = fresh.url
    assert "/login/sso/callback?" in callback
    # ...and a replay of it is refused: the browser's sign-in cookie was used up.
    r = await fresh.goto(callback)
    assert r is not None and r.status == 403
    await expect(fresh.locator(".notice.bad")).to_contain_text("not started here")
    assert not [e for e in sso_home.ledger_events() if e["kind"] == "vote"]


async def test_a_replayed_code_is_refused_by_the_provider(sso_home: Home, keyturn_port: int, page: Any) -> None:
    base = sso_home.serve_http(keyturn_port)
    callback, cookies = await _callback_url(page, base, "alice")
    await page.context.add_cookies(cookies)
    # Signed in: its page moves on to the inbox by itself, at once (so wait only for the answer, then for the inbox).
    r = await page.goto(callback, wait_until="commit")
    assert r is not None and r.status == 200
    await expect(page).to_have_url(re.compile(re.escape(base) + r"/inbox$"))
    await page.context.add_cookies(cookies)
    r = await page.goto(callback)
    assert r is not None and r.status == 401
    await expect(page.locator(".notice.bad")).to_contain_text("refused the sign-in")


async def test_an_email_the_provider_did_not_verify_is_refused(sso_home: Home, keyturn_port: int,
                                                                 page: Any) -> None:
    base = sso_home.serve_http(keyturn_port)
    await page.goto(base + "/login/sso")
    await provider_sign_in(page, "unverified")  # carol@example.com is a reviewer, but the provider did not verify it
    await expect(page.locator(".notice.bad")).to_contain_text("not verified")
    r = await page.goto(base + "/inbox")
    assert r is not None and "/login" in page.url
