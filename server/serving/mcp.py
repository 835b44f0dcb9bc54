"""The MCP server agents connect to: lists the guarded tools and sends every call through the gate.

Besides the guarded tools it serves two agent-side tools that never need approval: `keyturn_status`
(read-only state of one of the caller's own requests) and `keyturn_cancel` (withdraw one).
`server.serving.stdio.stdio_transport` serves it over stdin/stdout.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.context import ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ToolsListChanged
from mcp.shared.exceptions import MCPError
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from server.gate import Identity, ProgressFn
from server.models import state_label
from server.outcomes import error_result
from server.proxy.relay import agent_request
from server.runtime import Keyturn
from server.serving.proxied import serve_proxied
from server.serving.tasks import HeldCallsAsTasks, install

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
    elif isinstance(scope, dict) and isinstance(scope.get("user"), AuthenticatedUser):  # OAuth (`serving.oauth`)
        token = scope["user"].access_token
        principal, on_behalf_of = token.client_id, (token.claims or {}).get("keyturn_on_behalf_of")
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


def build_mcp_server(kt: Keyturn, *, default_identity: Callable[[], Identity] | None = None,
                     traces: bool = True) -> Server[Any]:
    """keyturn's MCP server. `traces=False` drops the SDK's per-message OpenTelemetry span
    (`Telemetry.traces_exported` decides, at the edge)."""
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
        agent_request.set(ctx)  # (proxy mode: what an upstream asks during this call goes to this client)
        arguments = params.arguments or {}
        if params.name in BUILTIN:
            return await _builtin(kt, params.name, arguments, who)
        tool = kt.find_tool(params.name)
        if tool is None:
            raise MCPError(code=types.INVALID_PARAMS, message=f"unknown tool {params.name!r}")
        # No progress token, no progress: then an upstream (proxy mode) is not asked for any either.
        wants_progress = progress_token_from_params(ctx.params) is not None
        progress = monotonic_progress(ctx.session.report_progress) if wants_progress else None
        return await kt.gate.call(tool, arguments, who, progress, client_gone(ctx))

    server: Server[Any] = Server("keyturn", version="0.1.0", instructions=(
        "Tools served by keyturn are guarded: some run at once, some are denied by policy, and some are held "
        "until a human approves them. A held call reports progress with its request id while it waits; if you "
        "give up waiting, calling the same tool with the same arguments later resumes the same request. "
        "Use keyturn_status to check a request."), on_list_tools=list_tools, on_call_tool=call_tool,
        on_subscriptions_listen=changes.listen)
    serve_proxied(server, kt, changes, lambda ctx: identity_from_context(ctx, default()), client_gone)
    # Held calls answered with tasks, for the clients that declare the tasks extension (`server.serving.tasks`).
    install(server, HeldCallsAsTasks(kt, lambda ctx: identity_from_context(ctx, default()), frozenset(BUILTIN)),
            call_tool)
    if not traces:
        without_tracing(server)
    return server


def client_gone(ctx: ServerRequestContext[Any, Any]) -> anyio.Event | None:
    """Over HTTP: the event set once the client's connection for this request has closed."""
    scope = getattr(ctx.request, "scope", None)
    gone = scope.get(CLIENT_GONE_SCOPE_KEY) if isinstance(scope, dict) else None
    return gone if isinstance(gone, anyio.Event) else None


def without_tracing(server: Server[Any]) -> None:
    """Take the SDK's OpenTelemetry middleware out of `server.middleware`, its public list (the SDK documents
    dropping it from there to opt out); any other middleware stays."""
    server.middleware[:] = [m for m in server.middleware if type(m).__name__ != "OpenTelemetryMiddleware"]


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
