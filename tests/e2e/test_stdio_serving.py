"""`keyturn serve` over stdio, through the MCP SDK's dispatcher: calls after the SDK's handshake or on a 2026-07-28
session (no handshake: each request carries its envelope in `_meta`), unusual and odd requests, held calls with
progress, cancellation, concurrency and a client that leaves. Each story runs a real `keyturn serve` process and
reads its answers line by line, or through the SDK's own client."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError

from tests.conftest import DATA, ROOT, Home, ReviewerAPI
from tests.helpers import client_call

MODERN = "2026-07-28"
VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
INFO_KEY = "io.modelcontextprotocol/clientInfo"
CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"
HANDSHAKE = "2025-06-18"
ERAS = [HANDSHAKE, MODERN]
ENVELOPE: dict[str, Any] = {  # what a 2026-07-28 client puts in every request's `_meta`
    VERSION_KEY: MODERN, INFO_KEY: {"name": "raw-agent", "version": "9.2"}, CAPABILITIES_KEY: {}}


def text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def params(home: Home) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=["-m", "server.cli", "serve", "--config", str(home.config), "--log-level", "DEBUG"],
        env={"PYTHONPATH": str(ROOT)}, cwd=str(home.dir))


def appending(log: Path) -> TextIO:
    """The server's stderr: one log file per story, appended to by each server it starts."""
    return open(log, "a", encoding="utf-8")  # (a real file: the child process writes to it)


@asynccontextmanager
async def sdk_client(home: Home, log: Path, mode: Any = "legacy") -> AsyncIterator[Client]:
    """The SDK's client over stdio; `legacy` is the initialize handshake that agent apps use today."""
    with appending(log) as errlog:
        async with Client(stdio_client(params(home), errlog=errlog), mode=mode) as client:
            yield client


def same_call_ids(line: bytes) -> bytes:
    return re.sub(rb'"call_id":"[0-9a-f]+"', b'"call_id":"-"', line)  # one per call


class Raw:
    """A JSON-RPC client that writes and reads raw lines, to see the server's answers byte for byte."""

    def __init__(self, proc: Process) -> None:
        self.proc = proc
        assert proc.stdout is not None and proc.stdin is not None
        self.stdout = BufferedByteReceiveStream(proc.stdout)

    async def send(self, message: dict[str, Any] | bytes) -> None:
        line = message if isinstance(message, bytes) else json.dumps(message).encode()
        assert self.proc.stdin is not None
        await self.proc.stdin.send(line + b"\n")

    async def line(self, timeout: float = 60) -> bytes:
        """The next line, without its newline."""
        with anyio.fail_after(timeout):
            return await self.stdout.receive_until(b"\n", 2**24)

    async def response(self, rid: Any, timeout: float = 60) -> tuple[bytes, list[dict[str, Any]]]:
        """The response line for `rid`, and the notifications that came before it."""
        notes: list[dict[str, Any]] = []
        while True:
            line = await self.line(timeout)
            message = json.loads(line)
            if "id" in message and "method" not in message:
                assert message["id"] == rid, f"expected the response to {rid!r}, got {line!r}"
                return line, notes
            notes.append(message)

    async def initialize(self, version: str = "2025-06-18") -> bytes:
        await self.send({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "raw-agent", "version": "7.1"}}})
        line, _ = await self.response(0)
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return line

    async def discover(self, rid: Any = 0) -> bytes:
        """Open a 2026-07-28 session as the SDK's own client does: no handshake, the envelope on each request."""
        await self.send({"jsonrpc": "2.0", "id": rid, "method": "server/discover", "params": {"_meta": ENVELOPE}})
        line, _ = await self.response(rid)
        return line

    async def answer_before(self, message: dict[str, Any] | bytes, expected: Any, sync: dict[str, Any]) -> bytes | None:
        """Send `message`, then the request `sync`; return the answer to `message` (None if `expected` is None: the
        SDK drops some lines unanswered), read until `sync` is answered too, which shows the server is past it."""
        await self.send(message)
        await self.send(sync)
        synced, answered, answer = False, expected is None, None
        while not (synced and answered):
            line = await self.line()
            if json.loads(line).get("id") == sync["id"]:  # (it can overtake the answer: the SDK runs both as tasks)
                synced = True
            else:
                assert json.loads(line)["id"] == expected and not answered, line
                answer, answered = line, True
        return answer

    async def open(self, era: str) -> None:
        """Open a session of `era`: the handshake, or a 2026-07-28 discover."""
        await (self.initialize() if era == HANDSHAKE else self.discover())

    async def call(self, rid: Any, tool: str, arguments: dict[str, Any], **meta: Any) -> bytes:
        await self.send(tool_call(rid, tool, arguments, **meta))
        line, _ = await self.response(rid)
        return line

    async def leave(self) -> bytes:
        """Close the server's stdin and read what it writes until it exits."""
        assert self.proc.stdin is not None
        await self.proc.stdin.aclose()
        rest = b""
        with anyio.fail_after(20):
            try:
                while True:
                    rest += await self.stdout.receive()
            except anyio.EndOfStream:
                pass
        return rest


