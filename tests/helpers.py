"""The scaffold every held-call story shares: the agent's call runs in a task group while the test acts as the
reviewer, then reads what the agent got. Waits are on the ledger's feed or on events, bounded by `fail_after`.

    async with held_call(gate, tool, {"key": "k"}, AGENT) as call:
        request = await call.request()
        await gate.broker.decide(Verdict(request_id=request.id, reviewer="api:alice", verdict="approve"))
        result = await call.result()

Through a real transport, an MCP client's call runs the same way:

    async with client_call(client, "sql_execute", {"statement": "..."}) as call:
        request = await api.wait_pending("sql_execute")
        ...  # the reviewer acts
    result = await call.result()

Out-of-process stories, which can only look (over HTTP, in a file), wait with `eventually(check)`.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup
from mcp_types import CallToolResult

from server.canonical import args_hash
from server.gate import Gate, Identity
from server.ledger import Ledger
from server.models import Event, RequestView

T = TypeVar("T")

# A subscription is woken at once by this process's appends; another process's appends (a second `Ledger` on the
# same file) are read at the next look, this often.
OTHER_PROCESS_LOOK_S = 0.05


def outcome_of(result: CallToolResult) -> dict[str, Any]:
    """keyturn's details of one of its own error results (`outcome`, `request_id` or `call_id`, `reason` ...), as a
    program reads them: from the result's `_meta`, under `io.keyturn/outcome`; {} when it has none. Read through
    JSON, so they are what the wire carries."""
    details = json.loads(json.dumps((result.meta or {}).get("io.keyturn/outcome") or {}))
    assert isinstance(details, dict), details
    return details


async def ledger_until(ledger: Ledger, check: Callable[[], Awaitable[T | None]], timeout: float = 10,
                       kinds: set[str] | None = None) -> T:
    """`check()` until it returns something true, looking again whenever the ledger's feed says an event (of
    `kinds`) was appended; fails after `timeout` seconds."""
    subscription = ledger.follow(kinds)
    try:
        with anyio.fail_after(timeout):
            while not (value := await check()):
                await subscription.wait(OTHER_PROCESS_LOOK_S)
            return value
    finally:
        subscription.close()


async def until_event(ledger: Ledger, call_id: str, kind: str, timeout: float = 10) -> list[Event]:
    """The call's events once one of `kind` is among them."""
    async def seen() -> list[Event] | None:
        events = await ledger.events(call_id)
        return events if any(e.kind == kind for e in events) else None

    return await ledger_until(ledger, seen, timeout, kinds={kind})


async def eventually(check: Callable[[], Any], within: float = 20, every: float = 0.05) -> Any:
    """For what only polling can see (another process's database or HTTP API, a file, another thread's work):
    `check()` (sync or async) until it returns something true, every `every` seconds, failing after `within`.
    Returns that value."""
    with anyio.fail_after(within):
        while True:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await anyio.sleep(every)


class HeldCall:
    """One agent call running in a task group: `request()` is its pending request once recorded, `result()` what
    the agent gets back, `until(kind)` its events once one of that kind is recorded."""

    def __init__(self, gate: Gate, tool: Any, arguments: dict[str, Any], who: Identity) -> None:
        self.gate, self.tool, self.arguments, self.who = gate, tool, arguments, who
        self.ledger: Ledger = gate.ledger
        self._following = anyio.Event()
        self._returned = anyio.Event()
        self._result: CallToolResult | None = None
        self._request: RequestView | None = None
        # Followed from the head before the call starts, so its request cannot be missed.
        self._feed = self.ledger.follow(None)

    async def _run(self) -> None:
        await self._feed.start()
        self._following.set()
        try:
            self._result = await self.gate.call(self.tool, self.arguments, self.who)
        finally:
            self._returned.set()
            self._feed.wake()
            self._feed.close()  # what was appended can still be read; nothing more wakes it

    def start(self, tg: TaskGroup) -> None:
        tg.start_soon(self._run)

    @property
    def returned(self) -> bool:
        return self._returned.is_set()

    async def request(self, timeout: float = 10) -> RequestView:
        """The request this call is held on (fails if the call returns without one)."""
        if self._request is not None:
            return self._request
        digest = args_hash(self.arguments)
        with anyio.fail_after(timeout):
            await self._following.wait()
            while True:
                for event in await self._feed.read():
                    if event.kind == "approval.requested" and event.call_id:
                        view = await self.ledger.get_call(event.call_id)
                        if view is not None and view.tool == self.tool.name and view.args_hash == digest:
                            self._request = view
                            self._feed.close()
                            return view
                if self.returned:
                    raise AssertionError(f"the call returned without a request: {self._result}")
                await self._feed.wait(OTHER_PROCESS_LOOK_S)

    async def result(self, timeout: float = 10) -> CallToolResult:
        """What the agent got back."""
        with anyio.fail_after(timeout):
            await self._returned.wait()
        assert self._result is not None
        return self._result

    async def until(self, kind: str, timeout: float = 10) -> list[Event]:
        """This call's events, once one of `kind` is recorded."""
        return await until_event(self.ledger, (await self.request(timeout)).id, kind, timeout)


