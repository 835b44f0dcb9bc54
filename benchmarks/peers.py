"""The peer proxies a user would put in front of an MCP server instead of keyturn, each installed by the benchmark
into a virtual environment of its own (never into keyturn's), pinned, and measured in the same run as `keyturn proxy`
in front of the same plain server.

    fastmcp      fastmcp's `create_proxy` over stdio (benchmarks/peer_fastmcp_proxy.py): a pass-through proxy,
                 no policy, no ledger
    mcp_airlock  mcp-airlock over streamable HTTP (stateless 2026-07-28 requests): a governance proxy with a flat
                 YAML policy (`echo` at tier L0, read: passed straight through) and a JSONL audit file written
                 before and after each call (unbuffered writes, no fsync)

A peer that cannot be installed or started here is skipped with its reason (`peer_<name>_skipped=<reason>`), never
silently. The environments are kept outside the source tree, in `$KEYTURN_BENCH_PEERS` or else
`~/.cache/keyturn/bench-peers/`, and reused by later runs; the first run installs them from PyPI (a few minutes on
a small machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

HOME = Path(os.environ.get("KEYTURN_BENCH_PEERS") or Path.home() / ".cache" / "keyturn" / "bench-peers")
INSTALL_TIMEOUT_S = 900


@dataclass(frozen=True)
class Peer:
    name: str  # as printed: peer_<name>_ratio_median
    requirement: str  # what pip installs, pinned
    transport: str  # "stdio" or "http"
    what: str

    @property
    def env_dir(self) -> Path:
        return HOME / self.requirement.replace("==", "-")

    @property
    def python(self) -> Path:
        return self.env_dir / "bin" / "python"


PEERS = (
    Peer("fastmcp", "fastmcp==4.2.3", "stdio", "fastmcp create_proxy (stdio, pass-through)"),
    Peer("mcp_airlock", "mcp-airlock==0.4.1", "http", "mcp-airlock (streamable HTTP, L0 tier, JSONL audit)"),
)


class PeerUnavailable(Exception):
    """The peer cannot be measured here; the message says why (printed as `peer_<name>_skipped=`)."""


def ensure(peer: Peer) -> Path:
    """The peer's Python, installing the peer into its own virtual environment first if needed."""
    done = peer.env_dir / ".installed"
    if done.exists() and peer.python.exists():
        return peer.python
    if os.environ.get("KEYTURN_BENCH_NO_INSTALL"):
        raise PeerUnavailable("not installed, and KEYTURN_BENCH_NO_INSTALL is set")
    print(f"  installing {peer.requirement} into {peer.env_dir} ...", file=sys.stderr, flush=True)
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(peer.env_dir)
        pip = subprocess.run([str(peer.python), "-m", "pip", "install", "-q", peer.requirement],
                             capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        raise PeerUnavailable(f"cannot install {peer.requirement}: {type(e).__name__}: {e}") from e
    if pip.returncode != 0:
        last = [line for line in pip.stderr.splitlines() if line.strip() and "is ignored" not in line][-1:]
        raise PeerUnavailable(f"pip install {peer.requirement} failed: {' '.join(last) or pip.returncode}")
    done.write_text(peer.requirement + "\n", encoding="utf-8")
    return peer.python


def one_line(reason: object) -> str:
    """A skip reason fit for a `name=value` line."""
    return " ".join(str(reason).split())[:300] or "unknown"
