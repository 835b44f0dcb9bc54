"""The clients most agents are built on, against a real `keyturn serve` on the shipped default policy: the
TypeScript SDK's 1.x `Client` (Node 22) over stdio and over streamable HTTP, and the MCP Inspector CLI.

The SDK checks a result's `structuredContent` against the tool's output schema, even in an error result; the SQL and
shell tools declare one. So a refusal, a denial and the end of a withdrawn request must reach these clients as what
they are, with keyturn's details in the result's `_meta`, and an approved call's result must still match its schema.
Each story is one Node process (`typescript_client.mjs`) printing one JSON line per observation; reviewers decide
through the reviewer API of a `keyturn serve --http` on the same ledger.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import pytest

from tests.conftest import ROOT, TOKENS, Home, ReviewerAPI
from tests.helpers import eventually
from tests.proxy.conftest import HERE as PROXY_TESTS
from tests.proxy.conftest import ProxyHome
from tests.reliability.conftest import RelHome
from tests.reliability.test_rejoin import INSPECTOR_BIN, NODE22

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "typescript_client.mjs"
CLIENTS = ROOT / ".test-deps" / "clients" / "node_modules"
TS_SDK = CLIENTS / "@modelcontextprotocol" / "sdk" / "package.json"
DEFAULT_POLICY = ROOT / "policies" / "default.yaml"
OUTCOME = "io.keyturn/outcome"
AGENT = "agent-ci"

pytestmark = pytest.mark.skipif(
    not NODE22.exists() or not TS_SDK.exists(),
    reason="scripts/test-deps installs Node 22 and the TypeScript SDK into .test-deps")

ALLOWED = ("sql_query", {"query": "SELECT item, qty FROM orders ORDER BY id"})
REFUSED = ("sql_query", {"query": "SELECT 1", "bogus": "x"})  # not an argument of the tool: refused before policy
DENIED = ("shell_run", {"command": "sudo ls"})  # the default policy's shell-privilege rule
HELD = ("sql_execute", {"statement": "UPDATE orders SET qty = 4 WHERE item = 'apple'"})  # sql-write: one approval
WITHDRAWN = ("sql_execute", {"statement": "UPDATE orders SET qty = 0 WHERE item = 'pear'"})


@pytest.fixture
def kt(home: Home) -> Iterator[RelHome]:
    """keyturn as shipped: the default policy, the SQL and shell packs; `agent-ci` calls over HTTP with its token."""
    h = RelHome(dir=home.dir, config=home.config, db=home.db, data_db=home.data_db)
    (h.dir / "work").mkdir()  # (the home itself holds keyturn's files: a command run there acts on keyturn)
    h.write_config(
        policy=str(DEFAULT_POLICY),
        tools=[{"module": "tools.sql", "options": {"database": str(h.data_db), "export_dir": str(h.dir / "exports")}},
               {"module": "tools.shell", "options": {"cwd_roots": [str(h.dir / "work")]}}],
        agents=[{"name": AGENT, "token_sha256": hashlib.sha256(TOKENS[AGENT].encode()).hexdigest()}])
    yield h
    h.stop_all()


class Story:
    """One Node process telling a story: its observations, read one JSON line at a time."""

    def __init__(self, proc: anyio.abc.Process) -> None:
        self.proc = proc
        self.seen: list[dict[str, Any]] = []
        self._buffer = b""

    async def _line(self) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        while b"\n" not in self._buffer:
            try:
                self._buffer += await self.proc.stdout.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return None
        line, self._buffer = self._buffer.split(b"\n", 1)
        observation: dict[str, Any] = json.loads(line)
        self.seen.append(observation)
        return observation

    async def next(self, *events: str, within: float = 120) -> dict[str, Any]:
        """The next observation of one of `events` (those before it are kept in `seen`)."""
        with anyio.fail_after(within):
            while (observation := await self._line()) is not None:
                if observation["event"] in events:
                    return observation
        raise AssertionError(f"the story ended before {events}: {self.seen}")

    def all(self, event: str) -> list[dict[str, Any]]:
        return [o for o in self.seen if o["event"] == event]

    async def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send(line.encode() + b"\n")

    async def end(self) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.aclose()
        await self.next("closed")


def transport_spec(kt: RelHome, transport: str) -> dict[str, Any]:
    """How the client reaches keyturn: it starts `keyturn serve` itself (stdio, as a desktop agent does), or calls
    the HTTP server at `kt`'s first `serve --http` with the agent's bearer token."""
    if transport == "stdio":
        params = kt.stdio_params()
        return {"transport": "stdio", "command": params.command, "args": params.args, "env": params.env,
                "cwd": str(params.cwd)}
    base = kt.serve_http()
    return {"transport": "http", "url": f"{base}/mcp", "token": TOKENS[AGENT]}


def log_file(home: Home) -> IO[bytes]:
    return open(home.dir / "node.log", "ab")


@asynccontextmanager
async def typescript(home: Home, spec: dict[str, Any]) -> AsyncIterator[Story]:
    spec = {"modules": str(CLIENTS), "limitMs": 240_000, **spec}
    with log_file(home) as log:  # the client's stderr, and (stdio) keyturn's
        proc = await anyio.open_process([str(NODE22), str(SCRIPT), json.dumps(spec)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=log, cwd=home.dir)
    try:
        yield Story(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        with anyio.fail_after(30):
            await proc.wait()


def reviewer_api(kt: RelHome, spec: dict[str, Any]) -> ReviewerAPI:
    """The reviewer API: the HTTP server the agent calls, or (stdio) one serving the same ledger beside it."""
    return ReviewerAPI(spec["url"].removesuffix("/mcp") if spec["transport"] == "http" else kt.serve_http())


def text(result: dict[str, Any]) -> str:
    return "\n".join(c["text"] for c in result["content"] if c["type"] == "text")


def assert_keyturn_error(result: dict[str, Any], outcome: str) -> dict[str, Any]:
    """An error result of keyturn's own, as the wire carries it: text for the agent, details in `_meta`, and no
    structured content for the client to check against the tool's output schema."""
    assert result["isError"] is True, result
    assert "structuredContent" not in result, result
    details: dict[str, Any] = result["_meta"][OUTCOME]
    assert details["outcome"] == outcome, result
    return details


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_the_typescript_sdk_client_lists_runs_and_reads_refusals_and_denials_of_tools_with_output_schemas(
        kt: RelHome, transport: str) -> None:
    spec = transport_spec(kt, transport)
    calls = [{"tool": tool, "arguments": args} for tool, args in (ALLOWED, REFUSED, DENIED)]
    async with typescript(kt, {**spec, "story": "call", "calls": calls}) as story:
        tools = {t["name"]: t["outputSchema"] for t in (await story.next("tools"))["tools"]}
        allowed, refused, denied = [await story.next("result", "error") for _ in calls]
        await story.next("closed")
    # Each call's result reached the client, none an error the SDK raised (-32602: "Structured content does not
    # match the tool's output schema").
    assert [o["event"] for o in (allowed, refused, denied)] == ["result"] * 3, story.seen
    assert {"sql_query", "sql_execute", "sql_export", "shell_run", "keyturn_status", "keyturn_cancel"} <= set(tools)
    assert tools["sql_query"] and tools["shell_run"]  # both declare an output schema, which the client checks
    assert not story.all("error"), story.seen

    # The allowed call's result matches the tool's output schema (the client checked it).
    assert allowed["result"]["isError"] is False, allowed
    assert allowed["result"]["structuredContent"]["rows"] == [["apple", 3], ["pear", 5], ["plum", 7]]

    details = assert_keyturn_error(refused["result"], "denied")  # the ledger's word: denied by keyturn
    assert details["by"] == "keyturn" and details["code"] == "invalid_arguments" and "bogus" in text(refused["result"]), refused

    details = assert_keyturn_error(denied["result"], "denied")
    assert details["by"] == "policy" and "shell-privilege" in details["rules"], denied
    assert "Denied by policy" in text(denied["result"]) and "elevated privileges" in text(denied["result"])
    assert set(kt.assert_one_outcome_each().values()) == {"executed", "denied"}
    kt.verify()


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_the_typescript_sdk_client_waits_on_progress_past_its_timeout_and_gets_the_approved_result(
        kt: RelHome, transport: str) -> None:
    spec = transport_spec(kt, transport)
    api = reviewer_api(kt, spec)
    tool, args = HELD
    timeout_s = 8  # the client's request timeout, reset by every progress notification
    async with typescript(kt, {**spec, "story": "held", "calls": [{"tool": tool, "arguments": args}],
                               "timeoutMs": timeout_s * 1000}) as story:
        request = await api.wait_pending(tool, timeout=120)
        first = await story.next("progress")
        assert request["id"] in first["message"] and "waiting for human approval" in first["message"], first
        # keyturn's progress counts the seconds waited: approve only once the wait has outlived the client's timeout.
        while (await story.next("progress"))["progress"] < timeout_s * 1.5:
            pass
        assert kt.rows("SELECT qty FROM orders WHERE item = 'apple'") == [(3,)]
        approved = await api.vote(request["id"], "approve", "alice", "fine")
        assert approved.status_code == 200, approved.text
        result = (await story.next("result"))["result"]
        await story.next("closed")
    assert not story.all("error"), story.seen
    assert result["isError"] is False and result["structuredContent"] == {"rows_affected": 1}, result
    assert kt.rows("SELECT qty FROM orders WHERE item = 'apple'") == [(4,)]
    assert kt.assert_one_outcome_each() == {request["id"]: "executed"}
    kt.verify()


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_a_call_the_typescript_sdk_client_aborts_is_withdrawn_and_a_later_approval_runs_nothing(
        kt: RelHome, transport: str) -> None:
    spec = transport_spec(kt, transport)
    api = reviewer_api(kt, spec)
    tool, args = WITHDRAWN

    def kinds() -> list[str]:
        return [e["kind"] for e in kt.ledger_events(request["id"])]

    async with typescript(kt, {**spec, "story": "cancel", "calls": [{"tool": tool, "arguments": args}]}) as story:
        request = await api.wait_pending(tool, timeout=120)
        await story.next("aborted")  # the AbortSignal: the SDK sent notifications/cancelled and gave up the call
        await eventually(lambda: "client.left" in kinds(), within=60)  # the held call stopped waiting
        # The agent withdraws the request it abandoned (keyturn keeps it open for a retry until then).
        await story.tell(request["id"])
        withdrawn = (await story.next("withdrawn"))["result"]
        await story.end()
    assert withdrawn["isError"] is False and json.loads(text(withdrawn))["state"] == "cancelled", withdrawn
    assert not story.all("result") and not story.all("error"), story.seen
    late = await api.vote(request["id"], "approve", "alice", "too late")
    assert late.status_code == 409, late.text
    assert kt.rows("SELECT qty FROM orders WHERE item = 'pear'") == [(5,)]
    assert "execution.started" not in kinds()
    assert kt.assert_one_outcome_each() == {request["id"]: "cancelled"}
    kt.verify()


