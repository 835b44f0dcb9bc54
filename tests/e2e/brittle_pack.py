"""A tool pack for the stdio stories: `brittle`, which returns a result the protocol does not allow when asked to
(a text block without its text), so the server's answer to a call that cannot be answered can be seen."""

from __future__ import annotations

import mcp_types as types

from server.guarded import guarded_tool


@guarded_tool(annotations={"readOnlyHint": True})
async def brittle(text: str) -> types.CallToolResult:
    """Return `text` unchanged, unless it is "explode"."""
    if text == "explode":
        return types.CallToolResult(content=[types.TextContent.model_construct(type="text")])  # no `text`: invalid
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)])
