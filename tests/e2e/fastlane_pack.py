"""A tool pack for the fast-lane stories: `brittle`, whose structural check breaks (an error the gate does not
expect) when asked to, so the server's answer to a failing call can be seen on both lanes."""

from __future__ import annotations

from typing import Any

from server.errors import KeyturnError
from server.registry import guarded_tool


@guarded_tool(annotations={"readOnlyHint": True})
async def brittle(text: str) -> str:
    """Return `text` unchanged, unless it is "explode"."""
    return text


@brittle.check
def _breaks(arguments: dict[str, Any]) -> None:
    if arguments["text"] == "explode":
        raise KeyturnError("the check broke")
