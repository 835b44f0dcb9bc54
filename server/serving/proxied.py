"""Proxy mode's other MCP features: the upstreams' resources (every read through the gate), resource templates and
subscriptions, prompts, completion and logging, served by keyturn's MCP server next to the guarded tools.

A feature is served (and so advertised) only when an upstream that is up when the server is built declares it.
What the upstreams announce (a resource updated, a list changed, a log message) reaches 2025-era clients as
notifications on their connection and 2026-era ones on their `subscriptions/listen` stream.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.server.subscriptions import PromptsListChanged, ResourcesListChanged, ResourceUpdated, ServerEvent
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from server.gate import Identity
from server.outcomes import OUTCOME_META_KEY
from server.proxy.prompts import ExposedPrompt, expose, list_prompts
from server.proxy.relay import Sessions, agent_request
from server.proxy.resources import ResourceRead, UpstreamResources, list_all, subscribe
from server.proxy.source import Proxy
from server.proxy.upstream import Upstream
from server.runtime import Keyturn

if TYPE_CHECKING:
    from server.serving.mcp import ToolListChanges

RESOURCE_NOT_FOUND = -32002  # the spec's code for a resource that is not there


class Proxied:
    """The upstreams' resources, prompts, completion and logging, for one MCP server."""

    def __init__(self, kt: Keyturn, proxy: Proxy, changes: ToolListChanges,
                 identity: Callable[[ServerRequestContext[Any, Any]], Identity],
                 gone: Callable[[ServerRequestContext[Any, Any]], anyio.Event | None]) -> None:
        self.kt, self.proxy, self.changes = kt, proxy, changes
        self.identity, self.gone = identity, gone
        self.resources: dict[str, UpstreamResources] = {u.name: UpstreamResources() for u in proxy.upstreams}
        self.prompts: dict[str, ExposedPrompt] = {}
        self.subscribers: dict[str, Sessions] = {}  # by URI: 2025-era clients that subscribed
        self.resource_listers, self.prompt_listers = Sessions(), Sessions()
        for upstream in proxy.upstreams:
            upstream.relay.on_notice = lambda message, u=upstream: self._notice(u, message)

    def up(self, feature: str) -> list[Upstream]:
        """The upstreams that are up and declare `feature` (a `ServerCapabilities` field)."""
        return [u for u in self.proxy.upstreams if (c := u.capabilities()) is not None and getattr(c, feature)]

    def register(self, server: Server[Any]) -> None:
        """Serve what the upstreams that are up declare."""
        add = server.add_request_handler
        if self.up("resources"):
            add("resources/list", types.PaginatedRequestParams, self.list_resources)
            add("resources/templates/list", types.PaginatedRequestParams, self.list_templates)
            add("resources/read", types.ReadResourceRequestParams, self.read_resource)
            if any(c.resources and c.resources.subscribe for u in self.up("resources") if (c := u.capabilities())):
                add("resources/subscribe", types.SubscribeRequestParams, self.subscribe)
                add("resources/unsubscribe", types.UnsubscribeRequestParams, self.unsubscribe)
                add("subscriptions/listen", types.SubscriptionsListenRequestParams, self.listen)
        if self.up("prompts"):
            add("prompts/list", types.PaginatedRequestParams, self.list_prompts)
            add("prompts/get", types.GetPromptRequestParams, self.get_prompt)
        if self.up("completions"):
            add("completion/complete", types.CompleteRequestParams, self.complete)
        if self.up("logging"):
            add("logging/setLevel", types.SetLevelRequestParams, self.set_level)

    # -- resources -------------------------------------------------------------------------------

    async def _page(self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None,
                    templates: bool) -> tuple[list[Any], str | None]:
        """One page: the upstreams' lists one after another; the cursor is `<upstream index>:<its cursor>`."""
        if ctx.session.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            self.resource_listers.add(ctx)
        upstreams = self.up("resources")
        index, cursor = 0, None
        if params is not None and params.cursor:
            head, _, rest = params.cursor.partition(":")
            if not head.isdigit() or int(head) >= len(upstreams):
                raise MCPError(types.INVALID_PARAMS, "invalid cursor")
            index, cursor = int(head), rest or None
        if not upstreams:
            return [], None
        upstream = upstreams[index]
        client = await upstream.connected("resources/list")
        catalog = self.resources[upstream.name]
        if templates:
            t = await client.list_resource_templates(cursor=cursor)
            items: list[Any] = list(t.resource_templates)
            catalog.remember_templates(t.resource_templates)
            following = t.next_cursor
        else:
            r = await client.list_resources(cursor=cursor)
            items = list(r.resources)
            catalog.remember(r.resources)
            following = r.next_cursor
        if following:
            return items, f"{index}:{following}"
        return items, f"{index + 1}:" if index + 1 < len(upstreams) else None

    async def list_resources(self, ctx: ServerRequestContext[Any, Any],
                             params: types.PaginatedRequestParams | None) -> types.ListResourcesResult:
        items, cursor = await self._page(ctx, params, templates=False)
        return types.ListResourcesResult(resources=items, next_cursor=cursor)

    async def list_templates(self, ctx: ServerRequestContext[Any, Any],
                             params: types.PaginatedRequestParams | None) -> types.ListResourceTemplatesResult:
        items, cursor = await self._page(ctx, params, templates=True)
        return types.ListResourceTemplatesResult(resource_templates=items, next_cursor=cursor)

    async def route(self, uri: str) -> Upstream:
        """The upstream that listed `uri` or whose template matches it (listing them again once if none does)."""
        for attempt in range(2):
            for upstream in self.up("resources"):
                if self.resources[upstream.name].serves(uri):
                    return upstream
            if attempt == 0:
                await self._relist()
        raise MCPError(RESOURCE_NOT_FOUND, f"unknown resource {uri!r}: no upstream lists it or has a template "
                                           "that matches it", {"uri": uri})

    async def _relist(self) -> None:
        for upstream in self.up("resources"):
            catalog = self.resources[upstream.name]
            try:
                catalog.remember(await list_all(upstream, templates=False))
                catalog.remember_templates(await list_all(upstream, templates=True))
            except Exception:  # an upstream that cannot list now serves nothing new
                continue

    async def read_resource(self, ctx: ServerRequestContext[Any, Any],
                            params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        """A read is a call of `resources/read`: classified, decided, held or refused, and recorded once."""
        uri = str(params.uri)
        upstream = await self.route(uri)
        agent_request.set(ctx)
        read = ResourceRead(upstream)
        progress = ctx.session.report_progress if progress_token_from_params(ctx.params) is not None else None
        result = await self.kt.gate.call(read, ResourceRead.arguments(upstream, uri), self.identity(ctx), progress,
                                         self.gone(ctx))
        if read.result is not None and not result.is_error:
            return read.result
        text = "\n".join(c.text for c in result.content if isinstance(c, types.TextContent)) or "not read"
        raise MCPError(types.INVALID_REQUEST, text, (result.meta or {}).get(OUTCOME_META_KEY))  # keyturn's details

    async def _subscription_route(self, uri: str) -> Upstream:
        """A subscription reads nothing (an update names the URI; reading it is a read like any other): a URI no
        upstream lists goes to the one upstream that takes subscriptions, if there is only one."""
        try:
            return await self.route(uri)
        except MCPError:
            takers = [u for u in self.up("resources") if (c := u.capabilities()) and c.resources and c.resources.subscribe]
            if len(takers) == 1:
                return takers[0]
            raise

    async def subscribe(self, ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams) -> Any:
        uri = str(params.uri)
        upstream = await self._subscription_route(uri)
        await subscribe(upstream, uri, on=True)
        self.subscribers.setdefault(uri, Sessions()).add(ctx)
        return types.EmptyResult()

    async def unsubscribe(self, ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams) -> Any:
        uri = str(params.uri)
        sessions = self.subscribers.get(uri)
        if sessions is not None:
            sessions.discard(ctx)
        if not sessions:
            self.subscribers.pop(uri, None)
            upstream = await self._subscription_route(uri)
            await subscribe(upstream, uri, on=False)
        return types.EmptyResult()

    async def listen(self, ctx: ServerRequestContext[Any, Any],
                     params: types.SubscriptionsListenRequestParams) -> types.SubscriptionsListenResult:
        """2026-era clients: the resources they listen to are subscribed at their upstreams, then the stream is
        the tools' one (`ToolListChanges.listen`), which carries every kind of event."""
        for uri in params.notifications.resource_subscriptions or ():
            await subscribe(await self._subscription_route(uri), uri, on=True)
        return await self.changes.listen(ctx, params)

    # -- prompts and completion ------------------------------------------------------------------

    async def _expose_prompts(self) -> dict[str, ExposedPrompt]:
        listed = [(u, await list_prompts(u)) for u in self.up("prompts")]
        self.prompts = expose(listed)
        return self.prompts

    async def list_prompts(self, ctx: ServerRequestContext[Any, Any],
                           params: types.PaginatedRequestParams | None) -> types.ListPromptsResult:
        if ctx.session.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            self.prompt_listers.add(ctx)
        return types.ListPromptsResult(prompts=[p.to_mcp() for p in (await self._expose_prompts()).values()])

    async def _prompt(self, name: str) -> ExposedPrompt:
        prompt = self.prompts.get(name) or (await self._expose_prompts()).get(name)
        if prompt is None:
            raise MCPError(types.INVALID_PARAMS, f"unknown prompt {name!r}")
        return prompt

    async def get_prompt(self, ctx: ServerRequestContext[Any, Any],
                         params: types.GetPromptRequestParams) -> types.GetPromptResult:
        prompt = await self._prompt(params.name)
        client = await prompt.upstream.connected(f"prompt {params.name}")
        agent_request.set(ctx)
        with prompt.upstream.relay.serving():
            return await client.get_prompt(prompt.prompt.name, params.arguments)

    async def complete(self, ctx: ServerRequestContext[Any, Any],
                       params: types.CompleteRequestParams) -> types.CompleteResult:
        """Routed by what is completed: a prompt by its exposed name, a template by the upstream that lists it."""
        ref = params.ref
        if isinstance(ref, types.PromptReference):
            prompt = await self._prompt(ref.name)
            upstream, ref = prompt.upstream, ref.model_copy(update={"name": prompt.prompt.name})
        else:
            upstream = await self._template_owner(ref.uri)
        client = await upstream.connected("completion/complete")
        context = params.context.arguments if params.context is not None else None
        return await client.complete(ref, {"name": params.argument.name, "value": params.argument.value}, context)

    async def _template_owner(self, template: str) -> Upstream:
        for attempt in range(2):
            for upstream in self.up("resources"):
                if template in self.resources[upstream.name].templates:
                    return upstream
            if attempt == 0:
                await self._relist()
        raise MCPError(types.INVALID_PARAMS, f"unknown resource template {template!r}")

    # -- logging and what the upstreams announce -------------------------------------------------

    async def set_level(self, ctx: ServerRequestContext[Any, Any], params: types.SetLevelRequestParams) -> Any:
        for upstream in self.up("logging"):
            upstream.relay.loggers.add(ctx)
            upstream.relay.level = params.level
            client = await upstream.connected("logging/setLevel")
            if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
                continue  # no such request there: its messages are filtered by the relay
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                await client.set_logging_level(params.level)
        return types.EmptyResult()

    async def _notice(self, upstream: Upstream, message: types.ServerNotification) -> None:
        event: ServerEvent
        if isinstance(message, types.ResourceUpdatedNotification):
            uri = str(message.params.uri)
            event = ResourceUpdated(uri=uri)
            if (sessions := self.subscribers.get(uri)) is not None:
                await sessions.send(message)
        elif isinstance(message, types.ResourceListChangedNotification):
            event = ResourcesListChanged()
            await self.resource_listers.send(message)
        elif isinstance(message, types.PromptListChangedNotification):
            event = PromptsListChanged()
            await self.prompt_listers.send(message)
        else:
            return
        await self.changes.bus.publish(event)


def serve_proxied(server: Server[Any], kt: Keyturn, changes: ToolListChanges,
                  identity: Callable[[ServerRequestContext[Any, Any]], Identity],
                  gone: Callable[[ServerRequestContext[Any, Any]], anyio.Event | None]) -> None:
    """In proxy mode: serve the upstreams' resources, prompts, completion and logging from `server`."""
    for source in kt.sources:
        if isinstance(source, Proxy):
            Proxied(kt, source, changes, identity, gone).register(server)
