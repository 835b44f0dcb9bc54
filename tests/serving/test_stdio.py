"""The stdio transport: the same MCP over stdin/stdout, read and written on the event loop."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

ROOT = Path(__file__).resolve().parents[2]

SERVER = textwrap.dedent("""
    import sys
    import anyio
    import mcp_types as types
    from mcp.server import Server
    from server.serving.stdio import stdio_transport

    async def list_tools(ctx, params):
        return types.ListToolsResult(tools=[types.Tool(name="echo", input_schema={"type": "object"})])

    async def call_tool(ctx, params):
        print("stray output from a tool")  # must not reach the wire
        text = params.arguments["text"]
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)])

    async def main():
        server = Server("t", on_list_tools=list_tools, on_call_tool=call_tool)
        async with stdio_transport() as (read, write):
            await server.run(read, write, server.create_initialization_options())
        print("served", file=sys.stderr)

    anyio.run(main)
""")


def params(tmp_path: Path) -> StdioServerParameters:
    script = tmp_path / "mcp_server_under_test.py"
    script.write_text(SERVER, encoding="utf-8")
    return StdioServerParameters(command=sys.executable, args=[str(script)], env={"PYTHONPATH": str(ROOT)})


async def test_calls_big_and_small_go_through_and_stray_output_goes_to_stderr(tmp_path: Path) -> None:
    with open(tmp_path / "stderr.txt", "w") as errlog:  # noqa: ASYNC230 (a local file, for the child's stderr)
        async with Client(stdio_client(params(tmp_path), errlog=errlog)) as client:
            with anyio.fail_after(30):
                for text in ("hi", "é✓" * 10, "x" * 1_000_000):
                    result = await client.call_tool("echo", {"text": text})
                    assert not result.is_error and result.content[0].text == text  # type: ignore[union-attr]
    log = (tmp_path / "stderr.txt").read_text()
    assert log.count("stray output from a tool") == 3
    assert "served" in log  # the server saw the client close stdin and ended on its own


def test_a_stdin_that_is_not_a_pipe_is_served_by_the_sdk_transport(tmp_path: Path) -> None:
    request = tmp_path / "in.jsonl"
    request.write_text('{"jsonrpc":"2.0","id":1,"method":"ping"}\n', encoding="utf-8")
    (tmp_path / "mcp_server_under_test.py").write_text(SERVER, encoding="utf-8")
    with open(request, "rb") as stdin:
        out = subprocess.run([sys.executable, str(tmp_path / "mcp_server_under_test.py")], stdin=stdin, capture_output=True,
                             env={"PYTHONPATH": str(ROOT)}, timeout=60)
    assert b'"id":1' in out.stdout and b"served" in out.stderr
