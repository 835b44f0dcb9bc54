"""An upstream MCP server (stdio, raw JSON-RPC lines) whose answers are broken, each tool its own way.

    python broken_server.py CALLS_LOG             (stdio)
    python broken_server.py CALLS_LOG --http PORT (streamable HTTP on 127.0.0.1, JSON responses)

Every `tools/call` and `initialize` is appended to CALLS_LOG (one JSON line: tool or initialize, request id,
process id) before it answers, so a test can tell what was delivered and whether the process was restarted or
reconnected. All tools are read-only. `echo` answers well; `busy` answers JSON-RPC's generic server error (-32000,
the code of the SDK's own "connection closed" too); `mangled` answers with a string `result`; `no_message` with an
`error` without a `message`; `old_jsonrpc` with `"jsonrpc": "1.0"`; `bad_utf8` with a line that is not UTF-8;
`no_id` with a malformed answer whose id cannot be read (an object).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

READ_ONLY = {"readOnlyHint": True, "destructiveHint": False}
BROKEN = ("busy", "mangled", "no_message", "old_jsonrpc", "bad_utf8", "no_id")
TOOLS: list[dict[str, Any]] = [
    {"name": "echo", "annotations": READ_ONLY,
     "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}},
    *({"name": name, "annotations": READ_ONLY, "inputSchema": {"type": "object", "properties": {}}}
      for name in BROKEN),
]


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", **message}).encode()


def answer(log: str, msg: dict[str, Any]) -> bytes | None:
    """The raw answer to one message (None for a notification)."""
    method, msg_id = msg.get("method"), msg.get("id")
    if msg_id is None:
        return None
    if method == "initialize":
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"initialize": msg_id, "pid": os.getpid()}) + "\n")
        version = msg["params"].get("protocolVersion", "2025-06-18")
        return encode({"id": msg_id, "result": {"protocolVersion": version, "capabilities": {"tools": {}},
                                                "serverInfo": {"name": "broken", "version": "1.0"}}})
    if method == "tools/list":
        return encode({"id": msg_id, "result": {"tools": TOOLS}})
    if method == "ping":
        return encode({"id": msg_id, "result": {}})
    if method != "tools/call":
        return encode({"id": msg_id, "error": {"code": -32601, "message": f"Method not found: {method}"}})
    params = msg.get("params") or {}
    name, args = params.get("name"), params.get("arguments") or {}
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps({"tool": name, "id": msg_id, "pid": os.getpid()}) + "\n")
    if name == "echo":
        return encode({"id": msg_id, "result": {"content": [{"type": "text", "text": args["text"]}]}})
    if name == "busy":
        return encode({"id": msg_id, "error": {"code": -32000, "message": "busy: try again later"}})
    if name == "mangled":
        return encode({"id": msg_id, "result": "not an object"})
    if name == "no_message":
        return encode({"id": msg_id, "error": {"code": -32603}})
    if name == "old_jsonrpc":
        return json.dumps({"jsonrpc": "1.0", "id": msg_id, "result": {"content": []}}).encode()
    if name == "bad_utf8":
        return encode({"id": msg_id, "result": {"content": [{"type": "text", "text": "@"}]}}).replace(
            b"@", b"caf\xe9 \xff")
    if name == "no_id":
        return encode({"id": {"not": "an id"}, "result": "not an object"})
    return encode({"id": msg_id, "error": {"code": -32602, "message": f"Unknown tool: {name}"}})


def serve_stdio(log: str) -> None:
    for line in sys.stdin:
        raw = answer(log, json.loads(line))
        if raw is not None:
            sys.stdout.buffer.write(raw + b"\n")
            sys.stdout.buffer.flush()


def serve_http(log: str, port: int) -> None:
    """The same answers as JSON response bodies of streamable HTTP (no sessions, no SSE)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def mcp(request: Request) -> Response:
        if request.method != "POST":
            return Response(status_code=405)
        raw = answer(log, json.loads(await request.body()))
        if raw is None:
            return Response(status_code=202)
        return Response(raw, media_type="application/json")

    app = Starlette(routes=[Route("/mcp", mcp, methods=["GET", "POST", "DELETE"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    if sys.argv[2:3] == ["--http"]:
        serve_http(sys.argv[1], int(sys.argv[3]))
    else:
        serve_stdio(sys.argv[1])
