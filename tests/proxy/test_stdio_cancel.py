"""`keyturn proxy` over stdio: a held call the agent cancels with `"notifications\\/cancelled"` (valid JSON escaping)
is withdrawn, and a reviewer's later approval delivers nothing to the upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from tests.conftest import ReviewerAPI
from tests.helpers import eventually
from tests.proxy.conftest import ProxyHome
from tests.reliability.test_stdio_cancel import ESCAPED_CANCEL, Wire, stdio_wire


@asynccontextmanager
async def stdio_proxy(home: ProxyHome) -> AsyncIterator[Wire]:
    params = home.proxy_params()
    async with stdio_wire([params.command, *params.args], home.dir / "proxy-stdio.log", home.dir,
                          {**home.env(), **(params.env or {})}) as wire:
        yield wire


async def test_an_escaped_cancel_withdraws_a_held_proxy_call_and_the_approval_delivers_nothing(
        home: ProxyHome) -> None:
    home.configure([home.flaky()])
    api = ReviewerAPI(home.serve_http())
    async with stdio_proxy(home) as wire:
        await wire.initialize()
        await wire.send({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
            "name": "run_query", "arguments": {"query": "UPDATE t SET x = 1"}, "_meta": {"progressToken": "p7"}}})
        request = await api.wait_pending("run_query")
        await wire.send(ESCAPED_CANCEL)
        await eventually(lambda: "client.left" in [e["kind"] for e in home.ledger_events(request["id"])], within=20)
        assert (await api.vote(request["id"], "approve", "alice", "fine")).status_code == 200
        assert "approval.granted" in [e["kind"] for e in home.ledger_events(request["id"])]
        # The process that held the call learns of an approval within a poll (0.1 s): time enough to run it, were it
        # still waiting.
        with anyio.move_on_after(3):
            while "execution.started" not in [e["kind"] for e in home.ledger_events(request["id"])]:
                await anyio.sleep(0.05)
        await wire.send({"jsonrpc": "2.0", "id": 8, "method": "ping"})
        assert "result" in await wire.answer(8)
        await wire.leave()
    assert not [m for m in wire.seen if m.get("id") == 7 and "method" not in m], wire.seen
    assert all(c["tool"] != "run_query" for c in home.calls())  # never delivered
    kinds = [e["kind"] for e in home.ledger_events(request["id"])]
    assert "execution.started" not in kinds and "executed" not in kinds, kinds
    assert json.loads(ESCAPED_CANCEL)["params"]["requestId"] == 7
