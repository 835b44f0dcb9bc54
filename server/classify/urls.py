"""URLs and host names -> facts: hosts, schemes, and whether a request would reach inside the network.

Private, loopback and link-local addresses (and the cloud metadata endpoint) are facts of their
own so a policy can stop server-side request forgery. Host names are lower-cased and IDNA-decoded
forms are not trusted: a host that does not parse is `unparseable`.

This module also holds keyturn's one judgement of an address (`literal_address`, `address_concern`,
`address_allowed`): the classifier applies it to literal IPs in any spelling a resolver accepts, and the
HTTP pack applies it again to every address a name resolves to before it connects. Classification stays
offline: a DNS name is never resolved here.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "METADATA_ADDRESSES",
    "IPAddress",
    "IPNetwork",
    "address_allowed",
    "address_concern",
    "classify_urls",
    "embedded_ipv4",
    "empty",
    "is_metadata",
    "literal_address",
    "parse_url",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
_METADATA_HOSTS = frozenset({*(str(a) for a in METADATA_ADDRESSES), "metadata.google.internal", "metadata"})

# Where a request must not go unless an operator allows it. Loopback and unspecified first: they are `loopback`.
_SPECIAL: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), label)
    for net, label in (
        ("127.0.0.0/8", "loopback"),
        ("::1/128", "loopback"),
        ("0.0.0.0/8", "unspecified"),  # "this network": 0.0.0.0 reaches this host
        ("::/128", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("fc00::/7", "private"),  # unique local
        ("fec0::/10", "private"),  # site-local (deprecated)
        ("64:ff9b:1::/48", "private"),  # local-use NAT64
        ("100.64.0.0/10", "shared (CGNAT)"),
        ("169.254.0.0/16", "link-local"),
        ("fe80::/10", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("ff00::/8", "multicast"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "reserved"),
        ("198.18.0.0/15", "reserved"),
        ("198.51.100.0/24", "reserved"),
        ("203.0.113.0/24", "reserved"),
        ("240.0.0.0/4", "reserved"),  # and 255.255.255.255
        ("100::/64", "reserved"),
        ("2001:db8::/32", "reserved"),
    )
)
_LINK_LOCAL_V4 = ipaddress.IPv4Network("169.254.0.0/16")
LOOPBACK_CONCERNS = frozenset({"loopback", "unspecified"})
_NUMERIC_V4 = re.compile(r"(0x[0-9a-f]*|\d+)(\.(0x[0-9a-f]*|\d+)){0,3}")
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".lan", ".home.arpa", ".corp", ".intranet")
_HOST_RE = re.compile(r"^[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?$|^\[[0-9a-f:.]+\]$|^[0-9a-f:.]+$")


def empty() -> dict[str, Any]:
    return {
        "present": False,
        "all": [],
        "hosts": [],
        "schemes": [],
        "ports": [],
        "private": False,
        "loopback": False,
        "metadata_endpoint": False,
        "credentials": False,
        "insecure": False,
        "unparseable": False,
        "errors": [],
    }


def parse_url(url: str) -> tuple[str, str, int | None, bool]:
    """(scheme, host, port, has credentials) of an absolute URL. Raises ValueError if it is not one."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if not scheme or not parts.netloc:
        raise ValueError(f"not an absolute URL: {url[:100]!r}")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host or not _HOST_RE.match(host):
        raise ValueError(f"URL has no valid host: {url[:100]!r}")
    port = parts.port  # raises ValueError on a bad port
    if port is None:
        port = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21}.get(scheme)
    return scheme, host, port, parts.username is not None or parts.password is not None


def classify_urls(urls: list[Any], hosts: list[Any]) -> dict[str, Any]:
    """Facts for URL arguments and bare host arguments (each a string or a list of strings)."""
    facts = empty()
    for value in _flatten(urls):
        facts["present"] = True
        if not isinstance(value, str):
            facts["unparseable"] = True
            facts["errors"].append(f"not a URL: {type(value).__name__}")
            continue
        try:
            scheme, host, port, creds = parse_url(value)
        except ValueError as e:
            facts["unparseable"] = True
            facts["errors"].append(str(e))
            continue
        facts["all"].append(value)
        facts["schemes"].append(scheme)
        if port is not None:
            facts["ports"].append(port)
        facts["credentials"] |= creds
        facts["insecure"] |= scheme in {"http", "ws", "ftp"}
        _host(host, facts)
    for value in _flatten(hosts):
        facts["present"] = True
        if not isinstance(value, str) or not value.strip():
            facts["unparseable"] = True
            facts["errors"].append("not a host name")
            continue
        host, port = _split_host(value)
        if port is not None:
            facts["ports"].append(port)
        if not _HOST_RE.match(host):
            facts["unparseable"] = True
            facts["errors"].append(f"not a host name: {value[:100]!r}")
            continue
        _host(host, facts)
    for key in ("hosts", "schemes", "ports"):
        facts[key] = list(dict.fromkeys(facts[key]))
    return facts


