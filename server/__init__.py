"""keyturn: a human's key in the lock between AI agents and privileged operations.

What a developer registering a guarded tool needs:

    from server import guarded_tool

    @guarded_tool(classifiers={"query": "sql"}, annotations={"readOnlyHint": True})
    async def run_report(query: str, limit: int = 100) -> str:
        ...

and, in a pack module, `def register(registry: ToolRegistry, options) -> None: registry.add(run_report)`.
"""

from server.errors import InvalidArguments, KeyturnError, ToolError
from server.execution import PackContext, RunLimits, current_limits
from server.guarded import GuardedTool, ToolRegistry, guarded_tool
from server.models import Decision, ToolCall, Verdict

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
