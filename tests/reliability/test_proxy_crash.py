"""An upstream MCP server (proxy mode) that crashes in the middle of an *approved* call.

tests/proxy/test_upstream_failures.py covers an allowed call whose upstream crashes, a call approved while the
upstream is down, and a hung upstream. This adds the approved-then-crashed path end to end and the checks every
fault test here ends with: one terminal event (`failed`, never `executed`), delivered once, and the chain verifies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from mcp import Client

from tests.conftest import ReviewerAPI
from tests.proxy.conftest import ProxyHome
from tests.reliability.conftest import TERMINAL, text

POLICY = Path(__file__).resolve().parent / "proxy-policy.yaml"


async def test_an_upstream_crashing_during_an_approved_call_fails_it_once_and_the_ledger_verifies(
        tmp_path: Path) -> None:
    home = ProxyHome(dir=tmp_path, config=tmp_path / "keyturn.yaml", db=tmp_path / "ledger.db",
                     data_db=tmp_path / "unused.db")
    try:
        home.write_config(tools=[], policy=str(POLICY), proxy={
            "upstreams": [home.flaky()], "restart_backoff": 0.2, "restart_backoff_max": 1, "reconnect_wait": 5,
            "connect_timeout": 20})
        api = ReviewerAPI(home.serve_http())
        results: list[Any] = []
        with anyio.fail_after(90):
            async with Client(home.proxy_params()) as client:
                async def agent() -> None:
                    results.append(await client.call_tool("crash", {}))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(agent)
                    req = await api.wait_pending("crash")
                    assert home.calls() == []  # held: not delivered
                    assert (await api.vote(req["id"], "approve", "alice", "go ahead")).status_code == 200
                with anyio.fail_after(30):
                    while (after := await client.call_tool("echo", {"text": "back"})).is_error:
                        await anyio.sleep(0.2)
                assert text(after) == "back"
        crashed = results[0]
        assert crashed.is_error and "went away during crash" in text(crashed), text(crashed)
        kinds = [e["kind"] for e in home.ledger_events(req["id"])]
        assert kinds.count("execution.started") == 1
        assert [k for k in kinds if k in TERMINAL] == ["failed"]
        assert [c["tool"] for c in home.calls()].count("crash") == 1  # delivered once, never retried
        home.stop_all()
        verify = home.keyturn("audit", "verify", "--config", str(home.config))
        assert verify.returncode == 0 and "chain intact" in verify.stdout, verify.stdout + verify.stderr
    finally:
        home.stop_all()
