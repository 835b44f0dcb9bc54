"""A tiny upstream MCP server (stdio, plain JSON-RPC, 2025-era handshake) that misbehaves on request.

    python flaky_server.py CALLS_LOG [DOWN_MARKER]

While the file DOWN_MARKER exists the server exits at once (an upstream that cannot restart). Every
`tools/call` it receives is appended to CALLS_LOG (one JSON line, with its request id and `_meta`) before it
acts, so a test can tell what was delivered, and how. Tools: `echo`, `run_query` (no annotations: the config
classifies `query` as SQL), `slow` (reports progress), `fail` (an isError result), `crash` (the process exits
mid-call), `hang` (the whole server stops answering), `add_tool` (adds `extra` and announces
tools/list_changed), `env` (the names of its environment variables); unlisted: `noise` (writes lines that are
not JSON-RPC messages first), `mangled` (answers with a malformed response). Its process id (`PID-RANDOM`: in a
sandbox a pid is its PID namespace's, the same number again after a restart) is appended to CALLS_LOG.pids when it
starts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

PROCESS = f"{os.getpid()}-{os.urandom(4).hex()}"
READ_ONLY = {"readOnlyHint": True, "destructiveHint": False}
TOOLS: list[dict[str, Any]] = [
    {"name": "echo", "description": "Echo the text back.", "annotations": READ_ONLY,
     "inputSchema": {"type": "object", "properties": {"text": {"type": "string", "maxLength": 100}},
                     "required": ["text"], "additionalProperties": False}},
    {"name": "run_query", "description": "Run a SQL statement (pretend).",
     "inputSchema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}},
    {"name": "slow", "description": "Work in steps, reporting progress.", "annotations": READ_ONLY,
     "inputSchema": {"type": "object", "properties": {"steps": {"type": "integer", "minimum": 1}}}},
    {"name": "fail", "description": "Always fails.", "annotations": READ_ONLY,
     "inputSchema": {"type": "object", "properties": {}}},
    {"name": "crash", "description": "Exit the process mid-call.", "annotations": READ_ONLY,
     "inputSchema": {"type": "object", "properties": {}}},
    {"name": "hang", "description": "Stop answering anything.", "annotations": READ_ONLY,
     "inputSchema": {"type": "object", "properties": {}}},
    {"name": "add_tool", "description": "Add the tool `extra`.", "annotations": READ_ONLY,
     "inputSchema": {"type": "object", "properties": {}}},
    {"name": "env", "description": "The names of the environment variables.", "annotations": READ_ONLY,
     "inputSchema": {"type": "object", "properties": {}}},
]
EXTRA = {"name": "extra", "description": "Appeared later.", "annotations": READ_ONLY,
         "inputSchema": {"type": "object", "properties": {}}}


def send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", **message}) + "\n")
    sys.stdout.flush()


def text(value: str, *, error: bool = False) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": value}], "isError": error}


def call(log: str, msg_id: Any, params: dict[str, Any]) -> None:
    name, args = params.get("name"), params.get("arguments") or {}
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps({"tool": name, "arguments": args, "pid": PROCESS, "id": msg_id,
                            "meta": params.get("_meta")}) + "\n")
    token = (params.get("_meta") or {}).get("progressToken")
    if name == "echo":
        send({"id": msg_id, "result": text(args["text"])})
    elif name == "run_query":
        send({"id": msg_id, "result": text(f"ran: {args['query']}")})
    elif name == "slow":
        steps = int(args.get("steps", 3))
        for i in range(1, steps + 1):
            if token is not None:
                send({"method": "notifications/progress",
                      "params": {"progressToken": token, "progress": i, "total": steps, "message": f"step {i}"}})
            time.sleep(0.05)
        send({"id": msg_id, "result": text(f"done in {steps} steps")})
    elif name == "fail":
        send({"id": msg_id, "result": text("upstream says no: the flux capacitor is offline", error=True)})
    elif name == "crash":
        os._exit(3)
    elif name == "hang":
        time.sleep(3600)
    elif name == "add_tool":
        if EXTRA not in TOOLS:
            TOOLS.append(EXTRA)
        send({"id": msg_id, "result": text("added")})
        send({"method": "notifications/tools/list_changed"})
    elif name == "env":
        send({"id": msg_id, "result": text(" ".join(sorted(os.environ)))})
    elif name == "extra":
        send({"id": msg_id, "result": text("extra ran")})
    elif name == "noise":
        sys.stdout.write("this is not JSON-RPC\n")
        send({"method": 5, "params": {"note": "keyturn-1 is mentioned"}})
        send({"id": msg_id, "result": text("after the noise")})
    elif name == "busy":  # JSON-RPC's generic server error: the same code as the SDK's "connection closed"
        send({"id": msg_id, "error": {"code": -32000, "message": "busy: try again later"}})
    elif name == "mangled":
        send({"id": msg_id, "result": "not an object"})
    else:
        send({"id": msg_id, "error": {"code": -32602, "message": f"Unknown tool: {name}"}})


def main() -> None:
    log = sys.argv[1]
    if len(sys.argv) > 2 and os.path.exists(sys.argv[2]):
        sys.exit(4)
    with open(log + ".pids", "a", encoding="utf-8") as f:
        f.write(f"{PROCESS}\n")
    for line in sys.stdin:
        msg = json.loads(line)
        method, msg_id = msg.get("method"), msg.get("id")
        if msg_id is None:
            continue  # notifications
        if method == "initialize":
            version = msg["params"].get("protocolVersion", "2025-06-18")
            send({"id": msg_id, "result": {"protocolVersion": version,
                                           "capabilities": {"tools": {"listChanged": True}},
                                           "serverInfo": {"name": "flaky", "version": "1.0"}}})
        elif method == "tools/list":
            send({"id": msg_id, "result": {"tools": TOOLS}})
        elif method == "tools/call":
            call(log, msg_id, msg.get("params") or {})
        elif method == "ping":
            send({"id": msg_id, "result": {}})
        else:
            send({"id": msg_id, "error": {"code": -32601, "message": f"Method not found: {method}"}})


if __name__ == "__main__":
    main()
