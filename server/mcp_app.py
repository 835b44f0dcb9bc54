"""The MCP server agents connect to: lists the guarded tools and sends every call through the gate.

Besides the guarded tools it serves two agent-side tools that never need approval: `keyturn_status`
(read-only state of one of the caller's own requests) and `keyturn_cancel` (withdraw one).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import mcp_types as types
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ToolsListChanged
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from server.app import Keyturn
from server.gate import Identity, error_result

PRINCIPAL_SCOPE_KEY = "keyturn.principal"
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
        client = f"{params.client_info.name}/{params.client_info.version}"
    model = None
    raw_meta: Any = ctx.meta
    meta: dict[str, Any] = (dict(raw_meta) if isinstance(raw_meta, dict)
                            else raw_meta.model_dump(by_alias=True) if raw_meta is not None else {})
    for key in MODEL_META_KEYS:
        if isinstance(meta.get(key), str):
            model = meta[key][:200]
            break
    session = None
    if request is not None and hasattr(request, "headers"):
        session = request.headers.get("mcp-session-id")
    return Identity(principal=principal, on_behalf_of=on_behalf_of, model=model, client=client, session=session)


def build_mcp_server(kt: Keyturn, *, default_identity: Callable[[], Identity] | None = None) -> Server[Any]:
    stdio_identity = Identity(principal=kt.settings.stdio.principal, on_behalf_of=kt.settings.stdio.on_behalf_of)

    def default() -> Identity:
        return default_identity() if default_identity else stdio_identity

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
        sent = base = 0.0

        async def progress(value: float, total: float | None, message: str | None) -> None:
            # One increasing sequence: the tool's own progress (an upstream's) continues above the wait's.
            nonlocal sent, base
            if base + value <= sent:
                base = sent
            sent = base + value
            await ctx.session.report_progress(progress=sent, total=None if total is None else base + total,
                                              message=message)

        return await kt.gate.call(tool, arguments, who, progress)

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
        "expires": view.expires, "outcome_reason": view.outcome_reason,
    }
    return types.CallToolResult(content=[types.TextContent(type="text", text=json.dumps(status))],
                                structured_content=status)
