"""An auditor in a real browser: filters the ledger by tool, principal, reviewer, outcome and time, exports the
filtered view as CSV and JSON Lines, and sees the chain verification (and its failure after tampering)."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from playwright.async_api import expect

from tests.channels.inbox.conftest import screenshot, sign_in
from tests.conftest import Home, ReviewerAPI, agent_client


async def some_history(home: Home, base: str) -> dict[str, str]:
    """One call of each outcome: executed (allowed), denied by policy, denied by carol, approved by alice."""
    api = ReviewerAPI(base)
    ids: dict[str, str] = {}
    async with agent_client(base) as client:
        await client.call_tool("sql_query", {"query": "SELECT count(*) FROM orders"})
        await client.call_tool("sql_execute", {"statement": "DROP TABLE orders"})
        for statement, who, verdict in (("UPDATE orders SET qty = 1", "carol", "deny"),
                                         ("UPDATE orders SET qty = 2", "alice", "approve")):
            async def agent(statement: str = statement) -> None:
                await client.call_tool("sql_execute", {"statement": statement})

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(agent)
                    req = await api.wait_pending("sql_execute")
                    r = await api.vote(req["id"], verdict, who, f"{who} says {verdict}")
                    assert r.status_code == 200, r.text
            ids[who] = req["id"]
    return ids


async def rows(page: Any) -> list[list[str]]:
    out = []
    for row in await page.locator("table.calls tbody tr").all():
        out.append([c.strip() for c in await row.locator("td").all_inner_texts()])
    return out


async def download(page: Any, name: str) -> str:
    async with page.expect_download() as info:
        await page.get_by_role("link", name=name).click()
    path = await (await info.value).path()
    return await anyio.Path(path).read_text(encoding="utf-8")


async def test_filter_the_audit_view_export_it_and_see_the_chain_verified(home: Home, page: Any) -> None:
    base = home.serve_http()
    ids = await some_history(home, base)
    await sign_in(page, base, "dave", next_path="/audit")
    await expect(page.locator(".verify")).to_contain_text("Chain intact")
    all_rows = await rows(page)
    assert [r[3] for r in all_rows] == ["executed", "denied", "denied", "executed"]  # newest first
    await screenshot(page, "audit")

    await page.get_by_label("Outcome").select_option("denied")
    await page.get_by_role("button", name="Filter").click()
    await expect(page.locator("table.calls caption")).to_contain_text("2 requests")
    assert {r[1] for r in await rows(page)} == {"sql_execute"}

    await page.get_by_label("Reviewer").fill("carol")
    await page.get_by_role("button", name="Filter").click()
    await expect(page.locator("table.calls caption")).to_contain_text("1 request,")
    only = await rows(page)
    assert "carol ✗" in only[0][5]
    exported = list(csv.DictReader(io.StringIO(await download(page, "CSV"))))
    assert [r["id"] for r in exported] == [ids["carol"]]
    assert exported[0]["state"] == "denied" and "carol deny: carol says deny" in exported[0]["votes"]
    assert json.loads(exported[0]["arguments"]) == {"statement": "UPDATE orders SET qty = 1"}
    lines = (await download(page, "JSON Lines")).splitlines()
    assert [json.loads(line)["id"] for line in lines] == [ids["carol"]]

    await page.get_by_role("link", name="Clear").click()
    await page.get_by_label("Tool").fill("sql_query")
    await page.get_by_label("Principal").fill("local")
    await page.get_by_role("button", name="Filter").click()
    await expect(page.locator("table.calls caption")).to_contain_text("1 request,")
    assert (await rows(page))[0][1:4] == ["sql_query", "local", "executed"]

    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    await page.get_by_role("link", name="Clear").click()
    await page.get_by_label("From (UTC)", exact=True).fill(tomorrow)
    await page.get_by_role("button", name="Filter").click()
    await expect(page.locator("table.calls")).to_contain_text("Nothing in the ledger matches")
    yesterday = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    await page.get_by_label("From (UTC)", exact=True).fill(yesterday)
    await page.get_by_label("To (UTC)", exact=True).fill(tomorrow)
    await page.get_by_role("button", name="Filter").click()
    await expect(page.locator("table.calls caption")).to_contain_text("4 requests")
    exported_all = list(csv.DictReader(io.StringIO(await download(page, "CSV"))))
    assert len(exported_all) == 4

    await page.locator("table.calls tbody tr").first.get_by_role("link").click()
    await expect(page.locator("ol.events")).to_contain_text("alice approved")


async def test_bad_filters_are_explained_and_a_tampered_ledger_shows_as_broken(home: Home, page: Any) -> None:
    base = home.serve_http()
    await some_history(home, base)
    await sign_in(page, base, "alice", next_path="/audit")
    response = await page.goto(base + "/audit?since=yesterday&outcome=nonsense")
    assert response is not None and response.status == 400
    await expect(page.locator(".notice.bad")).to_contain_text("outcome must be one of")
    with sqlite3.connect(home.db) as conn:
        seq = conn.execute("SELECT seq FROM events WHERE kind = 'vote' ORDER BY seq LIMIT 1").fetchone()[0]
        conn.execute("UPDATE events SET payload = replace(payload, 'carol', 'mallory') WHERE seq = ?", (seq,))
    await page.goto(base + "/audit")
    await expect(page.locator(".verify")).to_have_class("verify bad")
    await expect(page.locator(".verify")).to_contain_text(f"broken at event {seq}")


async def test_a_call_denied_by_keyturn_before_the_policy_reads_plainly(home: Home, page: Any) -> None:
    """A call refused before any policy decision (arguments not valid for the tool; a write the read-only tool would
    refuse) shows as denied, why, and what was kept: no policy's default, no placeholder for arguments not kept."""
    base = home.serve_http()
    async with agent_client(base) as client:
        invalid = await client.call_tool("sql_query", {"query": 42})
        refused = await client.call_tool("sql_query", {"query": "/* tidy */ delete FROM orders"})
    invalid_id = (invalid.meta or {})["io.keyturn/outcome"]["call_id"]
    refused_id = (refused.meta or {})["io.keyturn/outcome"]["call_id"]
    await sign_in(page, base, "dave", next_path="/audit")
    assert [r[3] for r in await rows(page)] == ["denied", "denied"]

    await page.goto(f"{base}/inbox/requests/{invalid_id}")
    why = page.locator("section.why")
    await expect(why).to_contain_text("Denied by keyturn before the policy was asked: invalid arguments")
    await expect(page.locator("section.what")).to_contain_text("not kept: they were not valid for the tool")
    body = await page.locator("main").inner_text()
    assert "«unclassified»" not in body and "policy's default" not in body and "Why it was held" not in body, body

    await page.goto(f"{base}/inbox/requests/{refused_id}")
    await expect(why).to_contain_text("sql_query would refuse it: this call runs read-only")
    await expect(page.locator("section.what")).to_contain_text("delete FROM orders")
    await expect(page.locator("ol.events")).to_contain_text("Denied by keyturn")
    assert home.rows("SELECT count(*) FROM orders") == [(3,)]
