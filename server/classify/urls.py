"""URLs and host names -> facts: hosts, schemes, and whether a request would reach inside the network.

Private, loopback and link-local addresses (and the cloud metadata endpoint) are facts of their
own so a policy can stop server-side request forgery. Host names are lower-cased and IDNA-decoded
forms are not trusted: a host that does not parse is `unparseable`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any
from urllib.parse import urlsplit

_METADATA_HOSTS = frozenset(
    {"169.254.169.254", "fd00:ec2::254", "metadata.google.internal", "metadata", "100.100.100.200"}
)
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
    ip = _ip(host)
    if ip is not None:
        if ip.is_loopback or ip.is_unspecified:
            facts["loopback"] = True
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_unspecified:
            facts["private"] = True
        if ip.is_link_local and str(ip).endswith(".254"):
            facts["metadata_endpoint"] = True
    elif host == "localhost" or host.endswith(_LOCAL_SUFFIXES) or "." not in host:
        facts["private"] = True
        if host == "localhost" or host.endswith(".localhost"):
            facts["loopback"] = True


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        # Decimal, octal or hex forms (`2130706433`, `0x7f.1`) reach 127.0.0.1 through most resolvers.
        if re.fullmatch(r"(0x[0-9a-f]+|\d+)(\.(0x[0-9a-f]+|\d+)){0,3}", host):
            try:
                return ipaddress.ip_address(socket.inet_aton(host))
            except (OSError, ValueError):
                return None
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _flatten(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        out.extend(v if isinstance(v, list) else [v])
    return out
