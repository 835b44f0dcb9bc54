"""What an upstream asks of its client, passed on to the agent's client: sampling, elicitation and roots requests,
log messages, and the resource and prompt changes it announces.

An upstream's request belongs to the agent request that caused it: while keyturn forwards an agent's request to
an upstream (a tool call, a resource read, a prompt), that request is the upstream's `serving` one, and what the
upstream asks in the meantime goes to that agent's client, on that request's stream. With several agent requests
in flight to one upstream, the newest is taken (stdio carries no link between a server's request and the client's
request that caused it). With none in flight, a request is refused with an error that says so.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import anyio
import mcp_types as types
from mcp import Client
from mcp.client import ClientRequestContext
from mcp.server.context import ServerRequestContext
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from mcp.shared.subscriptions import event_to_notification

log = logging.getLogger(__name__)

agent_request: ContextVar[ServerRequestContext[Any, Any] | None] = ContextVar("keyturn_agent_request", default=None)
"""The agent's request being served (set by the MCP server's handlers), so a forwarded call knows whom it serves."""

Notice = Callable[[types.ServerNotification], Awaitable[None]]
LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


def session_key(ctx: ServerRequestContext[Any, Any]) -> str:
    """One agent connection: its MCP session id over HTTP, `stdio` otherwise."""
    headers = getattr(ctx.request, "headers", None)
    key = headers.get("mcp-session-id") if headers is not None else None
    return str(key) if key else "stdio"


class Sessions:
    """Agent connections to tell something later (outside any request), by connection, the newest kept."""

    def __init__(self, limit: int = 1000) -> None:
        self._sessions: dict[str, ServerSession] = {}
        self._limit = limit

    def add(self, ctx: ServerRequestContext[Any, Any]) -> None:
        key = session_key(ctx)
        self._sessions.pop(key, None)
        self._sessions[key] = ctx.session
        while len(self._sessions) > self._limit:
            self._sessions.pop(next(iter(self._sessions)))

    def discard(self, ctx: ServerRequestContext[Any, Any]) -> None:
        self._sessions.pop(session_key(ctx), None)

    def __bool__(self) -> bool:
        return bool(self._sessions)

    async def send(self, notification: types.ServerNotification) -> None:
        for key, session in list(self._sessions.items()):
            try:
                await session.send_notification(notification)
            except Exception:  # that client is gone
                self._sessions.pop(key, None)


class ClientRelay:
    """One upstream's client side, as keyturn plays it: its callbacks answer the upstream with the agent's client."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self._serving: list[ServerRequestContext[Any, Any]] = []
        self.loggers = Sessions()  # agents that set a log level: they receive the upstream's log messages
        self.level: str | None = None  # the level agents set last (a 2026-era upstream sends every level: filtered here)
        self.on_notice: Notice | None = None  # resource and prompt changes, for the proxy to pass on
        self.watched: set[str] = set()  # URIs agents subscribed to, on a 2026-era upstream's listen stream
        self._watch_changed = anyio.Event()

    @contextmanager
    def serving(self) -> Iterator[None]:
        """While forwarding the current agent request (if any) to this upstream."""
        ctx = agent_request.get()
        if ctx is not None:
            self._serving.append(ctx)
        try:
            yield
        finally:
            if ctx is not None:
                self._serving.remove(ctx)

    def _target(self, what: str, capability: types.ClientCapabilities) -> ServerRequestContext[Any, Any]:
        if not self._serving:
            raise MCPError(types.INVALID_REQUEST, f"keyturn: upstream {self.upstream!r} asked for {what} outside "
                                                  "any request of the agent's; refused")
        ctx = self._serving[-1]
        if not ctx.session.can_send_request:
            raise MCPError(types.INVALID_REQUEST, f"keyturn: upstream {self.upstream!r} asked for {what}, and the "
                                                  "agent's session has no channel for it (a 2026-era session)")
        if not ctx.session.check_client_capability(capability):
            raise MCPError(types.INVALID_REQUEST, f"keyturn: upstream {self.upstream!r} asked for {what}, which the "
                                                  "agent's client did not declare")
        return ctx

    async def _ask(self, what: str, capability: types.ClientCapabilities, request: types.ServerRequest,
                   result_type: type[Any]) -> Any:
        try:
            ctx = self._target(what, capability)
            return await ctx.session.send_request(
                request, result_type, metadata=ServerMessageMetadata(related_request_id=ctx.request_id))
        except MCPError as e:
            log.info("upstream %s: %s not answered: %s", self.upstream, what, e.error.message)
            return e.error
        except Exception as e:
            log.info("upstream %s: %s not answered: %s", self.upstream, what, e)
            return types.ErrorData(code=types.INTERNAL_ERROR,
                                   message=f"keyturn could not pass {what} to the agent's client: {type(e).__name__}")

    async def sampling(self, context: ClientRequestContext, params: types.CreateMessageRequestParams) -> Any:
        result = types.CreateMessageResultWithTools if params.tools else types.CreateMessageResult
        return await self._ask("sampling", types.ClientCapabilities(sampling=types.SamplingCapability()),
                               types.CreateMessageRequest(params=params), result)

    async def elicitation(self, context: ClientRequestContext, params: types.ElicitRequestParams) -> Any:
        # The person answering sees keyturn as the server that asks: the message names who really asks, so an
        # upstream's question (or link) is never taken for keyturn's own.
        named = params.model_copy(update={"message": elicitation_message(self.upstream, params.message)})
        return await self._ask("elicitation", types.ClientCapabilities(elicitation=types.ElicitationCapability()),
                               types.ElicitRequest(params=named), types.ElicitResult)

    async def roots(self, context: ClientRequestContext) -> Any:
        return await self._ask("roots", types.ClientCapabilities(roots=types.RootsCapability()),
                               types.ListRootsRequest(), types.ListRootsResult)

    async def logging(self, params: types.LoggingMessageNotificationParams) -> None:
        """A log message goes with the request it was sent during, else to every agent that set a log level."""
        if self.level in LEVELS and params.level in LEVELS and LEVELS.index(params.level) < LEVELS.index(self.level):
            return
        notification = types.LoggingMessageNotification(params=params)
        if self._serving:
            ctx = self._serving[-1]
            try:
                await ctx.session.send_notification(notification, related_request_id=ctx.request_id)
                return
            except Exception as e:
                log.debug("upstream %s: log message not forwarded: %s", self.upstream, e)
        await self.loggers.send(notification)

    async def notice(self, message: Any) -> None:
        """The upstream's notifications keyturn passes on (everything else is the supervisor's)."""
        notices = (types.ResourceUpdatedNotification, types.ResourceListChangedNotification,
                   types.PromptListChangedNotification)
        if isinstance(message, notices) and self.on_notice is not None:
            await self.on_notice(message)

    def watch(self, uri: str, on: bool) -> None:
        """Follow (or stop following) `uri`'s updates on a 2026-era upstream: its listen stream is opened again."""
        if (uri in self.watched) != on:
            (self.watched.add if on else self.watched.discard)(uri)
            changed, self._watch_changed = self._watch_changed, anyio.Event()
            changed.set()

    async def follow(self, client: Client) -> None:
        """A 2026-era upstream announces resource and prompt changes only on a `subscriptions/listen` stream: one,
        opened again whenever the watched URIs change, for as long as the connection lasts."""
        while True:
            changed = self._watch_changed
            try:
                async with client.listen(resources_list_changed=True, prompts_list_changed=True,
                                         resource_subscriptions=sorted(self.watched)) as subscription:
                    async with anyio.create_task_group() as tg:
                        async def relay() -> None:
                            async for event in subscription:
                                await self.notice(event_to_notification(event, {}))

                        tg.start_soon(relay)
                        await changed.wait()
                        tg.cancel_scope.cancel()
            except Exception as e:
                log.info("upstream %s: not following resource changes: %s", self.upstream, e)
                await changed.wait()

    def callbacks(self) -> dict[str, Any]:
        """The `mcp.Client` callbacks that make this relay the upstream's client."""
        return {"sampling_callback": self.sampling, "elicitation_callback": self.elicitation,
                "list_roots_callback": self.roots, "logging_callback": self.logging,
                "log_level": "debug"}  # (2026-era upstreams log only for requests that opt in: all of them do)


def elicitation_message(upstream: str, message: str) -> str:
    """An upstream's elicitation message as the agent's client shows it: naming the upstream that asks."""
    return f"Asked by upstream server {upstream!r} (through keyturn): {message}"