def tool_call(rid: Any, tool: str, arguments: dict[str, Any], **meta: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": tool, "arguments": arguments}
    if meta:
        body["_meta"] = meta
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": body}


def era_meta(era: str, **meta: Any) -> dict[str, Any]:
    """A request's `_meta` in a session of `era`: in 2026-07-28 the envelope comes first."""
    return {**(ENVELOPE if era == MODERN else {}), **meta}


@asynccontextmanager
async def raw_server(home: Home, log: Path) -> AsyncIterator[Raw]:
    p = params(home)
    with appending(log) as errlog:
        async with await anyio.open_process([p.command, *p.args], stderr=errlog, cwd=home.dir,
                                            env={**home.env(), **(p.env or {})}) as proc:
            try:
                yield Raw(proc)
            finally:
                assert proc.stdin is not None
                await proc.stdin.aclose()
                with anyio.fail_after(20):
                    await proc.wait()


async def served(home: Home, tmp_path: Path, story: Any) -> Any:
    """Run `story(raw)` against a fresh server; its stderr goes to `serve.log`."""
    async with raw_server(home, tmp_path / "serve.log") as raw:
        return await story(raw)


# -- the same answers --------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["2025-06-18", "2025-03-26", "2025-11-25"])
async def test_an_allowed_call_is_answered_byte_for_byte_as_the_sdk_answers_it(
        home: Home, tmp_path: Path, version: str) -> None:
    async def story(raw: Raw) -> list[bytes]:
        init = await raw.initialize(version)
        return [init,
                await raw.call(1, "sql_query", {"query": "SELECT item, qty FROM orders ORDER BY id"}),
                await raw.call("two", "sql_query", {"query": "SELECT 'naïve ✓' AS word, 1.5 AS x"}, model="m-1"),
                await raw.call(-3, "sql_query", {"query": "SELECT 1 AS n"}, progressToken="tok")]

    on = await served(home, tmp_path, story)
    result = json.loads(on[1])["result"]
    assert "apple" in result["content"][0]["text"] and result["isError"] is False
    assert result["structuredContent"]["rows"] == [["apple", 3], ["pear", 5], ["plum", 7]]
    assert json.loads(on[2])["id"] == "two" and "naïve ✓".encode() in on[2]  # UTF-8 on the wire, as the SDK writes it


async def test_allowed_denied_and_invalid_calls_give_their_results(home: Home, tmp_path: Path) -> None:
    calls: list[tuple[str, dict[str, Any]]] = [
        ("sql_query", {"query": "SELECT count(*) AS n FROM orders"}),  # allowed
        ("sql_execute", {"statement": "DROP TABLE orders"}),  # denied by policy
        ("sql_query", {"query": 42}),  # invalid arguments
        ("sql_query", {"query": "SELECT * FROM no_such_table"})]  # allowed, and the tool fails
    async with sdk_client(home, tmp_path / "serve.log") as client:
        results = [await client.call_tool(tool, arguments) for tool, arguments in calls]
    allowed, denied, invalid, failed = results
    assert not allowed.is_error and "3" in text(allowed)
    assert denied.is_error and "dropping tables is never allowed" in text(denied)
    assert invalid.is_error and "invalid arguments" in text(invalid)
    assert failed.is_error and "no such table" in text(failed)
    assert home.rows("SELECT count(*) FROM orders") == [(3,)]


async def test_the_ledger_records_the_callers_identity(home: Home, tmp_path: Path) -> None:
    async with raw_server(home, tmp_path / "serve.log") as raw:
        await raw.initialize()
        await raw.call(5, "sql_query", {"query": "SELECT 1"}, model="claude-test")
    received = [e["payload"] for e in home.ledger_events() if e["kind"] == "call.received"]
    assert len(received) == 1
    who = [{k: p.get(k) for k in ("principal", "on_behalf_of", "model", "client", "session")} for p in received]
    assert who[0]["client"] == "raw-agent/7.1" and who[0]["model"] == "claude-test", who


# -- what stays with the SDK ----------------------------------------------------------------------------

ODD_LINES: list[tuple[int | None, bytes]] = [  # (the id the SDK answers, or None: it drops the line), the line
    (1, b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"no_such_tool","arguments":{}}}'),
    (2, b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"sql_query","arguments":["SELECT 1"]}}'),
    (3, b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"sql_query","arguments":null}}'),
    (4, b'{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"sql_query","arguments":{"query":"SELECT 1"},'
        b'"_meta":{"progressToken":null}}}'),
    (5, b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"sql_query","arguments":{"query":"SELECT 1"},'
        b'"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}'),
    (6, b'{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"sql_query","arguments":{"query":"SELECT 1"},'
        b'"extra":1}}'),
    (7, b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":7}}'),
    (None, b'{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"sql_query","arguments":{"q":"\\ud800"}}}'),
    (9, b'{"jsonrpc":"2.0","id":9,"method":"tools/call"}'),
    (10, b'{"jsonrpc":"2.0","id":10,"method":"tools/call","params":{"name":"keyturn_status","arguments":{"request_id":"x"}}}'),
    (11, b'{"jsonrpc":"2.0","id":11,"method":"tools/call","params":{"name":"sql_query","arguments":{"query":"SELECT 1"}},'
         b'"note":"extra"}'),
    (None, b'{"jsonrpc":"2.0","id":true,"method":"tools/call","params":{"name":"sql_query","arguments":{"query":"SELECT 1"}}}'),
    (13, b'{"jsonrpc":"2.0","id":13,"method":"tools/list"}'),
    (None, b'{"jsonrpc":"2.0","id":14.0,"method":"tools/call","params":{"name":"sql_query","arguments":{"query":"SELECT 1"}}}'),
]