PROXY_POLICY = """
version: 1
default: review
review: {timeout: 10m, approvers: [{any: true, quorum: 1}]}
rules:
  - {id: echo, tool: echo, when: '!args.text.contains("forbidden")', outcome: allow, risk: low, reason: an echo}
  - {id: no-forbidden, tool: echo, when: 'args.text.contains("forbidden")', outcome: deny, risk: high,
     reason: a forbidden word}
  - {id: upstream-errors, tool: [fail, bad_output], outcome: allow, risk: low, reason: the upstream's own}
"""


async def test_the_typescript_sdk_client_reads_keyturns_denial_of_a_proxied_tool_with_an_output_schema(
        home: Home) -> None:
    """In proxy mode the upstream's tools keep their output schemas: keyturn's own error results must pass them, and
    the upstream's own error result reaches the client as the upstream sent it."""
    proxy = ProxyHome(dir=home.dir, config=home.config, db=home.db, data_db=home.data_db)
    (proxy.dir / "proxy-policy.yaml").write_text(PROXY_POLICY, encoding="utf-8")
    proxy.write_config(tools=[], policy=str(proxy.dir / "proxy-policy.yaml"), proxy={
        "upstreams": [{"name": "modern", "command": sys.executable,
                       "args": [str(PROXY_TESTS / "modern_server.py"), str(proxy.dir / "upstream-calls.log")],
                       "mounts": [{"path": str(proxy.dir), "writable": True}]}],
        "connect_timeout": 20})
    params = proxy.proxy_params()
    spec = {"transport": "stdio", "command": params.command, "args": params.args, "env": params.env,
            "cwd": str(params.cwd)}
    calls = [{"tool": "echo", "arguments": {"text": "hi"}}, {"tool": "echo", "arguments": {"text": "forbidden"}},
             {"tool": "fail", "arguments": {}}, {"tool": "bad_output", "arguments": {}}]
    async with typescript(proxy, {**spec, "story": "call", "calls": calls}) as story:
        tools = {t["name"]: t["outputSchema"] for t in (await story.next("tools"))["tools"]}
        echoed, denied, failed, bad = [await story.next("result", "error") for _ in calls]
        await story.next("closed")
    assert tools["echo"] and tools["bad_output"], tools
    assert echoed["event"] == "result" and echoed["result"]["structuredContent"] == {"result": "hi"}, echoed
    assert denied["event"] == "result", denied  # not the SDK's -32602
    details = assert_keyturn_error(denied["result"], "denied")
    assert details["rules"] == ["no-forbidden"] and "a forbidden word" in text(denied["result"]), denied
    # The upstream's own error result passes unchanged (keyturn records it as failed).
    assert failed["event"] == "result" and failed["result"]["isError"] is True, failed
    assert text(failed["result"]) == "upstream says no" and OUTCOME not in failed["result"].get("_meta", {}), failed
    # Structured content the upstream's own schema rejects fails the call in the proxy (its client checks results):
    # keyturn's error result for that failure must pass the schema in turn.
    assert bad["event"] == "result", bad
    assert "structured content" in text(bad["result"]) and assert_keyturn_error(bad["result"], "failed"), bad
    received = [e for e in proxy.ledger_events() if e["kind"] == "call.received"]
    assert [(e["payload"]["tool"], proxy.terminal(e["call_id"])) for e in received] == [
        ("echo", "executed"), ("echo", "denied"), ("fail", "failed"), ("bad_output", "failed")]


