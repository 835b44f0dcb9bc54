"""A small upstream MCP server (stdio, plain JSON-RPC, stdlib only) that reports what it can reach from where it runs.

    python probe_server.py [--wait-for PATH] [--sleep SECONDS]

`--wait-for PATH`: it answers `initialize` only once PATH exists (an upstream that is still starting, for as long as
a test wants); `--sleep`: it sleeps that long first (a slow upstream). Tools (all read-only):
`processes` (the pids its `/proc` lists), `read` (a file's text, or the error), `connect` (a TCP connection to
host:port, or the error), `identity` (its pid and whether it runs with keyturn's environment variables).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

READ_ONLY = {"readOnlyHint": True, "destructiveHint": False}
TOOLS: list[dict[str, Any]] = [
    {"name": "processes", "description": "The pids in /proc.", "annotations": READ_ONLY,
     "inputSchema": {"type": "object", "properties": {}}},
    {"name": "read", "description": "Read a file.", "annotations": READ_ONLY,
     "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}},
    {"name": "connect", "description": "Open a TCP connection.", "annotations": READ_ONLY,
     "inputSchema": {"type": "object", "properties": {"host": {"type": "string"}, "port": {"type": "integer"}},
                     "required": ["host", "port"]}},
]


def send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", **message}) + "\n")
    sys.stdout.flush()


def text(value: str, *, error: bool = False) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": value}], "isError": error}


def call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    if name == "processes":
        return text(json.dumps(sorted(int(p) for p in os.listdir("/proc") if p.isdigit())))
    if name == "read":
        try:
            return text(Path(args["path"]).read_text(errors="replace"))
        except OSError as e:
            return text(f"{type(e).__name__}: {e}", error=True)
    if name == "connect":
        try:
            with socket.create_connection((args["host"], args["port"]), timeout=5) as s:
                return text(f"connected to {s.getpeername()}")
        except OSError as e:
            return text(f"{type(e).__name__}: {e}", error=True)
    return text(f"unknown tool {name}", error=True)


def main() -> None:
    argv = sys.argv[1:]
    if "--sleep" in argv:
        time.sleep(float(argv[argv.index("--sleep") + 1]))
    for line in sys.stdin:
        msg = json.loads(line)
        method, msg_id = msg.get("method"), msg.get("id")
        if msg_id is None:
            continue
        if method == "initialize":
            if "--wait-for" in argv:
                while not os.path.exists(argv[argv.index("--wait-for") + 1]):
                    time.sleep(0.05)
            send({"id": msg_id, "result": {"protocolVersion": msg["params"].get("protocolVersion", "2025-06-18"),
                                           "capabilities": {"tools": {}},
                                           "serverInfo": {"name": "probe", "version": "1.0"}}})
        elif method == "tools/list":
            send({"id": msg_id, "result": {"tools": TOOLS}})
        elif method == "tools/call":
            params = msg.get("params") or {}
            send({"id": msg_id, "result": call(params.get("name"), params.get("arguments") or {})})
        elif method == "ping":
            send({"id": msg_id, "result": {}})
        else:
            send({"id": msg_id, "error": {"code": -32601, "message": f"Method not found: {method}"}})


if __name__ == "__main__":
    main()