class Agent:
    """Agent calls running in one task group; `stop()` ends the ones still waiting."""

    def __init__(self, tg: TaskGroup) -> None:
        self.tg = tg

    def call(self, gate: Gate, tool: Any, arguments: dict[str, Any], who: Identity) -> HeldCall:
        held = HeldCall(gate, tool, arguments, who)
        held.start(self.tg)
        return held

    def stop(self) -> None:
        self.tg.cancel_scope.cancel()


@asynccontextmanager
async def agent() -> AsyncIterator[Agent]:
    """Calls started with `agent.call(...)` run until they return (or `stop()`)."""
    async with anyio.create_task_group() as tg:
        yield Agent(tg)


@asynccontextmanager
async def held_call(gate: Gate, tool: Any, arguments: dict[str, Any], who: Identity) -> AsyncIterator[HeldCall]:
    """One agent call in a task group, while the block acts as the reviewer; leaving the block waits for the call
    to return."""
    async with agent() as calls:
        yield calls.call(gate, tool, arguments, who)


async def left_pending(gate: Gate, tool: Any, arguments: dict[str, Any], who: Identity) -> RequestView:
    """A request left pending: the agent's call is held, then the agent stops waiting (the request stays)."""
    async with agent() as calls:
        request = await calls.call(gate, tool, arguments, who).request()
        calls.stop()
    return request


class ClientCall:
    """An MCP client's `tools/call` running in a task group: `progressed()` waits for its first progress
    notification (when a `progress_callback` was given), `result()` for what the agent got back."""

    def __init__(self, client: Any, tool: str, arguments: dict[str, Any], **kwargs: Any) -> None:
        self.client, self.tool, self.arguments = client, tool, arguments
        self._progress = kwargs.pop("progress_callback", None)
        self._kwargs = kwargs
        self._progressed = anyio.Event()
        self._returned = anyio.Event()
        self._result: Any = None

    async def _on_progress(self, progress: float, total: float | None, message: str | None) -> None:
        assert self._progress is not None
        await self._progress(progress, total, message)
        self._progressed.set()

    async def run(self) -> None:
        if self._progress is not None:
            self._kwargs["progress_callback"] = self._on_progress
        try:
            self._result = await self.client.call_tool(self.tool, self.arguments, **self._kwargs)
        finally:
            self._returned.set()

    @property
    def returned(self) -> bool:
        return self._returned.is_set()

    async def progressed(self, timeout: float = 10) -> None:
        assert self._progress is not None, "no progress_callback given"
        with anyio.fail_after(timeout):
            await self._progressed.wait()

    async def result(self, timeout: float = 60) -> Any:
        with anyio.fail_after(timeout):
            await self._returned.wait()
        return self._result


@asynccontextmanager
async def client_call(client: Any, tool: str, arguments: dict[str, Any], **kwargs: Any) -> AsyncIterator[ClientCall]:
    """The agent's call through an MCP client, in a task group, while the block acts as the reviewer; leaving the
    block waits for the call to return."""
    call = ClientCall(client, tool, arguments, **kwargs)
    async with anyio.create_task_group() as tg:
        tg.start_soon(call.run)
        yield call


@contextmanager
def witness_endpoint() -> Iterator[tuple[str, list[dict[str, Any]], list[int]]]:
    """A checkpoint witness over HTTP on 127.0.0.1: `(url, received, fail_first)`. Each POSTed checkpoint is
    appended to `received`; while `fail_first` has entries, a POST takes one and answers 503 instead."""
    received: list[dict[str, Any]] = []
    fail_first: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if fail_first:
                fail_first.pop()
                self.send_response(503)
            else:
                received.append(json.loads(body))
                self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    http = LocalHTTP(Handler)
    try:
        yield f"{http.url}/checkpoints", received, fail_first
    finally:
        http.close()


class LocalHTTP:
    """A real HTTP server on 127.0.0.1, in a thread, for a local fake of someone else's web endpoints (an identity
    provider, a SIEM's or a trace collector). `handler` is an `http.server` request handler class; `close()` stops it."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send_json(handler: BaseHTTPRequestHandler, body: Any, status: int = 200) -> None:
    """Answer an `http.server` request with `body` as JSON."""
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
