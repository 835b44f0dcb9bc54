"""A stdio upstream's calls, through the SDK's public client: each request reaches the upstream, its results, errors
and progress come back, an abandoned call is cancelled upstream, a crash or a hang ends the call with keyturn's own
error and the upstream is restarted. Real upstream processes, in-process and behind a real `keyturn proxy`."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from server.errors import ToolError
from server.proxy import Upstream, parse_proxy_config
from server.proxy.upstream import supervised
from tests.helpers import eventually
from tests.proxy.conftest import FLAKY, HERE, ProxyHome, host_pids, text

MODERN = HERE / "modern_server.py"
Outcome = tuple[str, Any, list[tuple[float, float | None, str | None]]]


def flaky(log: Path) -> dict[str, Any]:
    return {"name": "flaky", "command": sys.executable, "args": [str(FLAKY), str(log)],
            "mounts": [{"path": str(log.parent), "writable": True}]}


def modern(log: Path) -> dict[str, Any]:
    return {"name": "modern", "command": sys.executable, "args": [str(MODERN), str(log)],
            "mounts": [{"path": str(log.parent), "writable": True}]}


def logged(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def pids(log: Path) -> list[str]:
    """The flaky upstream's processes, in the order they started."""
    return Path(f"{log}.pids").read_text().split()


@asynccontextmanager
async def upstream(config: dict[str, Any], **proxy: Any) -> AsyncIterator[Upstream]:
    settings = parse_proxy_config({"upstreams": [config], "restart_backoff": 0.2, "restart_backoff_max": 1,
                                   "reconnect_wait": 10, "connect_timeout": 20, "health_interval": None, **proxy})
    up = Upstream(settings.upstreams[0], settings, {})
    with anyio.fail_after(60):
        async with supervised([up], 20):
            assert up.state == "up", up.last_error
            yield up


async def outcome(up: Upstream, tool: str, arguments: dict[str, Any]) -> Outcome:
    """What the gate gets back from one forwarded call: a result, or the ToolError's text; and the progress."""
    seen: list[tuple[float, float | None, str | None]] = []

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    try:
        result = await up.call(tool, arguments, progress)
    except ToolError as e:
        return "error", str(e), seen
    return "result", result.model_dump(mode="json", by_alias=True), seen


CALLS = {
    "flaky": [("echo", {"text": "héllo"}), ("fail", {}), ("nope", {}), ("slow", {"steps": 3}), ("crash", {}),
              ("echo", {"text": "back"})],
    "modern": [("echo", {"text": "héllo"}), ("fail", {}), ("refuse", {}), ("bad_output", {}), ("ask", {}),
               ("resume", {}), ("slow", {"steps": 3}), ("crash", {}), ("echo", {"text": "back"})],
}


@pytest.mark.parametrize("server", ["flaky", "modern"])
async def test_calls_give_the_upstreams_results_errors_and_progress(server: str, tmp_path: Path) -> None:
    log = tmp_path / f"{server}.log"
    async with upstream((flaky if server == "flaky" else modern)(log)) as up:
        run = [await outcome(up, tool, arguments) for tool, arguments in CALLS[server]]
    received = [c for c in logged(log) if "tool" in c]
    assert [c["tool"] for c in received if c.get("state") is None] == [t for t, _ in CALLS[server]]
    by_tool = dict(zip([t for t, _ in CALLS[server]], run, strict=False))
    assert by_tool["fail"][1]["isError"] is True
    assert [m for _, _, m in by_tool["slow"][2]] == ["step 1", "step 2", "step 3"]
    assert "went away during crash" in by_tool["crash"][1] and "may or may not have acted" in by_tool["crash"][1]
    assert by_tool["echo"][1]["content"][0]["text"] == "back"  # the restarted upstream
    if server == "flaky":
        assert by_tool["nope"][1]["content"][0]["text"] == "Unknown tool: nope (upstream 'flaky', error -32602)"
    else:
        assert by_tool["refuse"][1]["content"][0]["text"] == \
            "refused: the vault is sealed (upstream 'modern', error -32050)"
        assert by_tool["refuse"][1]["isError"] is True
        assert "Invalid structured content returned by tool bad_output" in by_tool["bad_output"][1]
        # Asked with no agent request in flight (the call came from no agent): refused, saying so.
        assert "asked for elicitation outside any request of the agent's" in by_tool["ask"][1]["content"][0]["text"]
        assert by_tool["resume"][1]["content"][0]["text"] == "resumed from step-2"


