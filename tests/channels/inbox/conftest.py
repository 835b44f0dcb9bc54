"""Fixtures for the reviewer inbox: headless Debian Chromium driven by Playwright, signing in, screenshots.

The browser is required: when Chromium or Playwright is missing these tests fail (they never skip);
`scripts/test-deps VENV` installs both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, TOKENS

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"
TIMEOUT_MS = 15_000


def _playwright() -> Any:
    try:
        from playwright import async_api
    except ImportError as e:  # pragma: no cover - the loud failure the suite wants
        pytest.fail(f"the inbox browser tests need Playwright ({e}); run scripts/test-deps .venv", pytrace=False)
    if not CHROMIUM.exists():  # pragma: no cover
        pytest.fail(f"the inbox browser tests need Debian's chromium at {CHROMIUM}; run scripts/test-deps .venv",
                    pytrace=False)
    async_api.expect.set_options(timeout=TIMEOUT_MS)
    return async_api


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    api = _playwright()
    async with api.async_playwright() as p:
        b = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
                                    timeout=60_000)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
    p = await context.new_page()
    p.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        yield p
    finally:
        await context.close()
    # A CSP violation or a script error is a bug, not noise (a refused POST's status line is expected).
    unexpected = [e for e in errors if "Failed to load resource" not in e]
    assert not unexpected, unexpected


async def sign_in(page: Any, base: str, who: str, *, next_path: str = "") -> None:
    await page.goto(base + "/login" + (f"?next={next_path}" if next_path else ""))
    await page.get_by_label("Reviewer token").fill(TOKENS[who])
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(base + (next_path or "/inbox"))


async def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