UNUSUAL_CALLS: list[tuple[int | str, bytes]] = [  # well-formed calls, each answered
    (10**30, b'{"jsonrpc":"2.0","id":1000000000000000000000000000000,"method":"tools/call",'
             b'"params":{"name":"sql_query","arguments":{"query":"SELECT 1"}}}'),
    ("", b'{"jsonrpc":"2.0","id":"","method":"tools/call","params":{"name":"sql_query","arguments":{"query":"SELECT 2"},'
         b'"_meta":{}}}'),
    (21, b'{"method":"tools/call","params":{"arguments":{"query":"SELECT 3"},"name":"sql_query"},"id":21,"jsonrpc":"2.0"}'),
    (22, b'{"jsonrpc":"2.0","id":22,"method":"tools/call","params":{"name":"sql_query"}}'),  # no arguments: invalid
    (23, b'{"jsonrpc":"2.0","id":23,"method":"tools/call","params":{"name":"sql_query","arguments":{"query":"SELECT 4"},'
         b'"_meta":{"progressToken":true}}}'),  # a token the SDK accepts, but reports no progress for
    (24, b'{"jsonrpc":"2.0","id":24,"method":"tools/call","params":{"name":"sql_query","arguments":{"query":"SELECT 5"},'
         b'"_meta":{"progressToken":1.0,"model":7,"modelId":"m-2"}}}'),
    ("7", b'{"jsonrpc":"2.0","id":"7","method":"tools/call","params":{"name":"sql_query",'
          b'"arguments":{"query":"SELECT \'\\u00e9\\n\\\\\' AS e, 1e400 AS big"}}}'),
]


async def test_unusual_but_valid_calls_are_answered(
        home: Home, tmp_path: Path) -> None:
    async def story(raw: Raw) -> list[bytes]:
        await raw.initialize()
        out = []
        for rid, line in UNUSUAL_CALLS:
            await raw.send(line)
            answer, notes = await raw.response(rid)
            assert notes == []
            out.append(same_call_ids(answer))
        return out

    on = await served(home, tmp_path, story)
    assert json.loads(on[3])["result"]["isError"] is True  # sql_query without its query: the gate's refusal


async def test_odd_requests_go_to_the_sdk_and_get_its_own_answers(home: Home, tmp_path: Path) -> None:
    async def story(raw: Raw) -> list[bytes]:
        await raw.initialize()
        out = [await raw.call(100, "sql_query", {"query": "SELECT 1"})]
        for n, (expected, line) in enumerate(ODD_LINES):
            answer = await raw.answer_before(line, expected, {"jsonrpc": "2.0", "id": f"ping-{n}", "method": "ping"})
            if answer is not None:
                out.append(same_call_ids(answer))
        return out

    on = await served(home, tmp_path, story)
    unknown = json.loads(on[1])
    assert unknown["error"]["code"] == -32602 and "no_such_tool" in unknown["error"]["message"]


