"""Self-reference: would this call act on keyturn itself?

An agent must not approve its own call through a side door: run `keyturn approve`, call the
reviewer API, edit the policy, or write (or read) the ledger database. Each of those is a reason
in `self_target_reasons`; the default policy denies any call that has one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from server.classify.shell import WRITERS
from server.classify.urls import embedded_ipv4, literal_address

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", "::", "ip6-localhost"})
_CLI_VERBS = re.compile(r"\bkeyturn(?:\.exe)?\s+(?:[-\w=./]+\s+)*?(approve|deny|vote|decide|review|reviewer)\b", re.I)
_DB_SIBLINGS = ("", "-wal", "-shm", "-journal")


def _this_machine(host: str) -> bool:
    """A host that names this machine in any spelling: loopback or unspecified, as a name or an address (decimal,
    hex, octal, short forms, IPv4 inside IPv6)."""
    if host in _LOOPBACK or host.endswith(".localhost"):
        return True
    try:
        ip = literal_address(host)
    except ValueError:
        return False
    if ip is None:
        return False
    carried = embedded_ipv4(ip)
    ip = carried[0] if carried is not None else ip
    return ip.is_loopback or ip.is_unspecified


@dataclass(frozen=True)
class Targets:
    """keyturn's own files and endpoints, normalised once per call."""

    files: tuple[str, ...]  # real paths, with SQLite's sidecar files
    basenames: frozenset[str]
    netlocs: tuple[tuple[str, int | None], ...]  # (host, port); a loopback host stands for all loopback names

    @classmethod
    def build(cls, paths: Iterable[Path], urls: Iterable[str]) -> Targets:
        files: list[str] = []
        for p in paths:
            real = os.path.realpath(os.path.expanduser(str(p)))
            files.extend(real + suffix for suffix in _DB_SIBLINGS)
        netlocs: list[tuple[str, int | None]] = []
        for url in urls:
            try:
                parts = urlsplit(url)
                host = (parts.hostname or "").lower()
                port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
            except ValueError:
                continue
            if host:
                netlocs.append((host, port))
        return cls(tuple(files), frozenset(os.path.basename(f) for f in files[::4]), tuple(netlocs))

    def is_file(self, real: str) -> bool:
        # Files keyturn keeps beside its database (`<db>.reviewer-token`, `<db>.link-secret` ...) are its own too.
        return real in self.files or any(real.startswith(f + ".") for f in self.files[::4])

    def inside(self, real_dir: str) -> bool:
        prefix = real_dir.rstrip(os.sep) + os.sep
        return any(f.startswith(prefix) for f in self.files)

    def is_endpoint(self, host: str, port: int | None) -> bool:
        host = host.lower().strip("[]").rstrip(".")
        for h, p in self.netlocs:
            same_host = host == h or (_this_machine(h) and _this_machine(host))
            if same_host and (p is None or port is None or p == port):
                return True
        return False

    def mentions(self, text: str) -> str | None:
        """A reason if free text names a keyturn file, endpoint or the approving CLI."""
        for f in self.files[::4]:
            if f in text:
                return f"mentions keyturn file {f}"
        lowered = text.lower()
        for h, p in self.netlocs:
            hosts = _LOOPBACK | {h} if h in _LOOPBACK else {h}
            for host in hosts:
                needle = f"{host}:{p}" if p is not None else f"//{host}"
                if needle in lowered or (":" in host and f"[{host}]:{p}" in lowered):
                    return f"mentions keyturn endpoint {needle}"
        m = _CLI_VERBS.search(text) if "keyturn" in lowered else None
        if m:
            return f"mentions the keyturn CLI ({m.group(0)[:60]})"
        return None


def check_paths(targets: Targets, resolved: Iterable[str], read_only: bool | None) -> list[str]:
    """Reasons for path arguments that are keyturn's files (or directories holding them)."""
    reasons = []
    for real in resolved:
        if targets.is_file(real):
            if read_only and real.endswith((".yaml", ".yml")):
                continue  # reading the policy or config file is harmless; the ledger, tokens and secrets are not
            reasons.append(f"path {real} is keyturn's own file")
        elif not read_only and targets.inside(real):
            reasons.append(f"path {real} contains keyturn's own files")
    return reasons


def check_urls(targets: Targets, urls: Iterable[str], hosts: Iterable[str]) -> list[str]:
    reasons = []
    for url in urls:
        try:
            parts = urlsplit(url.strip())
            port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
            host = parts.hostname or ""
        except ValueError:
            continue
        if host and targets.is_endpoint(host, port):
            reasons.append(f"URL {url[:100]} is keyturn's own API")
    for host in hosts:
        name, _, port_text = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
        if targets.is_endpoint(name, int(port_text) if port_text.isdigit() else None):
            reasons.append(f"host {host} is keyturn's own API")
    return reasons


def check_shell(targets: Targets, commands: Iterable[list[str]], base: Path | None) -> list[str]:
    """Reasons from parsed shell commands: the keyturn CLI, keyturn files or endpoints as words."""
    reasons = []
    for argv in commands:
        if not argv:
            continue
        program = os.path.basename(argv[0]).lower()
        if program in {"keyturn", "keyturn.exe"} and not set(argv[1:]) <= {"--version", "--help", "-h"}:
            reasons.append(f"runs the keyturn CLI: {' '.join(argv[:3])[:80]}")
        for word in argv[1:]:
            for piece in {word, *word.split("=")[1:]}:
                reasons.extend(_shell_word(targets, piece, base, program in WRITERS))
    return reasons


def _shell_word(targets: Targets, word: str, base: Path | None, writes: bool) -> list[str]:
    if "://" in word:
        return check_urls(targets, [word], [])
    if os.path.basename(word.rstrip("/")) in targets.basenames and not os.path.isabs(os.path.expanduser(word)):
        return [f"word {word!r} names keyturn's own file"]
    if "/" in word or word.startswith("~"):
        try:
            real = os.path.realpath(os.path.join(str(base or os.getcwd()), os.path.expanduser(word)))
        except (ValueError, OSError):
            return []
        if targets.is_file(real):
            return [f"word {word!r} is keyturn's own file"]
        if writes and targets.inside(real):
            return [f"word {word!r} contains keyturn's own files"]
    return []


def scan_strings(targets: Targets, strings: Iterable[tuple[str, str]]) -> list[str]:
    """Reasons from any string argument (pointer, text) that mentions keyturn."""
    reasons = []
    for where, text in strings:
        reason = targets.mentions(text)
        if reason:
            reasons.append(f"{where or '/'}: {reason}")
    return reasons


def empty() -> dict[str, Any]:
    return {"self_target": False, "self_target_reasons": []}