def _split_host(value: str) -> tuple[str, int | None]:
    v = value.strip().lower().rstrip(".")
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif v.count(":") == 1:
        host, _, port = v.partition(":")
    else:
        host, port = v, ""
    return host.rstrip("."), int(port) if port.isdigit() else None


def _host(host: str, facts: dict[str, Any]) -> None:
    host = host.strip("[]")
    facts["hosts"].append(host)
    if host in _METADATA_HOSTS:
        facts["metadata_endpoint"] = True
        facts["private"] = True
    try:
        ip = literal_address(host)
    except ValueError as e:
        facts["unparseable"] = True
        facts["errors"].append(str(e))
        return
    if ip is not None:
        concern = address_concern(ip)
        if concern is not None:
            facts["private"] = True
            facts["loopback"] |= concern in LOOPBACK_CONCERNS
            facts["metadata_endpoint"] |= concern == "cloud metadata"
        plain = embedded_ipv4(ip)
        v4 = plain[0] if plain is not None else ip
        if v4 in _LINK_LOCAL_V4 and str(v4).endswith(".254"):  # 169.254.x.254: metadata on some clouds
            facts["metadata_endpoint"] = True
    elif host == "localhost" or host.endswith(_LOCAL_SUFFIXES) or "." not in host:
        facts["private"] = True
        if host == "localhost" or host.endswith(".localhost"):
            facts["loopback"] = True


def literal_address(host: str) -> IPAddress | None:
    """The address a literal host names, in any spelling a resolver accepts; None for a DNS name.

    Takes `127.0.0.1`, `127.1`, `2130706433`, `0x7f.1`, `017700000001` (the `inet_aton` forms), a trailing dot,
    IPv6 with or without brackets (and a `%zone`). Raises ValueError for a host that is all numbers but no
    address (`999.1.1.1`, `08`): no DNS name looks like that, and resolvers differ on what it means.
    """
    bare = host.strip().lower()
    bare = bare[1:-1] if bare.startswith("[") and bare.endswith("]") else bare
    bare = bare[:-1] if bare.endswith(".") else bare
    if ":" in bare:
        try:
            return ipaddress.IPv6Address(bare)
        except ValueError:
            raise ValueError(f"not a valid IPv6 address: {host[:100]!r}") from None
    if not _NUMERIC_V4.fullmatch(bare):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(bare))
    except OSError:
        raise ValueError(f"a numeric host that is not a valid IPv4 address: {host[:100]!r}") from None


def embedded_ipv4(ip: IPAddress) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 address carries and how (IPv4-mapped, -compatible, SIIT, NAT64, 6to4, Teredo)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    n = int(ip)
    low = ipaddress.IPv4Address(n & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if n >> 32 == 0xFFFF0000:
        return low, "IPv4-translated (SIIT)"
    if n >> 32 == 0 and n > 1:
        return low, "IPv4-compatible"
    if n >> 32 == 0x0064FF9B << 64:
        return low, "NAT64"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    if ip.teredo is not None:
        return ip.teredo[1], "Teredo"
    return None


def _unzoned(ip: IPAddress) -> IPAddress:
    return ipaddress.IPv6Address(int(ip)) if isinstance(ip, ipaddress.IPv6Address) else ip  # `fe80::1%eth0` -> `fe80::1`


def is_metadata(ip: IPAddress) -> bool:
    """A cloud metadata endpoint, directly or inside an IPv6 form."""
    plain = _unzoned(ip)  # without a %zone
    inner = embedded_ipv4(plain)
    return plain in METADATA_ADDRESSES or (inner is not None and inner[0] in METADATA_ADDRESSES)


def address_concern(ip: IPAddress) -> str | None:
    """Why a request must not go to `ip` unless an operator allows it, or None for an ordinary public address.

    One of: cloud metadata, loopback, unspecified, private, shared (CGNAT), link-local, multicast, reserved.
    An IPv6 form that carries an IPv4 address (mapped, compatible, NAT64, 6to4, Teredo) is judged by that address.
    """
    if is_metadata(ip):
        return "cloud metadata"
    if isinstance(ip, ipaddress.IPv6Address):
        ip = _unzoned(ip)
        if int(ip) > 1:  # `::` and `::1` are themselves, not IPv4-compatible forms
            inner = embedded_ipv4(ip)
            if inner is not None:
                return address_concern(inner[0])
    for net, label in _SPECIAL:
        if ip.version == net.version and ip in net:
            return label
    return None if ip.is_global else "reserved"


def address_allowed(ip: IPAddress, allow: Iterable[IPNetwork]) -> bool:
    """Whether an operator's `allow` list covers `ip`. A metadata endpoint only when listed as that exact address."""
    plain = _unzoned(ip)
    if is_metadata(plain):
        return any(net.num_addresses == 1 and net.network_address == plain for net in allow)
    return any(plain.version == net.version and plain in net for net in allow)


def _flatten(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        out.extend(v if isinstance(v, list) else [v])
    return out
