"""Proxy mode: keyturn in front of existing MCP servers (stdio or streamable HTTP), each of whose tools
becomes a guarded tool with the same name, description, input schema and annotations.

    keyturn proxy -- mcp-server-git
    keyturn proxy --upstream-url https://mcp.example.com/mcp --header 'Authorization: Bearer ...'

config.py    the `proxy:` section: upstreams, prefixes, classifiers, timeouts
upstream.py  one upstream connection (the SDK's public client): supervised, restarted with backoff, calls with a
             timeout
transport.py a transport that reports the upstream going away
tools.py     an upstream tool as a gate `Runnable`: schema validation, classifiers, forwarding
source.py    all upstreams' tools under their exposed names; `running_proxy` attaches them to a Keyturn
resources.py a resource read as a gate `Runnable` (`resources/read`), template matching, listing, subscribing
prompts.py   the upstreams' prompts under their exposed names
relay.py     what an upstream asks of its client (sampling, elicitation, roots, log messages, changes), passed on to
             the agent's client of the request that caused it

The MCP side of resources, prompts, completion and logging is `server.serving.proxied`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from server.proxy.config import BUILTIN_CLASSIFIERS, ProxyConfig, UpstreamConfig, parse_header, parse_proxy_config

if TYPE_CHECKING:
    from server.proxy.source import Proxy, running_proxy
    from server.proxy.tools import UpstreamTool, classifiers_for
    from server.proxy.upstream import Upstream

# `server.config` reads the `proxy:` section (config.py) while it is being imported itself; the connections
# (source.py, upstream.py ...) import the configuration back, so they are loaded on first use, not here.
_ON_USE = {"Proxy": "source", "running_proxy": "source", "UpstreamTool": "tools", "classifiers_for": "tools",
           "Upstream": "upstream"}


def __getattr__(name: str) -> Any:
    if name in _ON_USE:
        return getattr(import_module(f"server.proxy.{_ON_USE[name]}"), name)
    raise AttributeError(f"module 'server.proxy' has no attribute {name!r}")

__all__ = [
    "BUILTIN_CLASSIFIERS",
    "Proxy",
    "ProxyConfig",
    "Upstream",
    "UpstreamConfig",
    "UpstreamTool",
    "classifiers_for",
    "parse_header",
    "parse_proxy_config",
    "running_proxy",
]
