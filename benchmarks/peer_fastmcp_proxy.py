"""A peer for the benchmark: fastmcp's `create_proxy` in front of a stdio MCP server, served over stdio.

    <fastmcp's venv>/bin/python benchmarks/peer_fastmcp_proxy.py -- COMMAND ARGS...

Run by `benchmarks/transport.py` with the Python of the virtual environment `benchmarks/peers.py` installed fastmcp
into (never keyturn's): fastmcp's documented proxy, as its users start it, with no settings of our own.
"""

from __future__ import annotations

import os
import sys

from fastmcp.client.transports import StdioTransport
from fastmcp.server import create_proxy


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise SystemExit("usage: peer_fastmcp_proxy.py -- COMMAND ARGS...")
    # The upstream inherits this environment (its PYTHONPATH, and the marker its CPU time is counted by).
    upstream = StdioTransport(command=argv[0], args=argv[1:], env=dict(os.environ))
    create_proxy(upstream, name="fastmcp-proxy").run(show_banner=False)


if __name__ == "__main__":
    main()
