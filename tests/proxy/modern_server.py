"""A tiny 2026-era upstream (the SDK's low-level `Server`, stdio) that records what it receives.

    python modern_server.py CALLS_LOG

Every `tools/call` is appended to CALLS_LOG (one JSON line: tool, arguments, the request id and `_meta`) before
it acts. Tools: `echo` (text plus structured content, under an output schema), `slow` (reports progress),
`fail` (an isError result), `refuse` (a JSON-RPC error), `bad_output` (structured content its schema rejects),
`sleep` (until cancelled; a cancellation is logged too), `ask` (needs input the client must give: an
elicitation), `resume` (asks to be called again with its state, then answers), `crash` (exits mid-call).
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
from mcp.shared.exceptions import MCPError

LOG = sys.argv[1]
OBJECT: dict[str, Any] = {"type": "object", "properties": {}}
OUTPUT = {"type": "object", "properties": {"result": {"type": "string"}}, "required": ["result"]}
TOOLS = [
    types.Tool(name="echo", input_schema={"type": "object", "properties": {"text": {"type": "string"}}},
               output_schema=OUTPUT),
    types.Tool(name="slow", input_schema={"type": "object", "properties": {"steps": {"type": "integer"}}}),
    types.Tool(name="bad_output", input_schema=OBJECT, output_schema=OUTPUT),
    *(types.Tool(name=name, input_schema=OBJECT) for name in ("fail", "refuse", "sleep", "ask", "resume", "crash")),
]


def record(entry: dict[str, Any]) -> None:
    with open(LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def text(value: str, *, error: bool = False) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=value)], is_error=error)


async def list_tools(ctx: ServerRequestContext[Any, Any],
                     params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
    return types.ListToolsResult(tools=TOOLS)


async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> Any:
    args = params.arguments or {}
    meta = dict((ctx.params or {}).get("_meta") or {})  # as it came over the wire
    record({"tool": params.name, "arguments": args, "id": ctx.request_id, "meta": meta,
            "state": params.request_state})
    if params.name == "echo":
        return types.CallToolResult(content=[types.TextContent(type="text", text=args["text"])],
                                    structured_content={"result": args["text"]})
    if params.name == "slow":
        token, steps = meta.get("progressToken"), int(args.get("steps", 3))
        for i in range(1, steps + 1):
            if token is not None:
                await ctx.session.send_progress_notification(token, i, steps, f"step {i}",
                                                             related_request_id=ctx.request_id)
            await anyio.sleep(0.02)
        return text(f"done in {steps} steps")
    if params.name == "fail":
        return text("upstream says no", error=True)
    if params.name == "refuse":
        raise MCPError(code=-32050, message="refused: the vault is sealed")
    if params.name == "bad_output":
        return types.CallToolResult(content=[], structured_content={"result": 3})
    if params.name == "sleep":
        try:
            await anyio.sleep(3600)
        finally:
            record({"cancelled": ctx.request_id})
    if params.name == "ask":
        question = types.ElicitRequest(params=types.ElicitRequestFormParams(
            message="Which branch?", requested_schema={"type": "object", "properties": {}}))
        return types.InputRequiredResult(input_requests={"branch": question})
    if params.name == "resume":
        if params.request_state is None:
            return types.InputRequiredResult(request_state="step-2")
        return text(f"resumed from {params.request_state}")
    if params.name == "crash":
        os._exit(3)
    raise MCPError(code=types.INVALID_PARAMS, message=f"unknown tool {params.name!r}")


async def main() -> None:
    server = Server("modern-recorder", version="1.0.0", on_list_tools=list_tools, on_call_tool=call_tool)
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


if __name__ == "__main__":
    anyio.run(main)
