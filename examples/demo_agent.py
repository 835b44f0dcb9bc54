"""A demo agent: connects to keyturn over streamable HTTP and makes three calls: a SELECT the shipped policy lets
run at once, and a DROP TABLE and a CREATE TABLE that it holds for a reviewer. It is the agent of README.md's
quick tour (checked by tests/test_quick_tour.py):

    keyturn serve --http 127.0.0.1:8765          # terminal 1, in the checkout (the embedded defaults)
    python examples/demo_agent.py                # terminal 2 (or give the MCP endpoint's URL)
    keyturn pending                              # terminal 3: deny the DROP TABLE, approve the CREATE TABLE
    keyturn deny REQUEST_ID --reason "not today"; keyturn approve REQUEST_ID --reason "demo"

On the embedded defaults an agent on 127.0.0.1 needs no token. A server with `agents:` in its config wants a
bearer token: set `KEYTURN_AGENT_TOKEN` and this agent sends it.
"""

from __future__ import annotations

import os
import sys

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main(url: str) -> None:
    token = os.environ.get("KEYTURN_AGENT_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # A held call waits for a person: the HTTP client's read timeout must outlast the wait.
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=3600)) as http, \
            Client(streamable_http_client(url, http_client=http)) as client:
        tools = await client.list_tools()
        print("guarded tools:", ", ".join(t.name for t in tools.tools))

        async def show_progress(progress: float, total: float | None, message: str | None) -> None:
            print(f"  ... {message}")

        for name, args in [
            ("sql_query", {"query": "SELECT name FROM sqlite_master LIMIT 5"}),
            ("sql_execute", {"statement": "DROP TABLE customers"}),
            ("sql_execute", {"statement": "CREATE TABLE IF NOT EXISTS notes(id INTEGER PRIMARY KEY, body TEXT)"}),
        ]:
            print(f"\n{name} {args}")
            result = await client.call_tool(name, args, progress_callback=show_progress)
            verdict = "ERROR" if result.is_error else "ok"
            print(f"  {verdict}: " + " ".join(getattr(c, "text", "") for c in result.content)[:400])


if __name__ == "__main__":
    anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8765/mcp")
