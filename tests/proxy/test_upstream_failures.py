"""An upstream that crashes, hangs, cannot restart or changes its tools, behind a real `keyturn proxy` over
stdio: calls fail with a clear error and are recorded, nothing runs unguarded, and service resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
from mcp import Client

from tests.conftest import ReviewerAPI
from tests.helpers import eventually, outcome_of
from tests.proxy.conftest import ProxyHome, host_pids, text


async def test_a_crash_mid_call_is_a_recorded_failure_and_the_upstream_restarts(home: ProxyHome) -> None:
    home.configure([home.flaky()])
    with anyio.fail_after(60):
        async with Client(home.proxy_params()) as client:
            before = await client.call_tool("echo", {"text": "one"})
            crashed = await client.call_tool("crash", {})
            after = await client.call_tool("echo", {"text": "two"})
    assert text(before) == "one" and text(after) == "two"
    assert crashed.is_error and "went away during crash" in text(crashed)
    assert "it may or may not have acted" in text(crashed)
    call_id = outcome_of(crashed)["call_id"]
    assert home.terminal(call_id) == "failed"
    assert "went away" in home.ledger_events(call_id)[-1]["payload"]["error"]
    pids = [c["pid"] for c in home.calls()]
    assert pids[0] == pids[1] != pids[2]  # the same call log, a new upstream process


async def test_a_call_approved_while_the_upstream_is_down_is_failed_not_executed(home: ProxyHome) -> None:
    home.configure([home.flaky()], reconnect_wait=1)
    api = ReviewerAPI(home.serve_http())
    results: list[types.CallToolResult] = []
    with anyio.fail_after(60):
        async with Client(home.proxy_params()) as client:

            async def agent() -> None:
                results.append(await client.call_tool("run_query", {"query": "UPDATE t SET x = 1"}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                req = await api.wait_pending("run_query")
                (home.dir / "down").touch()  # from now on the upstream exits as soon as it starts
                await client.call_tool("crash", {})
                assert (await api.vote(req["id"], "approve", "alice", "fine")).status_code == 200
            assert results[0].is_error and "is not available" in text(results[0])
            assert "was not delivered" in text(results[0])
            (home.dir / "down").unlink()
            async def echoed() -> types.CallToolResult | None:
                answer = await client.call_tool("echo", {"text": "back"})
                return None if answer.is_error else answer

            again = await eventually(echoed, within=20, every=0.2)
            assert text(again) == "back"
    kinds = [e["kind"] for e in home.ledger_events(req["id"])]
    assert kinds.count("execution.started") == 1 and kinds[-1] == "failed" and "executed" not in kinds
    assert all(c["tool"] != "run_query" for c in home.calls())  # never delivered


async def test_a_hung_upstream_times_out_and_is_restarted(home: ProxyHome) -> None:
    home.configure([home.flaky(call_timeout=1)], connect_timeout=2, health_interval=None)
    with anyio.fail_after(60):
        async with Client(home.proxy_params()) as client:
            hung = await client.call_tool("hang", {})
            assert hung.is_error and "did not answer hang within 1s" in text(hung)
            async def alive() -> types.CallToolResult | None:
                answer = await client.call_tool("echo", {"text": "alive"})
                return None if answer.is_error else answer

            after = await eventually(alive, within=30, every=0.2)
    assert text(after) == "alive"
    assert home.terminal(outcome_of(hung)["call_id"]) == "failed"
    assert len({c["pid"] for c in home.calls()}) == 2


async def test_upstream_progress_reaches_the_agent(home: ProxyHome) -> None:
    home.configure([home.flaky()])
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    with anyio.fail_after(60):
        async with Client(home.proxy_params()) as client:
            result = await client.call_tool("slow", {"steps": 3}, progress_callback=on_progress)
    assert text(result) == "done in 3 steps"
    assert [m for _, _, m in seen] == ["step 1", "step 2", "step 3"]
    assert [p for p, _, _ in seen] == sorted({p for p, _, _ in seen}) and seen[-1][1] == 3


async def test_an_upstream_error_and_an_unknown_tool(home: ProxyHome) -> None:
    home.configure([home.flaky()])
    with anyio.fail_after(60):
        async with Client(home.proxy_params()) as client:
            failed = await client.call_tool("fail", {})
            invalid = await client.call_tool("echo", {"text": "x" * 101, "extra": "sk-live-abcdef0123456789"})
    assert failed.is_error and text(failed) == "upstream says no: the flux capacitor is offline"
    assert invalid.is_error and "unknown argument(s) 'extra'" in text(invalid)
    assert "sk-live" not in text(invalid) and "xxxx" not in text(invalid)  # values are never echoed
    assert [c["tool"] for c in home.calls()] == ["fail"]


async def test_tool_list_changes_are_followed_and_announced(home: ProxyHome) -> None:
    home.configure([home.flaky()])
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    with anyio.fail_after(60):
        # a 2025-era client (as desktop agents are) gets notifications/tools/list_changed
        async with Client(home.proxy_params(), mode="legacy", message_handler=on_message) as client:
            assert "extra" not in {t.name for t in (await client.list_tools()).tools}
            await client.call_tool("add_tool", {})
            await changed.wait()
            assert "extra" in {t.name for t in (await client.list_tools()).tools}
            assert text(await client.call_tool("extra", {})) == "extra ran"


async def test_a_2026_client_hears_of_tool_changes_on_its_listen_stream(home: ProxyHome) -> None:
    home.configure([home.flaky()])
    with anyio.fail_after(60):
        async with Client(home.proxy_params()) as client, client.listen(tools_list_changed=True) as subscription:
            await client.call_tool("add_tool", {})
            async for _event in subscription:
                break
            assert "extra" in {t.name for t in (await client.list_tools(cache_mode="refresh")).tools}


async def test_a_command_line_upstream_inherits_the_environment_but_not_keyturns_secrets(home: ProxyHome) -> None:
    home.configure([])
    flaky = home.flaky()
    params = home.proxy_params("--mount-rw", str(home.dir), "--", flaky["command"], *flaky["args"])
    assert params.env is not None
    params.env.update({"KEYTURN_TOKEN": "reviewer-secret", "UPSTREAM_SETTING": "1"})
    with anyio.fail_after(60):
        async with Client(params) as client:
            names = text(await client.call_tool("env", {})).split()
    assert "UPSTREAM_SETTING" in names and not [n for n in names if n.startswith("KEYTURN_")]


def test_sigterm_ends_keyturn_cleanly_and_stops_the_upstream(home: ProxyHome) -> None:
    home.configure([home.flaky()])
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "proxy", "--config", str(home.config)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=home.env(), cwd=home.dir)
    try:
        assert proc.stderr is not None
        assert b"serving 8 guarded tools" in proc.stderr.readline()  # up, with the upstream's tools
        [upstream] = host_pids(str(home.dir / "calls.log"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        deadline = time.monotonic() + 10
        while _alive(upstream) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(upstream) and not host_pids(str(home.dir / "calls.log"))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone before it was opened, or reaped while it was read
        return False
