"""The upstreams' resources as keyturn serves them: listed together, each URI routed to the upstream that listed it
(or whose template matches it), and every read decided by the policy like a call.

A read reaches the gate as the tool `resources/read` with the arguments `{"uri": ..., "upstream": ...}` (plus
`path`, the local path of a `file://` URI), annotated read-only, idempotent and not destructive. An `http(s)` URI
is classified as a URL and a `file://` one as a path, so the policy's URL and path rules and keyturn's built-in
guards (a read of keyturn's own state is denied) apply to reads as to calls. Only URIs an upstream listed, or that
one of its templates matches, are read at all: any other URI is refused before the gate.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import mcp_types as types
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from server.canonical import canonical_json, sha256_hex
from server.errors import InvalidArguments
from server.proxy.upstream import Upstream, all_pages

READ_TOOL = "resources/read"
"""The tool name policies see for a resource read."""
READ_ANNOTATIONS = {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True}


class ResourceRead:
    """One read of one resource, as a gate `Runnable`; `result` holds what the upstream returned once it ran."""

    name = READ_TOOL

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.annotations: dict[str, Any] = dict(READ_ANNOTATIONS)
        self.classifiers: Mapping[str, str] = {}
        self.result: types.ReadResourceResult | None = None

    @staticmethod
    def arguments(upstream: Upstream, uri: str) -> dict[str, Any]:
        return {"uri": uri, "upstream": upstream.name}

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        uri = arguments.get("uri")
        if not isinstance(uri, str) or not uri:
            raise InvalidArguments(f"{READ_TOOL}: uri (a string) is required", tool=READ_TOOL, field="uri")
        out: dict[str, Any] = {"uri": uri, "upstream": self.upstream.name}
        scheme = urlsplit(uri).scheme.lower()
        if scheme == "file":
            out["path"] = unquote(urlsplit(uri).path)
            self.classifiers = {"path": "path"}
        elif scheme in ("http", "https"):
            self.classifiers = {"uri": "url"}
        return out

    async def run(self, arguments: dict[str, Any]) -> types.CallToolResult:
        uri = arguments["uri"]
        client = await self.upstream.connected(f"the read of {uri}")
        with self.upstream.relay.serving():
            try:
                result = await client.read_resource(uri)
            except MCPError as e:
                text = f"{e.error.message} (upstream {self.upstream.name!r}, error {e.error.code})"
                return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)
        self.result = result
        digest = sha256_hex(canonical_json(result.model_dump(mode="json", by_alias=True, exclude_none=True)))
        summary = f"read {uri} from upstream {self.upstream.name!r}: {len(result.contents)} content(s), sha256 {digest}"
        return types.CallToolResult(content=[types.TextContent(type="text", text=summary)])


def template_pattern(template: str) -> re.Pattern[str]:
    """An RFC 6570 URI template as a regular expression over URIs: `{x}` is one segment, `{+x}`, `{#x}` and the
    other operators anything."""
    parts: list[str] = []
    for literal, expression in re.findall(r"([^{]*)(\{[^}]*\}|$)", template):
        parts.append(re.escape(literal))
        if expression:
            parts.append("[^/?#]*" if expression[1:2].isalnum() or expression[1:2] == "_" else ".*")
    return re.compile("".join(parts) + r"\Z")


class UpstreamResources:
    """What one upstream lists: the URIs of its resources and its templates (kept from every listing)."""

    def __init__(self) -> None:
        self.uris: set[str] = set()
        self.templates: dict[str, re.Pattern[str]] = {}

    def remember(self, resources: Sequence[types.Resource]) -> None:
        self.uris.update(str(r.uri) for r in resources)

    def remember_templates(self, templates: Sequence[types.ResourceTemplate]) -> None:
        for t in templates:
            if t.uri_template not in self.templates:
                self.templates[t.uri_template] = template_pattern(t.uri_template)

    def serves(self, uri: str) -> bool:
        return uri in self.uris or any(p.match(uri) for p in self.templates.values())


async def list_all(upstream: Upstream, templates: bool) -> list[Any]:
    """Every page of an upstream's resources (or templates), up to a bound."""
    client = await upstream.connected("resources/list")

    async def page(cursor: str | None) -> tuple[list[Any], str | None]:
        if templates:
            t = await client.list_resource_templates(cursor=cursor)
            return list(t.resource_templates), t.next_cursor
        r = await client.list_resources(cursor=cursor)
        return list(r.resources), r.next_cursor

    return await all_pages(page)


async def subscribe(upstream: Upstream, uri: str, on: bool) -> None:
    """`resources/subscribe` (or unsubscribe) at a 2025-era upstream (the SDK marks it deprecated); a 2026-era one
    is followed on its listen stream instead."""
    client = await upstream.connected(f"the subscription to {uri}")
    if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
        upstream.relay.watch(uri, on)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        if on:
            await client.subscribe_resource(uri)
        else:
            await client.unsubscribe_resource(uri)
