"""A small streamable HTTP MCP server that wants a bearer token: the upstream of the `--upstream-url` tests.

    python http_upstream.py PORT TOKEN NOTES_DIR

Tools: `read_note` (read-only) and `write_note` (destructive), on files in NOTES_DIR.
"""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations
from starlette.types import ASGIApp, Receive, Scope, Send


def build(token: str, notes: Path) -> ASGIApp:
    mcp = MCPServer("notes")

    @mcp.tool(annotations=ToolAnnotations(read_only_hint=True))
    def read_note(name: str) -> str:
        """Read one note."""
        return (notes / name).read_text(encoding="utf-8")

    @mcp.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True))
    def write_note(name: str, text: str) -> str:
        """Replace one note."""
        (notes / name).write_text(text, encoding="utf-8")
        return f"wrote {len(text)} characters"

    app = mcp.streamable_http_app()

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != f"Bearer {token}".encode():
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"unauthorized"})
            return
        await app(scope, receive, send)

    return guarded


if __name__ == "__main__":
    port, token, notes_dir = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    uvicorn.run(build(token, notes_dir), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
