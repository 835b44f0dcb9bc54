"""The MCP server agents connect to: lists the guarded tools and sends every call through the gate.

Besides the guarded tools it serves two agent-side tools that never need approval: `keyturn_status`
(read-only state of one of the caller's own requests) and `keyturn_cancel` (withdraw one).
`stdio_transport` serves it over stdin/stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.stdio import stdio_server
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ToolsListChanged
from mcp.shared.exceptions import MCPError
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from server.app import Keyturn
from server.gate import Identity, ProgressFn, error_result
from server.models import state_label

if TYPE_CHECKING:
    from server.fastlane import FastLane

PRINCIPAL_SCOPE_KEY = "keyturn.principal"
CLIENT_GONE_SCOPE_KEY = "keyturn.client_gone"
"""In an HTTP request's ASGI scope: an `anyio.Event` set when the client's connection for that request closes."""
MODEL_META_KEYS = ("io.keyturn/model", "model", "modelId")

STATUS_TOOL = types.Tool(
    name="keyturn_status",
    description="Report the state of one of your keyturn requests (pending, approved, denied, expired, executed ...).",
    input_schema={"type": "object", "properties": {"request_id": {"type": "string"}}, "required": ["request_id"]},
    annotations=types.ToolAnnotations(read_only_hint=True, destructive_hint=False),
)
CANCEL_TOOL = types.Tool(
    name="keyturn_cancel",
    description="Withdraw one of your own pending keyturn requests.",
    input_schema={
        "type": "object",
        "properties": {"request_id": {"type": "string"}, "reason": {"type": "string"}},
        "required": ["request_id"],
    },
    annotations=types.ToolAnnotations(read_only_hint=False, destructive_hint=False),
)
BUILTIN = {STATUS_TOOL.name, CANCEL_TOOL.name}


def identity_from_context(ctx: ServerRequestContext[Any, Any], default: Identity) -> Identity:
    """The caller: the HTTP layer's verified principal, or the configured stdio principal; plus client and model."""
    principal, on_behalf_of = default.principal, default.on_behalf_of
    request = ctx.request
    scope = getattr(request, "scope", None)
    if isinstance(scope, dict) and PRINCIPAL_SCOPE_KEY in scope:
        principal, on_behalf_of = scope[PRINCIPAL_SCOPE_KEY]
    client = None
    params = ctx.session.client_params
    if params is not None and params.client_info is not None:
        client = client_label(params.client_info.name, params.client_info.version)
    raw_meta: Any = ctx.meta
    meta: dict[str, Any] = (dict(raw_meta) if isinstance(raw_meta, dict)
                            else raw_meta.model_dump(by_alias=True) if raw_meta is not None else {})
    session = None
    if request is not None and hasattr(request, "headers"):
        session = request.headers.get("mcp-session-id")
    return Identity(principal=principal, on_behalf_of=on_behalf_of, model=model_from_meta(meta), client=client,
                    session=session)


def stdio_identity(kt: Keyturn) -> Identity:
    """The configured stdio principal (and whom it acts for), before client and model are known."""
    return Identity(principal=kt.settings.stdio.principal, on_behalf_of=kt.settings.stdio.on_behalf_of)


def client_label(name: str, version: str) -> str:
    """How a client's `clientInfo` is recorded: `name/version`."""
    return f"{name}/{version}"


def model_from_meta(meta: Mapping[str, Any]) -> str | None:
    """The model the client names in a request's `_meta`, if any (first of `MODEL_META_KEYS`)."""
    for key in MODEL_META_KEYS:
        value = meta.get(key)
        if isinstance(value, str):
            return value[:200]
    return None


def monotonic_progress(report: ProgressFn) -> ProgressFn:
    """The gate's progress callback over `report` (the caller's MCP progress channel), as one increasing sequence:
    the tool's own progress (an upstream's) continues above the wait's, since MCP progress must only increase."""
    sent = base = 0.0

    async def progress(value: float, total: float | None, message: str | None) -> None:
        nonlocal sent, base
        if base + value <= sent:
            base = sent
        sent = base + value
        await report(sent, None if total is None else base + total, message)

    return progress