async def test_calls_before_the_handshake_go_to_the_sdk(home: Home, tmp_path: Path) -> None:
    async def story(raw: Raw) -> list[bytes]:
        early = await raw.call(1, "sql_query", {"query": "SELECT 1"})  # the opening request: the SDK's
        await raw.send({"jsonrpc": "2.0", "id": 2, "method": "initialize", "params": {  # a handshake under way
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw-agent", "version": "7.1"}}})
        init, _ = await raw.response(2)
        # The SDK serves a call once `initialize` is answered, before notifications/initialized.
        before = await raw.call(3, "sql_query", {"query": "SELECT 3"})
        await raw.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return [early, init, before, await raw.call(4, "sql_query", {"query": "SELECT 4"})]

    on = await served(home, tmp_path, story)
    assert "error" in json.loads(on[0])  # the SDK's: not initialized
    assert json.loads(on[2])["result"]["isError"] is False


async def test_keyturn_status_and_unknown_tools_stay_on_the_sdk_path(home: Home, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    async with sdk_client(home, log) as client:
        with pytest.raises(MCPError) as unknown:
            await client.call_tool("no_such_tool", {})
        assert "unknown tool 'no_such_tool'" in str(unknown.value)
        status = await client.call_tool("keyturn_status", {"request_id": "nope"})
        assert status.is_error and "no request nope of yours" in text(status)
        ok = await client.call_tool("sql_query", {"query": "SELECT 1"})
        assert not ok.is_error


# -- held calls, progress, cancellation, concurrency ------------------------------------------------------

@pytest.mark.parametrize("era", ERAS)
async def test_a_held_call_reports_progress_with_its_request_id_and_completes_once_approved(
        home: Home, tmp_path: Path, era: str) -> None:
    api = ReviewerAPI(home.serve_http())
    log = tmp_path / "serve.log"
    reports: list[tuple[float, str | None]] = []
    results = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append((progress, message))

    # (2026: the client discovers first; pinned to a version, its first call would open the session itself)
    async with sdk_client(home, log, mode="legacy" if era == HANDSHAKE else "auto") as client:
        if era == MODERN:
            assert client.protocol_version == MODERN

        async with client_call(client, "sql_execute", {"statement": "DELETE FROM orders WHERE id = 2"},
                               progress_callback=on_progress) as call:
            req = await api.wait_pending("sql_execute")
            await call.progressed()
            assert (await api.vote(req["id"], "approve", "alice", "fine")).status_code == 200
        results.append(await call.result())
        status = await client.call_tool("keyturn_status", {"request_id": req["id"]})
        assert status.structured_content["state"] == "executed"
    assert not results[0].is_error, text(results[0])
    assert home.rows("SELECT count(*) FROM orders") == [(2,)]
    assert any(req["id"] in (message or "") for _, message in reports)
    values = [value for value, _ in reports]
    assert values == sorted(values) and len(set(values)) == len(values)  # increasing, as MCP requires


@pytest.mark.parametrize("era", ERAS)
async def test_a_cancelled_held_call_is_never_answered_and_the_server_keeps_serving(
        home: Home, tmp_path: Path, era: str) -> None:
    log = tmp_path / "serve.log"
    async with raw_server(home, log) as raw:
        await raw.open(era)
        await raw.send(tool_call(7, "sql_execute", {"statement": "DELETE FROM orders"},
                                 **era_meta(era, progressToken="p7")))
        first = json.loads(await raw.line())  # the wait's first progress: the call is held
        assert first["method"] == "notifications/progress" and first["params"]["progressToken"] == "p7"
        await raw.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 7, "reason": "bored"}})
        assert json.loads(await raw.call(8, "sql_query", {"query": "SELECT 1"}, **era_meta(era)))["result"]["isError"] is False
        assert json.loads(await raw.call(9, "sql_query", {"query": "SELECT 2"}, **era_meta(era)))["result"]["isError"] is False
        rest = await raw.leave()  # until the server leaves: never an answer for id 7
        assert b'"id":7' not in rest, rest
    assert home.rows("SELECT count(*) FROM orders") == [(3,)]
    kinds = [e["kind"] for e in home.ledger_events()]
    assert "executed" in kinds and "approval.requested" in kinds


async def test_a_client_that_gives_up_on_a_held_call_leaves_a_working_server(home: Home, tmp_path: Path) -> None:
    api = ReviewerAPI(home.serve_http())
    log = tmp_path / "serve.log"
    statement = {"statement": "INSERT INTO orders(item, qty) VALUES ('fig', 1)"}
    async with sdk_client(home, log) as client:
        with anyio.move_on_after(1.5):  # the SDK's client sends notifications/cancelled as it gives up
            await client.call_tool("sql_execute", statement)
        req = await api.wait_pending("sql_execute")
        ok = await client.call_tool("sql_query", {"query": "SELECT count(*) AS n FROM orders"})
        assert not ok.is_error and "3" in text(ok)
        assert (await api.vote(req["id"], "approve", "alice", "ok")).status_code == 200
        again = await client.call_tool("sql_execute", statement)  # comes back: the approved request runs once
        assert not again.is_error, text(again)
    assert home.rows("SELECT count(*) FROM orders WHERE item = 'fig'") == [(1,)]


async def test_twenty_concurrent_calls_are_all_answered_with_their_own_ids(home: Home, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    async with raw_server(home, log) as raw:
        await raw.initialize()
        ids: list[int | str] = [*range(1, 11), *(f"s-{i}" for i in range(11, 21))]
        for i, rid in enumerate(ids):
            await raw.send({"jsonrpc": "2.0", "id": rid, "method": "tools/call",
                            "params": {"name": "sql_query", "arguments": {"query": f"SELECT {i} AS n"}}})
        answers: dict[Any, Any] = {}
        while len(answers) < len(ids):
            message = json.loads(await raw.line())
            answers[message["id"]] = message["result"]
    assert set(answers) == set(ids)
    for i, rid in enumerate(ids):
        assert answers[rid]["structuredContent"]["rows"] == [[i]]

    results = []
    async with sdk_client(home, log) as client:  # and through the SDK's own client
        async def one(i: int) -> None:
            results.append((i, await client.call_tool("sql_query", {"query": f"SELECT {i} * 1000 AS n"})))

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
    assert all(not r.is_error and str(i * 1000) in text(r) for i, r in results) and len(results) == 20


@pytest.mark.parametrize("era", ERAS)
async def test_a_call_in_flight_when_the_client_leaves_is_answered_connection_closed(
        home: Home, tmp_path: Path, era: str) -> None:
    async def story(raw: Raw) -> list[bytes]:
        await raw.open(era)
        await raw.send(tool_call(3, "sql_execute", {"statement": "DELETE FROM orders"}, **era_meta(era, progressToken=3)))
        held = await raw.line()  # the wait's first progress
        rest = await raw.leave()
        # (the request id is one per call; the progress, a clock's)
        return [re.sub(rb'request [0-9a-f]+|"progress":[0-9.e-]+', b"-", held), rest.splitlines()[-1]]

    on = await served(home, tmp_path, story)
    assert on[0].startswith(b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":3,-,')
    assert on[1] == b'{"jsonrpc":"2.0","id":3,"error":{"code":-32000,"message":"Connection closed"}}'
    assert home.rows("SELECT count(*) FROM orders") == [(3,)]


@pytest.mark.parametrize("era", ERAS)
async def test_a_result_the_protocol_does_not_allow_is_answered_as_the_sdk_answers_it_and_the_server_keeps_serving(
        home: Home, tmp_path: Path, era: str) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text((DATA / "spine-policy.yaml").read_text(encoding="utf-8")
                      + "  - {id: brittle, tool: brittle, outcome: allow, risk: low, reason: it reads}\n",
                      encoding="utf-8")
    home.write_config(policy=str(policy), tools=[{"module": "tests.e2e.brittle_pack"},
                                                 {"module": "tools.sql", "options": {"database": str(home.data_db)}}])

    async def story(raw: Raw) -> list[bytes]:
        await raw.open(era)
        return [await raw.call(1, "brittle", {"text": "explode"}, **era_meta(era)),
                await raw.call(2, "sql_query", {"query": "SELECT 1"}, **era_meta(era))]

    on = await served(home, tmp_path, story)
    if era != MODERN:  # (2026-07-28's serialiser drops the invalid block instead: checked equal above)
        assert on[0] == (b'{"jsonrpc":"2.0","id":1,"error":{"code":-32603,'
                         b'"message":"Handler returned an invalid result"}}')  # no internals on the wire
    assert json.loads(on[1])["result"]["isError"] is False
    kinds = [e["kind"] for e in home.ledger_events()]
    assert kinds.count("executed") == 2  # the tool ran: its result is what the protocol refused


# -- 2026-07-28 sessions: no handshake, the envelope on every request ------------------------------------

def enveloped(rid: Any, method: str, body: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
              without: str = "") -> dict[str, Any]:
    """A request on a 2026 session: its `_meta` is the envelope, `without` one key, with `meta` added (or replacing)."""
    full = {key: value for key, value in {**ENVELOPE, **(meta or {})}.items() if key != without}
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": {**(body or {}), "_meta": full}}


def call_2026(rid: Any, tool: str, arguments: dict[str, Any], meta: dict[str, Any] | None = None,
              without: str = "") -> dict[str, Any]:
    return enveloped(rid, "tools/call", {"name": tool, "arguments": arguments}, meta, without)


@pytest.mark.parametrize("opening", ["server/discover", "tools/call", "a refused call"])
async def test_an_allowed_call_on_a_2026_session_is_answered_byte_for_byte_as_the_sdk_answers_it(
        home: Home, tmp_path: Path, opening: str) -> None:
    async def story(raw: Raw) -> list[bytes]:
        if opening == "server/discover":
            first = await raw.discover()
        elif opening == "tools/call":  # the session's very first request is a call: the SDK's, as it settles the era
            first = await raw.call(0, "sql_query", {"query": "SELECT 0 AS n"}, **ENVELOPE)
        else:  # the envelope's version key settles the era even on a request the SDK refuses
            first = await raw.call(0, "sql_query", {"query": "SELECT 0 AS n"}, **{**ENVELOPE, VERSION_KEY: "2099-01-01"})
        return [first,
                await raw.call(1, "sql_query", {"query": "SELECT item, qty FROM orders ORDER BY id"}, **ENVELOPE),
                await raw.call("two", "sql_query", {"query": "SELECT 'naïve ✓' AS word, 1.5 AS x"}, **ENVELOPE,
                               model="m-1"),
                await raw.call(-3, "sql_query", {"query": "SELECT 1 AS n"}, **ENVELOPE, progressToken="tok"),
                await raw.call(10**20, "sql_query", {"query": "SELECT 2 AS n"}, **ENVELOPE, progressToken=4,
                               modelId="m-2"),
                await raw.call("", "sql_query", {"query": "SELECT 3 AS n"},
                               **{**ENVELOPE, INFO_KEY: {"name": "ünï", "version": "1", "title": "T"}})]

    on = await served(home, tmp_path, story)
    for line in on[1:]:
        result = json.loads(line)["result"]
        assert result["resultType"] == "complete" and result["isError"] is False, line
        assert result["_meta"][SERVER_INFO_KEY]["name"] == "keyturn", line
    assert json.loads(on[1])["result"]["structuredContent"]["rows"] == [["apple", 3], ["pear", 5], ["plum", 7]]
    assert json.loads(on[2])["id"] == "two" and "naïve ✓".encode() in on[2]  # UTF-8 on the wire, as the SDK writes it
    if opening == "tools/call":
        assert json.loads(on[0])["result"]["structuredContent"]["rows"] == [[0]]
    elif opening == "a refused call":
        assert json.loads(on[0])["error"]["code"] == -32022


async def test_allowed_denied_and_invalid_calls_on_a_2026_session_give_their_results(
        home: Home, tmp_path: Path) -> None:
    calls: list[tuple[str, dict[str, Any]]] = [
        ("sql_query", {"query": "SELECT count(*) AS n FROM orders"}),  # allowed
        ("sql_execute", {"statement": "DROP TABLE orders"}),  # denied by policy
        ("sql_query", {"query": 42}),  # invalid arguments
        ("sql_query", {"query": "SELECT * FROM no_such_table"}),  # allowed, and the tool fails
        ("sql_query", {})]  # its query missing

    async def story(raw: Raw) -> list[bytes]:
        await raw.discover()
        return [same_call_ids(await raw.call(rid, tool, arguments, **ENVELOPE))
                for rid, (tool, arguments) in enumerate(calls, 1)]

    on = await served(home, tmp_path, story)
    allowed, denied, invalid, failed, missing = (json.loads(line)["result"] for line in on)
    assert allowed["isError"] is False and allowed["structuredContent"]["rows"] == [[3]]
    assert denied["isError"] is True and "dropping tables is never allowed" in denied["content"][0]["text"]
    assert invalid["isError"] is True and "invalid arguments" in invalid["content"][0]["text"]
    assert failed["isError"] is True and "no such table" in failed["content"][0]["text"]
    assert missing["isError"] is True
    assert all(r["resultType"] == "complete" and SERVER_INFO_KEY in r["_meta"]
               for r in (allowed, denied, invalid, failed, missing))
    assert home.rows("SELECT count(*) FROM orders") == [(3,)]


async def test_the_ledger_records_the_callers_identity_on_2026_sessions(home: Home, tmp_path: Path) -> None:
    async def story(raw: Raw) -> list[bytes]:
        await raw.discover()
        return [await raw.call(5, "sql_query", {"query": "SELECT 1"}, **ENVELOPE, model="claude-test"),
                # Client info null, or left out (it is optional): no client is recorded.
                await raw.call(6, "sql_query", {"query": "SELECT 2"}, **{**ENVELOPE, INFO_KEY: None}),
                await raw.call(7, "sql_query", {"query": "SELECT 3"}, **{VERSION_KEY: MODERN, CAPABILITIES_KEY: {}}),
                # A client that names itself otherwise mid-session.
                await raw.call(8, "sql_query", {"query": "SELECT 4"},
                               **{**ENVELOPE, INFO_KEY: {"name": "other-agent", "version": "1.0"}}, modelId="m-8"),
                # Client info without its version: the SDK refuses the call (it types the envelope strictly).
                await raw.call(9, "sql_query", {"query": "SELECT 5"}, **{**ENVELOPE, INFO_KEY: {"name": "raw-agent"}}),
                await raw.call(10, "sql_query", {"query": "SELECT 6"}, **ENVELOPE)]

    on = await served(home, tmp_path, story)
    assert json.loads(on[4])["error"]["code"] == -32602
    received = [e["payload"] for e in home.ledger_events() if e["kind"] == "call.received"]
    assert len(received) == 5
    who = [{k: p.get(k) for k in ("principal", "on_behalf_of", "model", "client", "session")} for p in received]
    assert [(w["client"], w["model"]) for w in who] == [
        ("raw-agent/9.2", "claude-test"), (None, None), (None, None), ("other-agent/1.0", "m-8"),
        ("raw-agent/9.2", None)], who
    assert who[0]["principal"] and who[0]["session"] is None


UNUSUAL_2026_CALLS: list[dict[str, Any]] = [  # well-formed 2026 calls, each answered
    {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "sql_query", "_meta": ENVELOPE}},  # invalid
    call_2026(2, "sql_query", {"query": "SELECT 2"}, {CAPABILITIES_KEY: {"experimental": {}, "roots": {}, "x": 1}}),
    call_2026(3, "sql_query", {"query": "SELECT 3"}, {CAPABILITIES_KEY: {"roots": {"listChanged": 1}}}),
    call_2026(4, "sql_query", {"query": "SELECT 4"}, {INFO_KEY: {"name": "a", "version": "1", "x": 1, "title": None}}),
    call_2026(5, "sql_query", {"query": "SELECT 5"}, {INFO_KEY: {"name": "a", "version": "1", "icons": [{"src": "i"}]}}),
    call_2026(6, "sql_query", {"query": "SELECT 6"}, {"io.keyturn/model": "km", "model": "m", "progressToken": 6}),
    {"jsonrpc": "2.0", "method": "tools/call", "id": "7", "params": {  # keys in another order
        "_meta": {CAPABILITIES_KEY: {}, VERSION_KEY: MODERN}, "arguments": {"query": "SELECT 7"}, "name": "sql_query"}},
]


async def test_unusual_but_valid_calls_on_a_2026_session_are_answered(
        home: Home, tmp_path: Path) -> None:
    async def story(raw: Raw) -> list[bytes]:
        await raw.discover()
        out = []
        for request in UNUSUAL_2026_CALLS:
            await raw.send(request)
            answer, notes = await raw.response(request["id"])
            assert notes == []
            out.append(same_call_ids(answer))
        return out

    on = await served(home, tmp_path, story)
    assert json.loads(on[0])["result"]["isError"] is True  # sql_query without its arguments: the gate's refusal
    assert all(json.loads(line)["result"]["isError"] is False for line in on[1:])
    received = [e["payload"] for e in home.ledger_events() if e["kind"] == "call.received"]
    who = [(p.get("client"), p.get("model")) for p in received]
    assert len(who) == 7 and who[3:7] == [("a/1", None), ("a/1", None), ("raw-agent/9.2", "km"), (None, None)], who


ODD_2026_REQUESTS: list[tuple[int | None, dict[str, Any]]] = [  # (the id the SDK answers, or None), the request
    (1, call_2026(1, "sql_query", {"query": "SELECT 1"}, without=CAPABILITIES_KEY)),  # the envelope half-built
    (2, call_2026(2, "sql_query", {"query": "SELECT 1"}, {VERSION_KEY: "2025-06-18"})),  # a handshake-era version
    (3, call_2026(3, "sql_query", {"query": "SELECT 1"}, {VERSION_KEY: "2099-01-01"})),  # an unknown version
    (4, call_2026(4, "sql_query", {"query": "SELECT 1"}, {VERSION_KEY: 20260728})),  # not a string
    (5, call_2026(5, "sql_query", {"query": "SELECT 1"}, {"io.modelcontextprotocol/logLevel": "debug"})),
    (6, call_2026(6, "sql_query", {"query": "SELECT 1"}, {"io.modelcontextprotocol/other": 1})),  # (the SDK's too)
    (7, enveloped(7, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                    "clientInfo": {"name": "raw-agent", "version": "7.1"}})),
    (8, {"jsonrpc": "2.0", "id": 8, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw-agent", "version": "7.1"}}}),
    (9, {"jsonrpc": "2.0", "id": 9, "method": "tools/call",  # no envelope
         "params": {"name": "sql_query", "arguments": {"query": "SELECT 1"}}}),
    (10, {"jsonrpc": "2.0", "id": 10, "method": "tools/call",  # a handshake-era _meta
          "params": {"name": "sql_query", "arguments": {"query": "SELECT 1"}, "_meta": {"progressToken": "p"}}}),
    (11, call_2026(11, "sql_query", {"query": "SELECT 1"}, {CAPABILITIES_KEY: ["sampling"]})),  # mis-shaped
    (12, call_2026(12, "sql_query", {"query": "SELECT 1"}, {INFO_KEY: "raw-agent/9.2"})),  # mis-shaped
    (13, call_2026(13, "no_such_tool", {})),
    (14, call_2026(14, "keyturn_status", {"request_id": "nope"})),
    (15, enveloped(15, "tools/list")),
    (16, call_2026(16, "sql_query", {"query": "SELECT 1"}, {"progressToken": None})),  # (the 2026 schema's refusals)
    (17, call_2026(17, "sql_query", {"query": "SELECT 1"}, {"progressToken": 1.5})),
    (18, call_2026(18, "sql_query", {"query": "SELECT 1"}, {CAPABILITIES_KEY: None})),
    (None, call_2026(True, "sql_query", {"query": "SELECT 1"})),  # not a JSON-RPC id: dropped
    (None, call_2026(19.0, "sql_query", {"query": "SELECT 1"})),
]


async def test_odd_requests_on_a_2026_session_go_to_the_sdk_and_get_its_own_answers(
        home: Home, tmp_path: Path) -> None:
    async def story(raw: Raw) -> list[bytes]:
        await raw.discover()
        out = [await raw.call(100, "sql_query", {"query": "SELECT 1"}, **ENVELOPE)]
        for n, (expected, request) in enumerate(ODD_2026_REQUESTS):
            # (There is no ping in the 2026 era: a discover shows the server is past the request.)
            answer = await raw.answer_before(request, expected, enveloped(f"sync-{n}", "server/discover"))
            if answer is not None:
                out.append(same_call_ids(answer))
        return out

    on = await served(home, tmp_path, story)
    answers = {json.loads(line)["id"]: json.loads(line) for line in on}
    assert "envelope key" in answers[1]["error"]["message"]
    assert answers[2]["error"]["code"] == answers[3]["error"]["code"] == -32022  # unsupported protocol version
    assert answers[7]["error"]["code"] == answers[8]["error"]["code"] == -32022  # no handshake in the 2026 era
    assert answers[4]["error"]["code"] == answers[9]["error"]["code"] == answers[10]["error"]["code"] == -32602
    assert all(answers[rid]["error"]["code"] == -32602 for rid in (11, 12, 16, 17, 18))
    assert answers[5]["result"]["isError"] is answers[6]["result"]["isError"] is False  # served, by the SDK
    assert "no_such_tool" in answers[13]["error"]["message"] and answers[14]["result"]["isError"] is True
    assert {"sql_query", "keyturn_status"} <= {tool["name"] for tool in answers[15]["result"]["tools"]}


@pytest.mark.parametrize("stamped", [False, True])
async def test_an_enveloped_call_on_a_handshake_session_is_refused_by_the_sdk(
        home: Home, tmp_path: Path, stamped: bool) -> None:
    async def story(raw: Raw) -> list[bytes]:
        if stamped:  # `initialize` opens a handshake session even with the 2026 envelope stamped on it
            await raw.send(enveloped(0, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                                       "clientInfo": {"name": "raw-agent", "version": "7.1"}}))
            init, _ = await raw.response(0)
            await raw.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        else:
            init = await raw.initialize()
        return [init,
                await raw.call(1, "sql_query", {"query": "SELECT 1"}),
                await raw.call(2, "sql_query", {"query": "SELECT 2"}, **ENVELOPE),
                # Only the version key marks a request as the 2026 era's: without it the SDK serves the call.
                await raw.call(3, "sql_query", {"query": "SELECT 3"}, **{CAPABILITIES_KEY: {}, INFO_KEY: {}}),
                await raw.call(4, "sql_query", {"query": "SELECT 4"})]

    on = await served(home, tmp_path, story)
    assert json.loads(on[0])["result"]["protocolVersion"] == "2025-06-18"
    refused = json.loads(on[2])["error"]
    assert refused["code"] == -32600 and "handshake protocol era" in refused["message"]
    assert json.loads(on[3])["result"]["structuredContent"]["rows"] == [[3]]  # (the SDK's: reserved keys in _meta)
    assert "resultType" not in json.loads(on[4])["result"]  # a handshake-era result


async def test_the_sdk_client_in_its_default_mode_gets_its_results(home: Home, tmp_path: Path) -> None:
    calls = [("sql_query", {"query": "SELECT count(*) AS n FROM orders"}),
             ("sql_query", {"query": "SELECT 'naïve ✓' AS word"}),
             ("sql_execute", {"statement": "DROP TABLE orders"})]
    with appending(tmp_path / "serve.log") as errlog:
        async with Client(stdio_client(params(home), errlog=errlog)) as client:  # mode left to the SDK
            assert client.protocol_version == MODERN
            results = [await client.call_tool(tool, arguments) for tool, arguments in calls]
            listed = await client.list_tools()
    assert {"sql_query", "sql_execute", "keyturn_status"} <= {tool.name for tool in listed.tools}
    count, word, denied = results
    assert not count.is_error and count.structured_content["rows"] == [[3]]
    assert not word.is_error and "naïve ✓" in text(word)
    assert denied.is_error and "dropping tables is never allowed" in text(denied)
    assert home.rows("SELECT count(*) FROM orders") == [(3,)]
