"""The HTTP pack: one HTTP request to an allowed destination, with a capped response.

Options (`tools: [{module: tools.http, options: {...}}]`):
  allow_hosts      host patterns (fnmatch globs such as `*.example.com`) a request may go to; empty: any host.
  deny_hosts       host patterns refused even when allowed.
  allow_addresses  networks (CIDR, e.g. `10.0.0.0/8`, `127.0.0.1/32`) a request may reach although they are
                   internal; empty: none. A cloud metadata endpoint (169.254.169.254, 169.254.170.2,
                   fd00:ec2::254, 100.100.100.200) is reachable only when listed as that exact address.
  max_bytes        response body bytes returned at most (default 1 MiB); the true size is reported when known.
  timeout          seconds for connect and each read (default 30).

Where a request goes is judged by address, not by spelling. When it runs, the host is resolved once and every
address it resolves to must be public: loopback, unspecified, private (RFC 1918, ULA), shared (CGNAT),
link-local, multicast, reserved, an IPv6 form that carries one of those (IPv4-mapped, -compatible, NAT64, 6to4,
Teredo) and cloud metadata endpoints are refused unless `allow_addresses` covers them
(`server.classify.urls.address_concern`). The request then connects to the checked address itself (no second
lookup, so DNS rebinding cannot move it), sending the URL's Host header and, for https, the URL's host name as SNI,
with the certificate verified for that name. `validate` (before any policy runs) already refuses a literal
address in any spelling (`2130706433`, `0x7f.1`, `[::ffff:7f00:1]` ...) that is not allowed, an IPv4 address
spelled other than as four decimals, `localhost` names, a Host header, and hosts the name lists refuse.
Redirects are not followed (the 3xx is returned), so a redirect cannot carry a request anywhere. The
environment's proxy and .netrc settings are ignored: the request goes out exactly as approved.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import socket
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import anyio
import httpx2
from pydantic import Field, IPvAnyNetwork
from typing_extensions import TypedDict

from server.classify.urls import (
    LOOPBACK_CONCERNS,
    IPAddress,
    IPNetwork,
    address_allowed,
    address_concern,
    literal_address,
)
from server.errors import InvalidArguments
from server.guarded import GuardedTool, ToolRegistry, guarded_tool
from tools._common import PackOptions, cap_text, parse_options

PACK = "tools.http"
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")
_LOOPBACK_NAMES = re.compile(r"^(localhost|.*\.localhost)$")  # RFC 6761: always this host

Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class HttpOptions(PackOptions):
    allow_hosts: list[str] = Field(default_factory=list)
    deny_hosts: list[str] = Field(default_factory=list)
    allow_addresses: list[IPvAnyNetwork] = Field(default_factory=list)
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


def refusal(host: str | None, ip: IPAddress, allow: Sequence[IPNetwork], verb: str = "is") -> str | None:
    """Why a request must not go to `ip` (which `host` names), or None when it may. Without `host` (a validation
    error, which names the field and never the value) the address is not named either."""
    concern = address_concern(ip)
    if concern is None or address_allowed(ip, allow):
        return None
    how = ("only by listing this exact address in allow_addresses" if concern == "cloud metadata"
           else "by listing its network in allow_addresses")
    where = f"host {host!r} {verb} {ip}" if host is not None else "'url' names"
    return f"{where}, a {concern} address; requests may not go there (an operator can allow it {how})"


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, from the system resolver (asked once per request)."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


async def destinations(url: httpx2.URL, allow: Sequence[IPNetwork]) -> list[IPAddress]:
    """The addresses `url` may be sent to: its literal address, or every address its host resolves to, each judged.

    Raises PermissionError when any of them is refused (a name with one internal address is refused whole).
    """
    host = url.raw_host.decode("ascii")
    literal = literal_address(host)
    addresses = [literal] if literal is not None else await resolve(host, url.port or _default_port(url))
    if not addresses:
        raise OSError(f"{host!r} resolves to no address")
    for ip in addresses:
        why = refusal(host, ip, allow, "is" if literal is not None else "resolves to")
        if why is not None:
            raise PermissionError(why)
    return addresses


def _default_port(url: httpx2.URL) -> int:
    return 443 if url.scheme == "https" else 80


async def send(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: str | None,
    *,
    max_bytes: int,
    time_limit: float,
    allow_addresses: Sequence[IPNetwork] = (),
    verify: ssl.SSLContext | bool = True,
) -> HttpResult:
    """Send one request to an address judged by `destinations`; read at most `max_bytes` (+1 to know it was cut).

    The URL's host is replaced by the checked address, so nothing resolves it again; the Host header and (https)
    the SNI name and the name the certificate is verified for stay the URL's host. If connecting to one checked
    address fails (nothing was sent), the next one is tried.
    """
    target = httpx2.URL(url)
    with anyio.fail_after(time_limit):
        addresses = await destinations(target, allow_addresses)
    host = target.raw_host.decode("ascii")
    named = literal_address(host) is None
    out_headers = {**headers, "Host": target.netloc.decode("ascii")}
    extensions = {"sni_hostname": host.rstrip(".")} if named and target.scheme == "https" else {}
    content = body.encode("utf-8") if body is not None else None
    async with httpx2.AsyncClient(timeout=time_limit, follow_redirects=False, trust_env=False, verify=verify) as client:
        for i, ip in enumerate(addresses):
            try:
                return await _exchange(client, method, target.copy_with(host=str(ip)), out_headers, content,
                                       extensions, max_bytes)
            except httpx2.ConnectError:
                if i == len(addresses) - 1:
                    raise
    raise AssertionError("unreachable: destinations() returns at least one address")


async def _exchange(client: httpx2.AsyncClient, method: str, url: httpx2.URL, headers: dict[str, str],
                    content: bytes | None, extensions: dict[str, Any], max_bytes: int) -> HttpResult:
    kept, size = bytearray(), 0
    async with client.stream(method, url, headers=headers, content=content, extensions=extensions) as response:
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
    allow: tuple[IPNetwork, ...] = tuple(opts.allow_addresses)
    loopback_allowed = any(address_concern(net.network_address) in LOOPBACK_CONCERNS for net in allow)

    def refuse(message: str, field: str = "url") -> InvalidArguments:
        return InvalidArguments(f"http_request: {message}", tool="http_request", field=field)

    @guarded_tool(
        classifiers={"url": "url", "headers": "secret", "body": "size"},
        annotations={"readOnlyHint": False, "destructiveHint": True, "openWorldHint": True},
    )
    async def http_request(
        method: Method, url: str, headers: dict[str, str] | None = None, body: str | None = None
    ) -> HttpResult:
        """Send one HTTP(S) request and return the status, headers and (capped) body as text."""
        return await send(method, url, headers or {}, body, max_bytes=opts.max_bytes, time_limit=opts.timeout,
                          allow_addresses=allow)

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
            # The parser's words without the part of the value it quotes ("Invalid port: '...'").
            raise InvalidArguments(
                f"http_request: 'url' is not a valid URL ({str(e).split(':')[0][:80]})", tool="http_request",
                field="url",
            ) from None
        if parsed.scheme not in ("http", "https") or not host:
            raise InvalidArguments(
                "http_request: 'url' must be an absolute http:// or https:// URL", tool="http_request", field="url"
            )
        raw = parsed.raw_host.decode("ascii")
        # Errors name the field, never its value: the host may be a secret, or the agent's probe of the network.
        try:
            literal = literal_address(raw)
        except ValueError:
            raise refuse("'url' has a numeric host that is not a valid IP address") from None
        if literal is not None:
            why = refusal(None, literal, allow)
            if why is not None:
                raise refuse(why)
            if literal.version == 4 and raw.rstrip(".") != str(literal):
                # (the plain form is the address the value already spells, told so the agent can write it plainly)
                raise refuse(f"'url' spells its IPv4 host in an unusual form; write it as {literal}")
        elif _LOOPBACK_NAMES.match(raw.lower().rstrip(".")) and not loopback_allowed:
            raise refuse("'url' names this machine (loopback); requests may not go there "
                         "(an operator can allow it by listing 127.0.0.1/32 or ::1/128 in allow_addresses)")
        if not host_allowed(host, opts.allow_hosts, opts.deny_hosts):
            raise InvalidArguments(
                "http_request: the host of 'url' is not allowed by this server's allow_hosts/deny_hosts",
                tool="http_request",
                field="url",
            )
        for name, value in (args["headers"] or {}).items():
            if not _HEADER_NAME.match(name) or any(c in value for c in "\r\n\x00"):
                raise refuse("'headers' holds a header that is not valid (its name or its value)", "headers")
            if name.lower() == "host":
                raise refuse("the Host header is the URL's host; put the host in 'url'", "headers")

    return [http_request]


def register(registry: ToolRegistry, options: Mapping[str, Any]) -> None:
    opts = parse_options(HttpOptions, options, PACK)
    for tool in build_tools(opts):
        registry.add(tool)