def build_mcp_server(kt: Keyturn, *, default_identity: Callable[[], Identity] | None = None) -> Server[Any]:
    stdio = stdio_identity(kt)

    def default() -> Identity:
        return default_identity() if default_identity else stdio

    changes = ToolListChanges()
    kt.tool_listeners.append(changes.notify)

    async def list_tools(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        changes.remember(ctx)
        return types.ListToolsResult(tools=[t.to_mcp() for t in kt.tools()] + [STATUS_TOOL, CANCEL_TOOL])

    async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        who = identity_from_context(ctx, default())
        arguments = params.arguments or {}
        if params.name in BUILTIN:
            return await _builtin(kt, params.name, arguments, who)
        tool = kt.find_tool(params.name)
        if tool is None:
            raise MCPError(code=types.INVALID_PARAMS, message=f"unknown tool {params.name!r}")
        # No progress token, no progress: then an upstream (proxy mode) is not asked for any either.
        wants_progress = progress_token_from_params(ctx.params) is not None
        progress = monotonic_progress(ctx.session.report_progress) if wants_progress else None
        scope = getattr(ctx.request, "scope", None)
        gone = scope.get(CLIENT_GONE_SCOPE_KEY) if isinstance(scope, dict) else None
        return await kt.gate.call(tool, arguments, who, progress, gone if isinstance(gone, anyio.Event) else None)

    return Server("keyturn", version="0.1.0", instructions=(
        "Tools served by keyturn are guarded: some run at once, some are denied by policy, and some are held "
        "until a human approves them. A held call reports progress with its request id while it waits; if you "
        "give up waiting, calling the same tool with the same arguments later resumes the same request. "
        "Use keyturn_status to check a request."), on_list_tools=list_tools, on_call_tool=call_tool,
        on_subscriptions_listen=changes.listen)


class ToolListChanges:
    """Tells clients that the tool list changed (proxy mode: an upstream's did): 2026-era clients on their
    `subscriptions/listen` stream, older ones with `notifications/tools/list_changed` on their connection."""

    def __init__(self) -> None:
        self.bus = InMemorySubscriptionBus()
        self.listen = ListenHandler(self.bus)
        self._sessions: dict[str, ServerSession] = {}  # older clients that listed tools, by MCP session id

    def remember(self, ctx: ServerRequestContext[Any, Any]) -> None:
        if ctx.session.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return
        headers = getattr(ctx.request, "headers", None)
        key = headers.get("mcp-session-id") if headers is not None else "stdio"
        if key:
            self._sessions.pop(key, None)
            self._sessions[key] = ctx.session
            while len(self._sessions) > 1000:
                self._sessions.pop(next(iter(self._sessions)))

    async def notify(self) -> None:
        await self.bus.publish(ToolsListChanged())
        for key, session in list(self._sessions.items()):
            try:
                await session.send_tool_list_changed()
            except Exception:  # that client is gone
                self._sessions.pop(key, None)


async def _builtin(kt: Keyturn, name: str, arguments: dict[str, Any], who: Identity) -> types.CallToolResult:
    request_id = arguments.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        return error_result("request_id (a string) is required")
    view = await kt.ledger.get_call(request_id)
    # A principal sees only its own requests; anything else looks like an unknown id.
    if view is None or view.principal != who.principal:
        return error_result(f"no request {request_id} of yours")
    if name == CANCEL_TOOL.name:
        reason = str(arguments.get("reason") or "withdrawn by the agent")[:500]
        if not await kt.broker.cancel(request_id, who.principal, reason):
            return error_result(f"request {request_id} is {view.state}; only an open request can be withdrawn")
        view = await kt.ledger.get_call(request_id)
        assert view is not None
    status = {
        "request_id": view.id, "tool": view.tool, "state": view.state, "risk": view.risk, "reason": view.reason,
        "approvals": [v["person"] for v in view.votes if v["verdict"] == "approve"],
        "expires": view.expires, "outcome_reason": view.outcome_reason, "status": state_label(view.state),
    }
    if view.state == "approved":
        status["note"] = ("approved and not run: call the same tool with the same arguments again before it expires "
                          "to run it, once")
    elif view.state in ("executed", "failed"):
        status["note"] = ("it ran once; calling it again with the same arguments before it expires returns that "
                          "outcome instead of running it again")
    return types.CallToolResult(content=[types.TextContent(type="text", text=json.dumps(status))],
                                structured_content=status)


# -- stdio ---------------------------------------------------------------------------------------

STDIO_MAX_LINE = 2**28
"""The longest JSON-RPC message read from stdin (256 MiB)."""


@asynccontextmanager
async def stdio_transport(lane: FastLane | None = None) -> AsyncIterator[tuple[Any, Any]]:
    """MCP over this process's stdin and stdout: `(read_stream, write_stream)` for `Server.run`.

    The SDK's `stdio_server` hands every line read, every write and every flush to a worker thread: three
    thread hand-offs per call, which cost more than the gate itself on a small machine. When stdin and stdout
    are pipes or sockets (how MCP clients start servers) and the loop is asyncio, the same SDK transport is fed
    by the loop's own pipe transports instead; otherwise it is the SDK's as it is. While serving, fd 0 reads
    /dev/null and fd 1 writes to stderr, as with the SDK, so a tool's stray output cannot corrupt the protocol.

    With a `lane` (`server.fastlane`), on the loop's pipes only, each line read is offered to it first: it
    answers the well-formed `tools/call` requests it takes, through the same writer; the SDK gets the rest.
    """
    if not _loop_pipes_usable():
        async with stdio_server() as streams:
            yield streams
        return
    loop = asyncio.get_running_loop()
    sys.stdout.flush()
    wire_in, wire_out = os.dup(0), os.dup(1)  # the wire, for the loop's transports (which close them)
    saved_in, saved_out = os.dup(0), os.dup(1)  # to restore fd 0 and fd 1 afterwards
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
        os.dup2(2, 1)
        reader = asyncio.StreamReader(limit=STDIO_MAX_LINE)
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(wire_in, "rb", buffering=0))
        write_transport, write_protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(wire_out, "wb", buffering=0))
        writer = asyncio.StreamWriter(write_transport, write_protocol, None, loop)
        sink = _Sink(writer, lane)
        try:
            async with lane.serving(sink) if lane is not None else nullcontext():
                async with stdio_server(_Lines(reader, lane), sink) as streams:  # type: ignore[arg-type]
                    yield streams
        finally:
            read_transport.close()
            write_transport.close()
    finally:
        try:
            sys.stdout.flush()  # what tools printed goes where fd 1 pointed while they ran
        except (OSError, ValueError):
            pass
        os.dup2(saved_in, 0)
        os.dup2(saved_out, 1)
        for fd in (null, saved_in, saved_out):
            os.close(fd)


