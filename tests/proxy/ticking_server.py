"""A small upstream (the SDK's low-level `Server`, stdio) whose tools run until cancelled, reporting progress.

    python ticking_server.py CALLS_LOG

Every `tools/call` is appended to CALLS_LOG (one JSON line: tool, request id, progress token, the process id) as
it starts, and again when its handler is cancelled (`{"cancelled": id}`: the upstream received the client's
`notifications/cancelled`). Tools: `tick` (read-only: reports progress every 50 ms until cancelled, or for
`steps` steps), `tick_write` (the same, destructive: held for review), `echo`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.server.stdio import stdio_server

LOG = sys.argv[1]
STEPS = {"type": "object", "properties": {"steps": {"type": "integer", "minimum": 1}}}
TOOLS = [
    types.Tool(name="tick", input_schema=STEPS,
               annotations=types.ToolAnnotations(read_only_hint=True, destructive_hint=False)),
    types.Tool(name="tick_write", input_schema=STEPS,
               annotations=types.ToolAnnotations(read_only_hint=False, destructive_hint=True)),
    types.Tool(name="echo", input_schema={"type": "object", "properties": {"text": {"type": "string"}}},
               annotations=types.ToolAnnotations(read_only_hint=True, destructive_hint=False)),
]


def record(entry: dict[str, Any]) -> None:
    with open(LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps({**entry, "pid": os.getpid()}) + "\n")


def text(value: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=value)])


async def list_tools(ctx: ServerRequestContext[Any, Any],
                     params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
    return types.ListToolsResult(tools=TOOLS)


async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> Any:
    args = params.arguments or {}
    token = dict((ctx.params or {}).get("_meta") or {}).get("progressToken")
    record({"tool": params.name, "id": ctx.request_id, "token": token})
    if params.name == "echo":
        return text(str(args.get("text")))
    steps = int(args.get("steps", 1_000_000))
    try:
        for i in range(1, steps + 1):
            if token is not None:
                await ctx.session.send_progress_notification(token, i, None, f"tick {i}",
                                                             related_request_id=ctx.request_id)
            await anyio.sleep(0.05)
    except anyio.get_cancelled_exc_class():
        record({"cancelled": ctx.request_id})
        raise
    return text(f"ticked {steps} times")


async def main() -> None:
    server: Server[Any] = Server("ticking", on_list_tools=list_tools, on_call_tool=call_tool)
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


if __name__ == "__main__":
    anyio.run(main)
