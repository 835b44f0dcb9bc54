"""The baseline: a plain, unguarded MCP server (the SDK's low-level `Server`) with the same `echo` tool.

    python benchmarks/plain_server.py                       # stdio, on keyturn's transport (the same as `keyturn serve`)
    python benchmarks/plain_server.py --stdio sdk           # stdio, on the SDK's default `stdio_server()`
    python benchmarks/plain_server.py --http 127.0.0.1:PORT

It lists the same tool definition keyturn serves (`bench_tools.echo`) and returns the same result
(text content plus structured content), on the same SDK server class and transports keyturn uses,
so the difference between the two is what keyturn adds. Over stdio it runs by default on the very transport
`keyturn serve` uses (`server.serving.stdio.stdio_transport`: the SDK's `stdio_server` fed by the event loop's
pipes), so the comparison is guard against no guard, not one transport against another; `--stdio sdk` is the
plain server as its users run it (the SDK's `stdio_server()` with its worker threads).
"""

from __future__ import annotations

import argparse
from typing import Any

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError

ECHO = types.Tool(
    name="echo",
    description="Return `text` unchanged.",
    input_schema={"type": "object", "title": "echoArguments", "additionalProperties": False,
                  "properties": {"text": {"title": "Text", "type": "string"}}, "required": ["text"]},
    output_schema={"type": "object", "title": "echoOutput",
                   "properties": {"result": {"title": "Result", "type": "string"}}, "required": ["result"]},
    annotations=types.ToolAnnotations(read_only_hint=True),
)


async def list_tools(ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
    return types.ListToolsResult(tools=[ECHO])


async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> types.CallToolResult:
    text = (params.arguments or {}).get("text")
    if params.name != ECHO.name:
        raise MCPError(code=types.INVALID_PARAMS, message=f"unknown tool {params.name!r}")
    if not isinstance(text, str):
        raise MCPError(code=types.INVALID_PARAMS, message="text must be a string")
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)],
                                structured_content={"result": text}, is_error=False)


def build() -> Server[Any]:
    return Server("plain-echo", version="1.0.0", on_list_tools=list_tools, on_call_tool=call_tool)


async def serve_stdio(transport: str) -> None:
    if transport == "sdk":
        from mcp.server.stdio import stdio_server as stdio
    else:
        from server.serving.stdio import stdio_transport as stdio

    server = build()
    async with stdio() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


async def serve_http(host: str, port: int) -> None:
    import uvicorn

    app = build().streamable_http_app(streamable_http_path="/mcp", host=host)
    await uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")).serve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", metavar="HOST:PORT")
    parser.add_argument("--stdio", choices=("keyturn", "sdk"), default="keyturn",
                        help="the stdio transport: keyturn's (as `keyturn serve` runs) or the SDK's default")
    opts = parser.parse_args()
    if opts.http:
        host, _, port = opts.http.rpartition(":")
        anyio.run(serve_http, host, int(port))
    else:
        anyio.run(serve_stdio, opts.stdio)


if __name__ == "__main__":
    main()