async def test_a_2026_call_carries_the_sdk_clients_envelope(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    async with upstream(modern(log)) as up:
        await up.call("slow", {"steps": 1}, None)
        await up.call("slow", {"steps": 1}, _ignore)
    plain, with_progress = logged(log)
    assert plain["meta"] == {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                             "io.modelcontextprotocol/clientInfo": {"name": "keyturn-proxy", "version": "0.1.0"},
                             # what the upstream may ask of its client, passed on to the agent's (server.proxy.relay)
                             "io.modelcontextprotocol/clientCapabilities": {
                                 "sampling": {}, "elicitation": {"form": {}, "url": {}}, "roots": {"listChanged": True}},
                             # every log level: the relay filters by the level the agent set
                             "io.modelcontextprotocol/logLevel": "debug"}
    assert with_progress["meta"] == {**plain["meta"], "progressToken": with_progress["id"]}


async def _ignore(progress: float, total: float | None, message: str | None) -> None:
    pass


async def test_a_hung_call_times_out_is_cancelled_upstream_and_the_upstream_is_probed(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    async with upstream(modern(log), call_timeout=1) as up:
        with pytest.raises(ToolError, match=r"did not answer sleep within 1s; it may or may not have acted"):
            await up.call("sleep", {})
        sleep_id = next(c["id"] for c in logged(log) if c.get("tool") == "sleep")
        await eventually(lambda: {"cancelled": sleep_id} in logged(log), within=10)
        assert text(await up.call("echo", {"text": "still here"})) == "still here"
        assert up.restarts == 0  # the probe (tools/list) answered: not restarted


async def test_a_hung_upstream_is_restarted(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    async with upstream(flaky(log), call_timeout=1, connect_timeout=2) as up:
        with pytest.raises(ToolError, match="did not answer hang within 1s"):
            await up.call("hang", {})
        with anyio.fail_after(30):
            while True:  # a call sent before the probe gives up fails with the connection; then it is restarted
                try:
                    after = await up.call("echo", {"text": "alive"})
                    break
                except ToolError as e:
                    assert any(m in str(e) for m in ("did not answer echo", "went away during echo", "not available"))
        assert text(after) == "alive" and up.restarts == 1
    received = logged(log)
    assert len({c["pid"] for c in received}) == 2


async def test_an_answer_that_comes_too_late_is_dropped(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    async with upstream(flaky(log), call_timeout=1) as up:
        with pytest.raises(ToolError, match="did not answer slow"):
            await up.call("slow", {"steps": 24})  # answers after 1.2s, before it reads the next request
        assert text(await up.call("echo", {"text": "mine"})) == "mine"
        assert up.restarts == 0 and up.state == "up"
    assert [c["tool"] for c in logged(log)] == ["slow", "echo"] and len({c["id"] for c in logged(log)}) == 2


async def test_an_upstream_that_dies_while_idle_is_noticed_and_restarted(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    async with upstream(flaky(log)) as up:
        [pid] = host_pids(str(FLAKY), str(log))
        os.kill(pid, signal.SIGKILL)
        # its stdout closed: the SDK session's read stream ended
        await eventually(lambda: up.restarts != 0 and up.state == "up", within=20)
        assert text(await up.call("echo", {"text": "new process"})) == "new process"
    assert len(pids(log)) == 2


async def test_lines_that_are_not_answers_are_logged_and_dropped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with upstream(flaky(tmp_path / "calls.log")) as up:
        assert text(await up.call("noise", {})) == "after the noise"
        assert up.restarts == 0 and up.state == "up"
    # keyturn's own stdio client transport reads each line whole, and says what it could not take, and from whom
    assert "upstream flaky sent a message keyturn cannot take (it is not JSON)" in caplog.text
    assert "upstream flaky sent a message keyturn cannot take (it is not a valid JSON-RPC message)" in caplog.text


async def test_an_upstream_error_with_the_generic_server_code_is_its_answer_not_a_lost_connection(
        tmp_path: Path) -> None:
    """-32000 is JSON-RPC's generic server error, and also the code of the SDK's "connection closed": a live
    upstream that answers with it has answered (an error result, the same process goes on serving)."""
    log = tmp_path / "calls.log"
    async with upstream(flaky(log)) as up:
        result = await up.call("busy", {})
        assert result.is_error and text(result) == "busy: try again later (upstream 'flaky', error -32000)"
        assert text(await up.call("echo", {"text": "still here"})) == "still here"
        assert up.restarts == 0 and up.state == "up"
    assert len(pids(log)) == 1


async def test_a_malformed_answer_fails_its_call_and_the_upstream_keeps_serving(tmp_path: Path) -> None:
    """The answer carries its request's id, which keyturn reads from the raw line although the SDK cannot parse the
    message: the call fails at once (well before its timeout), saying the upstream may or may not have acted."""
    log = tmp_path / "calls.log"
    async with upstream(flaky(log), call_timeout=120) as up:
        with pytest.raises(ToolError, match=r"upstream 'flaky' sent a malformed answer to mangled \(its result is not "
                                            r"a JSON object\); it may or may not have acted"):
            await up.call("mangled", {})
        assert text(await up.call("echo", {"text": "fine"})) == "fine"
        assert up.restarts == 0 and up.state == "up"
    assert len(pids(log)) == 1


async def test_the_proxy_forwards_and_the_upstreams_progress_reaches_the_agent(home: ProxyHome) -> None:
    home.configure([home.flaky()])
    seen: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message)

    with anyio.fail_after(60):
        async with Client(home.proxy_params()) as client:
            result = await client.call_tool("slow", {"steps": 3}, progress_callback=on_progress)
    assert text(result) == "done in 3 steps" and seen == ["step 1", "step 2", "step 3"]
    [call] = home.calls()
    assert call["meta"]["progressToken"] is not None
