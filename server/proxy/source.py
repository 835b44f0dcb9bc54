"""The tools of every upstream, under the names agents and policies see: the tool source keyturn serves in
proxy mode.

Naming: an upstream with a configured `prefix` exposes `prefix + tool`. Otherwise a tool keeps its own name,
unless another upstream offers the same name, a native keyturn tool has it, or it starts with `keyturn`
(keyturn's own tools, which policies may allow wholesale): then it is `<upstream>__<tool>`.
"""

from __future__ import annotations

import builtins
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import mcp_types as types

from server.errors import ConfigError, InvalidArguments, ToolError
from server.execution import PackContext
from server.proxy.config import ProxyConfig
from server.proxy.tools import UpstreamTool, classifiers_for
from server.proxy.upstream import Upstream, supervised

if TYPE_CHECKING:
    from server.runtime import Keyturn

log = logging.getLogger(__name__)


class NotYetListed:
    """A name an upstream may serve once it is up: through the gate, every call is refused, naming the upstream and
    its state (as invalid arguments, so no policy rule and no human is asked about a tool nobody has seen)."""

    def __init__(self, upstream: Upstream, name: str) -> None:
        self.upstream, self.name = upstream, name
        self.annotations: dict[str, Any] = {}
        self.classifiers: Mapping[str, str] = {}

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        u = self.upstream
        state = "still starting" if u.state == "starting" else f"{u.state} ({u.last_error or 'no reason given'})"
        raise InvalidArguments(f"{self.name} is not served yet: upstream {u.name!r} is {state}; its tools are known "
                               "once it is up. Try again shortly.", tool=self.name)

    async def run(self, arguments: dict[str, Any]) -> types.CallToolResult:
        raise ToolError(f"upstream {self.upstream.name!r} is not up; {self.name} was not delivered")

    def to_mcp(self) -> types.Tool:
        return types.Tool(name=self.name, input_schema={"type": "object"})


class Proxy:
    """Upstream servers and their tools. `list()` and `get(name)` are what the MCP server serves."""

    def __init__(self, config: ProxyConfig, environ: Mapping[str, str], *,
                 reserved: Callable[[], set[str]] = set,
                 on_change: Callable[[], Awaitable[None]] | None = None, context: PackContext | None = None) -> None:
        self.config = config
        self.upstreams = [Upstream(u, config, environ, self._upstream_changed, context) for u in config.upstreams]
        self._reserved = reserved
        self._on_change = on_change
        self._tools: dict[str, UpstreamTool] = {}

    def list(self) -> builtins.list[UpstreamTool]:
        return builtins.list(self._tools.values())

    def get(self, name: str) -> UpstreamTool | NotYetListed | None:
        """The tool served as `name`; for a name an upstream that has never been up may serve, a stand-in whose
        every call fails saying that upstream is starting or down (not "unknown tool")."""
        tool = self._tools.get(name)
        if tool is not None or name.lower().startswith("keyturn") or name in self._reserved():
            return tool
        for upstream in self.upstreams:
            if upstream.tools or upstream.state == "up":
                continue  # listed: it does not serve that name
            prefix = upstream.config.prefix
            if name.startswith(f"{upstream.name}__") or (name.startswith(prefix) if prefix is not None else True):
                return NotYetListed(upstream, name)
        return None

    def prepare(self) -> builtins.list[tuple[str, dict[str, Any]]]:
        """Work out every command upstream's sandbox and check that it can be made; the ledger events to record.
        `ConfigError` (`SandboxUnavailable` naming the fix) for an upstream that cannot start."""
        events: builtins.list[tuple[str, dict[str, Any]]] = []
        for upstream in self.upstreams:
            config = upstream.config
            if config.command is None:
                continue  # a url: not a process keyturn starts
            try:
                sandbox = upstream.prepare()
            except FileNotFoundError as e:
                raise ConfigError(f"upstream {config.name!r} cannot start: {e}") from None
            if sandbox is None:
                log.warning("upstream %s: the sandbox is off (sandbox: off): it runs with keyturn's own reach "
                            "(its files, processes and network)", config.name)
                events.append(("sandbox.disabled", {"upstream": config.name, "reason": "option sandbox: off",
                                                    "command": config.command}))
                continue
            sandbox.check_available()
            events.append(("upstream.sandboxed", sandbox.describe()))
        return events

    async def wait_stopped(self) -> None:
        """Until every upstream connection has been shut down (after `running()` was cancelled)."""
        for upstream in self.upstreams:
            await upstream.stopped.wait()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Proxy]:
        """Connect to every upstream (waiting, bounded, for the first attempts) and keep them connected."""
        async with supervised(self.upstreams, self.config.startup_wait):
            yield self

    async def _upstream_changed(self) -> None:
        before = _shape(self._tools)
        self._tools = self._expose()
        if _shape(self._tools) != before and self._on_change is not None:
            await self._on_change()

    def _expose(self) -> dict[str, UpstreamTool]:
        reserved = self._reserved()
        shared = Counter(name for u in self.upstreams if u.config.prefix is None for name in u.tools)
        exposed: dict[str, UpstreamTool] = {}
        for upstream in self.upstreams:
            for name, tool in upstream.tools.items():
                if upstream.config.prefix is not None:
                    public = upstream.config.prefix + name
                elif shared[name] > 1 or name in reserved or name.lower().startswith("keyturn"):
                    public = f"{upstream.name}__{name}"
                else:
                    public = name
                if public in exposed or public in reserved or public.lower().startswith("keyturn"):
                    log.warning("upstream %s: tool %r would be exposed as %r, which is taken; not served "
                                "(configure a prefix)", upstream.name, name, public)
                    continue
                exposed[public] = UpstreamTool(
                    upstream, tool, public, classifiers_for(upstream.config, upstream.server_name, tool))
        return exposed


def _shape(tools: dict[str, UpstreamTool]) -> list[Any]:
    return [(name, t.to_mcp().model_dump(mode="json", by_alias=True, exclude_none=True)) for name, t in tools.items()]


@asynccontextmanager
async def running_proxy(kt: Keyturn, config: ProxyConfig, environ: Mapping[str, str]) -> AsyncIterator[Proxy]:
    """Serve `config`'s upstreams' tools from `kt` (as a tool source) for as long as the context is open."""
    from server.runtime import pack_context

    context = pack_context(kt.settings, environ)
    proxy = Proxy(config, environ, reserved=lambda: {t.name for t in kt.registry.list()},
                  on_change=kt.announce_tools_changed, context=context)
    # Each command upstream's sandbox is checked (a real bwrap run) before anything starts: fail closed.
    events = await anyio.to_thread.run_sync(proxy.prepare)
    for kind, payload in events:
        await kt.ledger.append(kind, None, {**payload, "instance": kt.broker.instance_id})
    kt.sources.append(proxy)
    try:
        async with proxy.running():
            yield proxy
    finally:
        kt.sources.remove(proxy)