# -- the MCP Inspector CLI --------------------------------------------------------------------------------------


async def inspector(kt: RelHome, spec: dict[str, Any], *method: str) -> tuple[int, str]:
    """The Inspector CLI, as a user runs it: one method, then it exits; its exit status and output. Over stdio it
    starts keyturn from an `mcpServers` file (its own `--config` option would take keyturn's)."""
    if spec["transport"] == "stdio":
        servers = kt.dir / "inspector-servers.json"
        servers.write_text(json.dumps({"mcpServers": {"keyturn": {
            "command": spec["command"], "args": spec["args"], "env": spec["env"]}}}), encoding="utf-8")
        target = ["--config", str(servers), "--server", "keyturn"]
    else:
        target = [spec["url"], "--transport", "http", "--header", f"Authorization: Bearer {spec['token']}"]
    # (the CLI runs its client with the `node` on PATH: Node 22's)
    env = {**os.environ, "PATH": f"{NODE22.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with anyio.fail_after(180):
        done = await anyio.run_process([str(NODE22), str(INSPECTOR_BIN), "--cli", *target, *method], check=False,
                                       env=env, cwd=kt.dir, stderr=subprocess.STDOUT)
    return done.returncode, done.stdout.decode(errors="replace")


def tool_call(tool: str, arguments: dict[str, str]) -> list[str]:
    return ["--method", "tools/call", "--tool-name", tool, "--tool-arg", *(f"{k}={v}" for k, v in arguments.items())]


@pytest.mark.skipif(not INSPECTOR_BIN.exists(), reason="scripts/test-deps installs the Inspector")
@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_the_inspector_cli_lists_runs_and_shows_refusals_and_denials_of_tools_with_output_schemas(
        kt: RelHome, transport: str) -> None:
    spec = transport_spec(kt, transport)
    status, out = await inspector(kt, spec, "--method", "tools/list")
    assert status == 0, out
    listed = {t["name"]: t for t in json.loads(out)["tools"]}
    assert "outputSchema" in listed["sql_query"] and "outputSchema" in listed["shell_run"]

    status, out = await inspector(kt, spec, *tool_call(*ALLOWED))
    assert status == 0, out
    assert json.loads(out)["structuredContent"]["rows"] == [["apple", 3], ["pear", 5], ["plum", 7]]

    status, out = await inspector(kt, spec, *tool_call(*REFUSED))
    assert status == 0 and "-32602" not in out, out  # (shown, not thrown as a mismatch with the output schema)
    details = assert_keyturn_error(json.loads(out), "denied")
    assert details["by"] == "keyturn" and details["code"] == "invalid_arguments" and "bogus" in text(json.loads(out)), out

    status, out = await inspector(kt, spec, *tool_call(*DENIED))
    assert status == 0 and "-32602" not in out, out
    details = assert_keyturn_error(json.loads(out), "denied")
    assert "shell-privilege" in details["rules"] and "elevated privileges" in text(json.loads(out)), out
    assert sorted(kt.assert_one_outcome_each().values()) == ["denied", "denied", "executed"]
    kt.verify()


@pytest.mark.skipif(not INSPECTOR_BIN.exists(), reason="scripts/test-deps installs the Inspector")
async def test_the_inspector_cli_over_stdio_waits_for_an_approval_and_shows_the_result(kt: RelHome) -> None:
    spec = transport_spec(kt, "stdio")
    api = reviewer_api(kt, spec)
    tool, args = HELD
    async with anyio.create_task_group() as tg:
        told: list[tuple[int, str]] = []

        async def run() -> None:
            told.append(await inspector(kt, spec, *tool_call(tool, args)))

        tg.start_soon(run)
        request = await api.wait_pending(tool, timeout=120)  # within the Inspector's own 60 s request timeout
        approved = await api.vote(request["id"], "approve", "alice", "fine")
        assert approved.status_code == 200, approved.text
    status, out = told[0]
    assert status == 0, out
    assert json.loads(out)["structuredContent"] == {"rows_affected": 1}
    assert kt.rows("SELECT qty FROM orders WHERE item = 'apple'") == [(4,)]
    assert kt.assert_one_outcome_each() == {request["id"]: "executed"}
    kt.verify()
