"""Held calls as tasks: the MCP tasks extension (`io.modelcontextprotocol/tasks`, SEP-2663, protocol 2026-07-28).

A client that declares the extension on its `tools/call` gets a task for a call that is held for review, instead of
a request that stays open for hours: `tasks/get` reports the request (working while it is pending, approved or
running; completed with the tool's result, or with keyturn's error result when it was denied or expired; cancelled
when withdrawn), `tasks/cancel` withdraws it (recorded `cancelled`, as `keyturn_cancel`), and `tasks/update` is
acknowledged (keyturn never asks a task for input). A call allowed or denied at once is answered directly, and a
client without the extension keeps the held call's usual wait (progress, rejoin).

The task stands in for the waiting agent: a holder in this process waits for the decision and, once approved, runs
the call once for the task; its result is kept in memory for `tasks/get` for `TASK_RESULT_KEPT_S` (never in the
ledger; a secret result only until one `tasks/get` has carried it). A task whose result is gone (kept no longer,
or another process asked) reports how it ended from the ledger. The task id is the request id (a random UUID, 122
random bits), and a task is seen only by the principal that created it: anyone else is told there is no such task.

Served through the SDK's public extension points: an `Extension` (its `methods` and `intercept_tool_call`), applied
to the lowlevel `Server` with `add_request_handler` and `extensions` (`install`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding, compose_tool_call_handler
from mcp.shared.exceptions import MCPError
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import Field

from server.approvals.broker import first_of
from server.approvals.holding import on_hold, waiting_message
from server.gate import Identity
from server.guarded import SECRET_RESULT_META
from server.models import RequestView
from server.outcomes import closed_result, ran_before_result
from server.runtime import Keyturn

log = logging.getLogger(__name__)

TASKS_EXTENSION = "io.modelcontextprotocol/tasks"
TASK_RESULT_KEPT_S = 3600.0
"""How long a task's result stays in memory for `tasks/get` after the call ended."""
TASK_RESULTS_MAX_BYTES = 64 * 2**20
"""Task results kept in memory, at most: past it the oldest are forgotten first (their tasks then read the ledger)."""
OPEN = ("received", "allowed", "pending", "approved", "running")


class TaskParams(types.RequestParams):
    task_id: str = Field(alias="taskId", max_length=200)


class UpdateTaskParams(TaskParams):
    input_responses: dict[str, Any] | None = Field(default=None, alias="inputResponses")


@dataclass
class Task:
    task_id: str
    principal: str
    created: float
    result: dict[str, Any] | None = None  # the call's result (CallToolResult, wire form) once it ended
    ended: float | None = None
    size: int = 0
    secret: bool = False  # a secret result: given once, then forgotten


@dataclass
class TaskBook:
    """The tasks this process holds, and their results for a bounded time, in memory only."""

    kept_s: float = TASK_RESULT_KEPT_S
    max_bytes: int = TASK_RESULTS_MAX_BYTES
    tasks: dict[str, Task] = field(default_factory=dict)
    kept_bytes: int = 0

    def open(self, task_id: str, principal: str) -> None:
        self.tasks.setdefault(task_id, Task(task_id, principal, time.time()))

    def finish(self, task_id: str, result: types.CallToolResult) -> None:
        task = self.tasks.get(task_id)
        if task is None or task.result is not None:
            return  # another holder of the same request ended it first: that outcome stands
        task.result = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        task.secret = bool((result.meta or {}).get(SECRET_RESULT_META))
        task.ended = time.time()
        task.size = len(str(task.result))
        self.kept_bytes += task.size
        self.forget(task.ended)

    def given(self, task: Task) -> None:
        """A `tasks/get` carried the task's result: a secret one is not kept for another."""
        if task.secret and task.result is not None:
            task.result = None
            self.kept_bytes -= task.size
            task.size = 0

    def get(self, task_id: str) -> Task | None:
        self.forget(time.time())
        return self.tasks.get(task_id)

    def forget(self, now: float) -> None:
        """Drop the tasks whose results have been kept long enough, then the oldest past the byte bound."""
        ended = sorted((t for t in self.tasks.values() if t.ended is not None), key=lambda t: t.ended or 0.0)
        for task in ended:
            if task.ended is not None and (now - task.ended > self.kept_s or self.kept_bytes > self.max_bytes):
                del self.tasks[task.task_id]
                self.kept_bytes -= task.size


