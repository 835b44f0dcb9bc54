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

from server.proxy.config import ProxyConfig
from server.proxy.tools import UpstreamTool, classifiers_for
from server.proxy.upstream import Upstream, supervised

if TYPE_CHECKING:
    from server.app import Keyturn

log = logging.getLogger(__name__)


class Proxy:
    """Upstream servers and their tools. `list()` and `get(name)` are what the MCP server serves."""

    def __init__(self, config: ProxyConfig, environ: Mapping[str, str], *,
                 reserved: Callable[[], set[str]] = set,
                 on_change: Callable[[], Awaitable[None]] | None = None) -> None:
        self.config = config
        self.upstreams = [Upstream(u, config, environ, self._upstream_changed) for u in config.upstreams]
        self._reserved = reserved
        self._on_change = on_change
        self._tools: dict[str, UpstreamTool] = {}

    def list(self) -> builtins.list[UpstreamTool]:
        return builtins.list(self._tools.values())

    def get(self, name: str) -> UpstreamTool | None:
        return self._tools.get(name)

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
    proxy = Proxy(config, environ, reserved=lambda: {t.name for t in kt.registry.list()},
                  on_change=kt.announce_tools_changed)
    kt.sources.append(proxy)
    try:
        async with proxy.running():
            yield proxy
    finally:
        kt.sources.remove(proxy)
