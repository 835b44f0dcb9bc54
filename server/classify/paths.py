"""File paths -> facts: where a path really points (symlinks resolved), and whether that is inside the roots.

A relative path is resolved against the first configured root (that is where the file tools act),
or the working directory when no root is configured. `..` and symlinks are followed the way the
operating system would follow them, so `../../etc/passwd` and a link that escapes a root are both
seen for what they are.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

_SENSITIVE = re.compile(
    r"""(^|/)(
        \.ssh(/|$) | \.gnupg(/|$) | \.aws/(credentials|config)$ | \.kube/config$ | \.docker/config\.json$ |
        \.netrc$ | \.pgpass$ | \.git-credentials$ | \.npmrc$ | \.pypirc$ | \.env(\.[^/]*)?$ |
        id_(rsa|dsa|ecdsa|ed25519)[^/]*$ | [^/]+\.(pem|key|p12|pfx|keystore|jks)$ |
        etc/(shadow|gshadow|sudoers|passwd|master\.passwd)$ | etc/sudoers\.d(/|$) | etc/ssl/private(/|$)
    )""",
    re.VERBOSE,
)
_SYSTEM_PREFIXES = ("/etc", "/usr", "/bin", "/sbin", "/boot", "/lib", "/lib64", "/dev", "/proc", "/sys", "/root",
                    "/var/lib", "/var/run", "/run", "/System", "/Library", "C:\\Windows")  # fmt: skip


def is_sensitive(path: str) -> bool:
    """Credential or account files (`~/.ssh/...`, `.env`, `/etc/shadow`, `*.pem` ...)."""
    return bool(_SENSITIVE.search(path))


def empty() -> dict[str, Any]:
    return {
        "present": False,
        "all": [],
        "raw": [],
        "by_arg": {},
        "absolute": False,
        "traversal": False,
        "inside_roots": False,
        "outside_roots": False,
        "roots_configured": False,
        "symlink_escape": False,
        "sensitive": False,
        "system": False,
        "unparseable": False,
        "errors": [],
    }


def resolve(raw: str, roots: tuple[Path, ...]) -> tuple[str, str]:
    """(lexically normalised, really resolved) absolute forms of `raw`. Raises ValueError on NUL."""
    if "\x00" in raw:
        raise ValueError("path contains a NUL byte")
    expanded = os.path.expanduser(raw)
    base = str(roots[0]) if roots else os.getcwd()
    joined = os.path.join(base, expanded)  # an absolute `expanded` replaces base
    lexical = os.path.normpath(joined)
    real = os.path.realpath(joined)
    return lexical, real


def classify_paths(values: list[tuple[str, Any]], roots: tuple[Path, ...]) -> dict[str, Any]:
    """Facts for (argument name, value) pairs; a value may be a string or a list of strings."""
    facts = empty()
    real_roots = [os.path.realpath(r) for r in roots]
    facts["roots_configured"] = bool(real_roots)
    all_inside = True
    for name, value in values:
        items = value if isinstance(value, list) else [value]
        for item in items:
            facts["present"] = True
            if not isinstance(item, str) or item == "":
                facts["unparseable"] = True
                facts["errors"].append(f"{name}: not a path: {type(item).__name__}")
                all_inside = False
                continue
            try:
                lexical, real = resolve(item, roots)
            except (ValueError, OSError) as e:
                facts["unparseable"] = True
                facts["errors"].append(f"{name}: {e}")
                all_inside = False
                continue
            facts["raw"].append(item)
            facts["all"].append(real)
            facts["by_arg"].setdefault(name, []).append(real)
            facts["absolute"] |= os.path.isabs(os.path.expanduser(item))
            facts["traversal"] |= ".." in re.split(r"[\\/]", item)
            facts["sensitive"] |= bool(_SENSITIVE.search(real) or _SENSITIVE.search(lexical))
            facts["system"] |= any(_within(p, s) for s in _SYSTEM_PREFIXES for p in (real, lexical))
            if real_roots:
                real_inside = any(_within(real, r) for r in real_roots)
                lexical_inside = any(_within(lexical, r) for r in real_roots) or any(
                    _within(lexical, os.path.normpath(str(r))) for r in roots
                )
                if lexical_inside and not real_inside:
                    facts["symlink_escape"] = True
                if not real_inside:
                    facts["outside_roots"] = True
                    all_inside = False
    facts["inside_roots"] = bool(real_roots) and bool(facts["all"]) and all_inside
    return facts


def _within(path: str, root: str) -> bool:
    if path == root:
        return True
    prefix = root if root.endswith(os.sep) else root + os.sep
    return path.startswith(prefix)