def declares_tasks(ctx: ServerRequestContext[Any, Any]) -> bool:
    """The request is 2026-era and declares the tasks extension in its client capabilities."""
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return False
    capabilities = ctx.session.client_capabilities
    return bool(capabilities is not None and capabilities.extensions and TASKS_EXTENSION in capabilities.extensions)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


class HeldCallsAsTasks(Extension):
    """keyturn's tasks: a held call answered with a task, and `tasks/get`, `tasks/update`, `tasks/cancel`."""

    identifier = TASKS_EXTENSION

    def __init__(self, kt: Keyturn, identify: Callable[[ServerRequestContext[Any, Any]], Identity],
                 builtin: frozenset[str] = frozenset()) -> None:
        self.kt, self.identify, self.builtin = kt, identify, builtin
        self.book = TaskBook()
        self.poll_interval_ms = max(100, int(kt.settings.progress_interval_s * 1000))

    def methods(self) -> Sequence[MethodBinding]:
        versions = frozenset(MODERN_PROTOCOL_VERSIONS)
        return (MethodBinding("tasks/get", TaskParams, self.get, versions),
                MethodBinding("tasks/update", UpdateTaskParams, self.update, versions),
                MethodBinding("tasks/cancel", TaskParams, self.cancel, versions))

    async def intercept_tool_call(self, params: types.CallToolRequestParams, ctx: ServerRequestContext[Any, Any],
                                  call_next: CallNext) -> HandlerResult:
        # Only a declaring client's call is looked at here (most calls pass straight through, at no cost).
        if not declares_tasks(ctx) or self.kt.task_group is None or params.name in self.builtin:
            return await call_next(ctx)
        tool = self.kt.find_tool(params.name)
        if tool is None:
            return await call_next(ctx)
        who = self.identify(ctx)
        held, done = anyio.Event(), anyio.Event()
        ended: list[types.CallToolResult] = []
        request_ids: list[str] = []

        def holding(request_id: str) -> None:
            self.book.open(request_id, who.principal)
            request_ids.append(request_id)
            held.set()

        wants_progress = progress_token_from_params(ctx.params) is not None

        async def progress(value: float, total: float | None, message: str | None) -> None:
            # The caller's progress channel while it is still waiting for an answer (a tool's own progress, for a
            # call allowed at once); once it has its task, nobody listens there.
            if wants_progress and not held.is_set() and not done.is_set():
                try:
                    await ctx.session.report_progress(value, total, message)
                except Exception:  # the caller's stream closed meanwhile: its progress is nobody's
                    log.debug("progress for a closed request dropped", exc_info=True)

        async def hold() -> None:
            # The task's holder: no connection to lose; it waits as long as the request does.
            token = on_hold.set(holding)
            try:
                try:
                    result = await self.kt.gate.call(tool, params.arguments or {}, who, progress)
                finally:
                    on_hold.reset(token)
                if request_ids:
                    self.book.finish(request_ids[0], result)
                ended.append(result)
            except Exception:  # (the gate answers every end itself; this must not take the process down)
                log.exception("the task holder for %s failed", params.name)
            finally:
                done.set()

        self.kt.task_group.start_soon(hold, name=f"task holder for {params.name}")
        await first_of(held, done)
        if not held.is_set():  # allowed or denied at once (or refused): answered directly
            if ended:
                return ended[0]
            raise MCPError(code=types.INTERNAL_ERROR, message="keyturn could not hold this call")
        view = await self.kt.ledger.get_call(request_ids[0])
        task = await self._snapshot(request_ids[0], view)
        return {**task, "resultType": "task"}

    # -- tasks/* --------------------------------------------------------------------------------

    async def get(self, ctx: ServerRequestContext[Any, Any], params: TaskParams) -> HandlerResult:
        view = await self._own(ctx, params.task_id)
        return {**await self._snapshot(params.task_id, view), "resultType": "complete"}

    async def update(self, ctx: ServerRequestContext[Any, Any], params: UpdateTaskParams) -> HandlerResult:
        await self._own(ctx, params.task_id)
        return {"resultType": "complete"}  # keyturn asks a task for no input: every response is for no open request

    async def cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskParams) -> HandlerResult:
        view = await self._own(ctx, params.task_id)
        # As `keyturn_cancel`: only an open request can be withdrawn; a task that ended stays as it ended.
        await self.kt.broker.cancel(params.task_id, view.principal, "withdrawn by the agent (tasks/cancel)")
        return {"resultType": "complete"}

    async def _own(self, ctx: ServerRequestContext[Any, Any], task_id: str) -> RequestView:
        """The caller's own task's request; anyone else's, or none, is "no such task"."""
        if not declares_tasks(ctx):
            raise MCPError(code=types.MISSING_REQUIRED_CLIENT_CAPABILITY, message="Missing required client capability",
                           data={"requiredCapabilities": {"extensions": {TASKS_EXTENSION: {}}}})
        who = self.identify(ctx)
        task = self.book.get(task_id)
        view = await self.kt.ledger.get_call(task_id)
        if view is None or view.principal != who.principal or (task is not None and task.principal != who.principal):
            raise MCPError(code=types.INVALID_PARAMS, message=f"no such task: {task_id}")
        return view

    async def _snapshot(self, task_id: str, view: RequestView | None) -> dict[str, Any]:
        """The task as the spec's `DetailedTask`, from this process's task and the ledger."""
        if view is None:
            raise MCPError(code=types.INVALID_PARAMS, message=f"no such task: {task_id}")
        task = self.book.get(task_id)
        base: dict[str, Any] = {"taskId": task_id, "createdAt": iso(view.created), "ttlMs": None,
                                "pollIntervalMs": self.poll_interval_ms}
        if view.state == "cancelled":
            return {**base, "status": "cancelled", "lastUpdatedAt": iso(self._ended(task)),
                    "statusMessage": f"request {task_id} was withdrawn: {view.outcome_reason or 'cancelled'}"}
        if task is not None and task.result is not None and view.state not in OPEN:
            result = task.result
            self.book.given(task)
            return {**base, "status": "completed", "lastUpdatedAt": iso(self._ended(task)), "result": result,
                    "statusMessage": f"request {task_id} is {view.state}"}
        if view.state in OPEN:
            message = waiting_message(view)
            if view.state == "approved" and (task is None or task.result is not None):
                message = (f"keyturn request {task_id}: approved, and no holder here runs it: call the same tool "
                           "with the same arguments again before it expires to run it, once")
            return {**base, "status": "working", "lastUpdatedAt": iso(time.time()), "statusMessage": message}
        return {**base, "status": "completed", "lastUpdatedAt": iso(time.time()),
                "result": (await self._from_ledger(view)).model_dump(mode="json", by_alias=True, exclude_none=True),
                "statusMessage": f"request {task_id} is {view.state}"}

    @staticmethod
    def _ended(task: Task | None) -> float:
        return task.ended if task is not None and task.ended is not None else time.time()

    async def _from_ledger(self, view: RequestView) -> types.CallToolResult:
        """How a call ended, when its result is not (or no longer) kept here."""
        if view.state in ("executed", "failed"):
            end = [e for e in await self.kt.ledger.events(view.id) if e.kind in ("executed", "failed")][-1]
            reason = end.payload.get("error")
            return ran_before_result(view.id, end.kind, end.ts, reason if isinstance(reason, str) else None)
        return closed_result(view)


def install(server: Server[Any], extension: Extension,
            call_tool: Callable[[ServerRequestContext[Any, Any], types.CallToolRequestParams], Any]) -> None:
    """Apply `extension` to a lowlevel `Server`: advertise it, serve its methods (at the versions they admit), and
    wrap `call_tool` with its `tools/call` interceptor."""
    server.extensions[extension.identifier] = extension.settings()
    for binding in extension.methods():
        server.add_request_handler(binding.method, binding.params_type, _versioned(binding))
    server.add_request_handler("tools/call", types.CallToolRequestParams,
                               compose_tool_call_handler([extension], call_tool))


def _versioned(binding: MethodBinding) -> Callable[[ServerRequestContext[Any, Any], Any], Any]:
    async def handler(ctx: ServerRequestContext[Any, Any], params: Any) -> HandlerResult:
        if binding.protocol_versions is not None and ctx.protocol_version not in binding.protocol_versions:
            raise MCPError(code=types.METHOD_NOT_FOUND, message=f"Method not found: {binding.method}")
        return await binding.handler(ctx, params)

    return handler