def _loop_pipes_usable() -> bool:
    try:
        asyncio.get_running_loop()  # (not under trio)
        if sys.platform == "win32":
            return False
        if sys.stdin is None or sys.stdout is None or sys.stdin.fileno() != 0 or sys.stdout.fileno() != 1:
            return False
        return all(stat.S_ISFIFO(m) or stat.S_ISSOCK(m) or stat.S_ISCHR(m) for m in (os.fstat(0).st_mode, os.fstat(1).st_mode))
    except (OSError, ValueError, AttributeError, RuntimeError):
        return False


class _Lines:
    """stdin's lines as the SDK's `stdio_server` iterates them (text, newline included), less those the lane takes."""

    def __init__(self, reader: asyncio.StreamReader, lane: FastLane | None = None) -> None:
        self._reader = reader
        self._lane = lane

    def __aiter__(self) -> _Lines:
        return self

    async def __anext__(self) -> str:
        while True:
            line = await self._reader.readline()
            if not line:
                raise StopAsyncIteration
            if self._lane is None or not self._lane.take(line):
                return line.decode("utf-8", errors="replace")


class _Sink:
    """stdout as the SDK's `stdio_server` writes to it, and as the fast lane does: one whole line per write."""

    def __init__(self, writer: asyncio.StreamWriter, lane: FastLane | None = None) -> None:
        self._writer = writer
        self._lane = lane

    async def write(self, text: str) -> None:
        if self._lane is not None:
            self._lane.sent(text)
        self._writer.write(text.encode("utf-8"))

    def send(self, line: bytes) -> None:
        self._writer.write(line)

    async def flush(self) -> None:
        await self._writer.drain()
