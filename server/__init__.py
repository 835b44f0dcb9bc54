"""keyturn: a human's key in the lock between AI agents and privileged operations.

What a developer registering a guarded tool needs:

    from server import guarded_tool

    @guarded_tool(classifiers={"query": "sql"}, annotations={"readOnlyHint": True})
    async def run_report(query: str, limit: int = 100) -> str:
        ...

and, in a pack module, `def register(registry: ToolRegistry, options) -> None: registry.add(run_report)`.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.errors import InvalidArguments, KeyturnError, ToolError
    from server.execution import PackContext, RunLimits, current_limits
    from server.guarded import GuardedTool, ToolRegistry, guarded_tool
    from server.models import Decision, ToolCall, Verdict

# Loaded on first use: a command that needs none of them (`keyturn pending`) does not import the MCP SDK.
_ON_USE = {"InvalidArguments": "errors", "KeyturnError": "errors", "ToolError": "errors",
           "PackContext": "execution", "RunLimits": "execution", "current_limits": "execution",
           "GuardedTool": "guarded", "ToolRegistry": "guarded", "guarded_tool": "guarded",
           "Decision": "models", "ToolCall": "models", "Verdict": "models"}


def __getattr__(name: str) -> Any:
    if name in _ON_USE:
        return getattr(import_module(f"server.{_ON_USE[name]}"), name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")

__all__ = [
    "Decision",
    "GuardedTool",
    "InvalidArguments",
    "KeyturnError",
    "PackContext",
    "RunLimits",
    "ToolCall",
    "ToolError",
    "ToolRegistry",
    "Verdict",
    "current_limits",
    "guarded_tool",
]
