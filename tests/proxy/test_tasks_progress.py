"""A client that declares the tasks extension and calls a tool that is allowed at once gets its answer directly,
with the tool's own progress on the way (an upstream's, through `keyturn proxy` over stdio): only a held call
becomes a task."""

from __future__ import annotations

import anyio
from mcp import Client
from mcp.client.extension import ClientExtension

from tests.proxy.conftest import ProxyHome, text


class DeclaresTasks(ClientExtension):
    identifier = "io.modelcontextprotocol/tasks"


async def test_an_allowed_call_from_a_tasks_client_is_answered_directly_with_the_upstreams_progress(
        home: ProxyHome) -> None:
    home.configure([home.flaky()])
    seen: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message)

    with anyio.fail_after(60):
        async with Client(home.proxy_params(), extensions=[DeclaresTasks()]) as client:
            result = await client.call_tool("slow", {"steps": 3}, progress_callback=on_progress)
    assert text(result) == "done in 3 steps" and seen == ["step 1", "step 2", "step 3"]
    [call] = home.calls()
    assert call["meta"]["progressToken"] is not None
