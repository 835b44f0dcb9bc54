"""A demo agent: connects to keyturn over streamable HTTP and makes an allowed, a denied and a held call.

    keyturn serve --http 127.0.0.1:8765 --config examples/keyturn.yaml     # terminal 1
    python examples/demo_agent.py http://127.0.0.1:8765/mcp                # terminal 2
    keyturn pending; keyturn approve ID --reason "demo"                      # terminal 3
"""

from __future__ import annotations

import sys

import anyio
from mcp import Client


async def main(url: str) -> None:
    async with Client(url) as client:
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
