"""Upstreams that answer wrongly, behind a real `keyturn proxy`: each broken answer fails its call at once with an
error that names the upstream and what was wrong, the failure is recorded, and the same connection (and the same
upstream process or session) serves the next call. The call timeout is set far above the test's own deadline, so
a call that returns at all has not waited for it."""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
from mcp import Client

from tests.conftest import free_port
from tests.helpers import outcome_of
from tests.proxy.conftest import HERE, ProxyHome, text

BROKEN = HERE / "broken_server.py"
MALFORMED = {
    "mangled": "its result is not a JSON object",
    "no_message": "its error is not a JSON-RPC error (an object with an integer code and a message)",
    "old_jsonrpc": 'its jsonrpc version is "1.0", not "2.0"',
    "bad_utf8": "it is not valid UTF-8",
}


def logged(home: ProxyHome) -> list[dict[str, Any]]:
    path = home.dir / "broken.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def terminal_of(home: ProxyHome, tool: str) -> str:
    """The last ledger event of the (one) call of `tool`."""
    [call_id] = [e["call_id"] for e in home.ledger_events() if e["kind"] == "call.received"
                 and e["payload"]["tool"] == tool]
    return home.terminal(call_id)


def stdio_broken(home: ProxyHome) -> dict[str, Any]:
    return {"name": "broken", "command": sys.executable, "args": [str(BROKEN), str(home.dir / "broken.log")],
            "mounts": [{"path": str(home.dir), "writable": True}]}


def http_broken(home: ProxyHome) -> dict[str, Any]:
    port = free_port()
    home.start([sys.executable, str(BROKEN), str(home.dir / "broken.log"), "--http", str(port)],
               f"broken-{port}.log", f"http://127.0.0.1:{port}/mcp")
    return {"name": "broken", "url": f"http://127.0.0.1:{port}/mcp"}


async def test_a_malformed_answer_from_a_stdio_upstream_fails_its_call_at_once(home: ProxyHome) -> None:
    """keyturn's stdio client transport reads each line whole: the id of a malformed answer is read from it although
    the SDK cannot parse the message, and that call fails."""
    home.configure([stdio_broken(home)], call_timeout=120)
    with anyio.fail_after(90):
        async with Client(home.proxy_params()) as client:
            assert text(await client.call_tool("echo", {"text": "before"})) == "before"
            for tool, problem in MALFORMED.items():
                broken = await client.call_tool(tool, {})
                assert broken.is_error, text(broken)
                assert f"upstream 'broken' sent a malformed answer to {tool} ({problem})" in text(broken)
                assert "it may or may not have acted" in text(broken)
                assert text(await client.call_tool("echo", {"text": f"after {tool}"})) == f"after {tool}"
                call_id = outcome_of(broken)["call_id"]
                assert home.terminal(call_id) == "failed"
                assert problem in home.ledger_events(call_id)[-1]["payload"]["error"]
    assert len([e for e in logged(home) if "initialize" in e]) == 1  # one process, never restarted
    assert len({e["pid"] for e in logged(home)}) == 1


async def test_a_malformed_answer_from_an_http_upstream_fails_its_call_at_once(home: ProxyHome) -> None:
    """The SDK's streamable HTTP transport knows which request a response body answers: one it cannot parse fails
    that request with a parse error (-32700), and the session goes on."""
    home.configure([http_broken(home)], call_timeout=120)
    with anyio.fail_after(90):
        async with Client(home.proxy_params()) as client:
            for tool in [*MALFORMED, "no_id"]:
                broken = await client.call_tool(tool, {})
                assert broken.is_error, text(broken)
                assert text(broken).startswith("Failed to parse JSON response: ")
                assert text(broken).endswith("(upstream 'broken', error -32700)")
                assert text(await client.call_tool("echo", {"text": f"after {tool}"})) == f"after {tool}"
                assert terminal_of(home, tool) == "failed"
            busy = await client.call_tool("busy", {})
            assert busy.is_error and text(busy) == "busy: try again later (upstream 'broken', error -32000)"
            assert text(await client.call_tool("echo", {"text": "after busy"})) == "after busy"
    assert terminal_of(home, "busy") == "failed"
    assert len([e for e in logged(home) if "initialize" in e]) == 1  # one session: never reconnected


async def test_an_upstream_error_with_the_generic_server_code_is_its_answer_over_stdio(home: ProxyHome) -> None:
    """-32000 is JSON-RPC's generic server error, and the code of the SDK's own "connection closed" too: one that
    arrived from the upstream with the call's id is the upstream's answer, not a lost connection."""
    home.configure([stdio_broken(home)], call_timeout=120)
    with anyio.fail_after(60):
        async with Client(home.proxy_params()) as client:
            busy = await client.call_tool("busy", {})
            after = await client.call_tool("echo", {"text": "after"})
    assert busy.is_error and text(busy) == "busy: try again later (upstream 'broken', error -32000)"
    assert text(after) == "after"
    assert terminal_of(home, "busy") == "failed"
    assert len([e for e in logged(home) if "initialize" in e]) == 1


async def test_an_answer_whose_request_cannot_be_told_fails_nothing_and_the_call_ends_at_its_timeout(
        home: ProxyHome) -> None:
    home.configure([stdio_broken(home)], call_timeout=2)
    with anyio.fail_after(60):
        async with Client(home.proxy_params()) as client:
            lost = await client.call_tool("no_id", {})
            after = await client.call_tool("echo", {"text": "after"})
    assert lost.is_error and "did not answer no_id within 2s; it may or may not have acted" in text(lost)
    assert text(after) == "after"
    assert home.terminal(outcome_of(lost)["call_id"]) == "failed"
    assert len([e for e in logged(home) if "initialize" in e]) == 1
