"""The HTTP pack: one HTTP request to an allowed host, with a capped response.

Options (`tools: [{module: tools.http, options: {...}}]`):
  allow_hosts  host patterns (fnmatch globs such as `*.example.com`) a request may go to; empty: any host.
  deny_hosts   host patterns refused even when allowed.
  max_bytes    response body bytes returned at most (default 1 MiB); the true size is reported when known.
  timeout      seconds for connect and each read (default 30).

Hosts are checked by name in `validate`, before any policy runs; redirects are not followed (the 3xx is
returned), so a redirect cannot carry a request to a host the lists refuse. The environment's proxy and
.netrc settings are ignored: the request goes out exactly as approved.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any, Literal

import httpx2
from pydantic import Field
from typing_extensions import TypedDict

from server.errors import InvalidArguments
from server.registry import GuardedTool, ToolRegistry, guarded_tool
from tools._common import PackOptions, cap_text, parse_options

PACK = "tools.http"
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")

Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class HttpOptions(PackOptions):
    allow_hosts: list[str] = Field(default_factory=list)
    deny_hosts: list[str] = Field(default_factory=list)
    max_bytes: int = Field(1_048_576, ge=0)
    timeout: float = Field(30.0, gt=0)


class HttpResult(TypedDict):
    status: int
    headers: dict[str, str]
    body: str
    bytes: int
    truncated: bool


def host_allowed(host: str, allow: list[str], deny: list[str]) -> bool:
    host = host.lower().rstrip(".")
    if any(fnmatch.fnmatchcase(host, p.lower()) for p in deny):
        return False
    return not allow or any(fnmatch.fnmatchcase(host, p.lower()) for p in allow)


async def send(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: str | None,
    *,
    max_bytes: int,
    time_limit: float,
    transport: httpx2.AsyncBaseTransport | None = None,
) -> HttpResult:
    """Send one request; read at most `max_bytes` (+1 to know it was cut) of the body."""
    kept, size = bytearray(), 0
    async with httpx2.AsyncClient(
        timeout=time_limit, follow_redirects=False, trust_env=False, transport=transport
    ) as client:
        content = body.encode("utf-8") if body is not None else None
        async with client.stream(method, url, headers=dict(headers), content=content) as response:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                kept += chunk[: max(0, max_bytes + 1 - len(kept))]
                if len(kept) > max_bytes:
                    break  # stop reading: the rest is not ours to hold
            status = response.status_code
            out_headers = {k: v for k, v in response.headers.items()}
    text, truncated = cap_text(bytes(kept), max_bytes)
    return {"status": status, "headers": out_headers, "body": text, "bytes": size, "truncated": truncated}


def build_tools(opts: HttpOptions) -> list[GuardedTool]:
    @guarded_tool(
        classifiers={"url": "url", "headers": "secret", "body": "size"},
        annotations={"readOnlyHint": False, "destructiveHint": True, "openWorldHint": True},
    )
    async def http_request(
        method: Method, url: str, headers: dict[str, str] | None = None, body: str | None = None
    ) -> HttpResult:
        """Send one HTTP(S) request and return the status, headers and (capped) body as text."""
        return await send(method, url, headers or {}, body, max_bytes=opts.max_bytes, time_limit=opts.timeout)

    @http_request.check
    def _request_check(args: dict[str, Any]) -> None:
        url = args["url"]
        if any(c in url for c in "\r\n\x00\t "):
            raise InvalidArguments(
                "http_request: 'url' contains whitespace or control characters", tool="http_request", field="url"
            )
        try:
            # The same parser that sends the request decides the host, so the check and the request agree.
            parsed = httpx2.URL(url)
            host = parsed.host
        except (httpx2.InvalidURL, ValueError, TypeError) as e:
            raise InvalidArguments(
                f"http_request: 'url' is not a valid URL: {e}", tool="http_request", field="url"
            ) from None
        if parsed.scheme not in ("http", "https") or not host:
            raise InvalidArguments(
                "http_request: 'url' must be an absolute http:// or https:// URL", tool="http_request", field="url"
            )
        if not host_allowed(host, opts.allow_hosts, opts.deny_hosts):
            raise InvalidArguments(
                f"http_request: host {host!r} is not allowed by this server's allow_hosts/deny_hosts",
                tool="http_request",
                field="url",
            )
        for name, value in (args["headers"] or {}).items():
            if not _HEADER_NAME.match(name) or any(c in value for c in "\r\n\x00"):
                raise InvalidArguments(
                    f"http_request: header {name[:64]!r} is not a valid header", tool="http_request", field="headers"
                )

    return [http_request]


def register(registry: ToolRegistry, options: Mapping[str, Any]) -> None:
    opts = parse_options(HttpOptions, options, PACK)
    for tool in build_tools(opts):
        registry.add(tool)
