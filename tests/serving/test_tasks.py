"""Held calls as tasks, on the wire and from the Python SDK's client: only a 2026-07-28 request that declares the
tasks extension gets a task; every other client keeps the held call's wait (progress, then the result); the
`tasks/*` methods answer only a declaring client, and only about its own tasks."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest

from server.guarded import SECRET_RESULT_META
from server.serving.tasks import TaskBook
from tests.conftest import Home, ReviewerAPI, agent_client
from tests.helpers import eventually

TASKS = "io.modelcontextprotocol/tasks"
HELD = {"statement": "UPDATE orders SET qty = 9 WHERE id = 1"}  # reviewed by the spine policy


async def rpc(base: str, method: str, params: dict[str, Any], *, extensions: dict[str, Any] | None = None,
              name: str | None = None, version: str = "2026-07-28") -> dict[str, Any]:
    """One 2026-07-28 request over streamable HTTP, framed as the protocol asks (its `_meta` and headers)."""
    meta = {"io.modelcontextprotocol/protocolVersion": version,
            "io.modelcontextprotocol/clientInfo": {"name": "wire", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {"extensions": extensions or {}}}
    headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": version,
               "Mcp-Method": method, **({"Mcp-Name": name} if name else {})}
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": meta}}
    async with httpx2.AsyncClient(timeout=30) as http:
        r = await http.post(f"{base}/mcp", json=body, headers=headers)
    text = r.text
    if "text/event-stream" in r.headers.get("content-type", ""):
        text = next(line[5:].strip() for line in text.splitlines() if line.startswith("data:") and '"id"' in line)
    return dict(json.loads(text))


async def test_a_client_without_the_tasks_extension_waits_for_its_held_call_with_progress(home: Home) -> None:
    base = home.serve_http()
    api = ReviewerAPI(base)
    progress: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    async with agent_client(base) as client:
        results: list[Any] = []

        async def call() -> None:
            results.append(await client.call_tool("sql_execute", HELD, progress_callback=on_progress))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            request = await api.wait_pending("sql_execute")
            await eventually(lambda: any("waiting for human approval" in m for m in progress))
            assert not results  # still waiting: no task, no early answer
            r = await api.vote(request["id"], "approve", "alice", "ok")
            assert r.status_code == 200, r.text
    result = results[0]
    assert not result.is_error, result
    assert "rows_affected" in json.dumps(result.model_dump(mode="json"))
    assert home.rows("SELECT qty FROM orders WHERE id = 1") == [(9,)]


async def test_only_a_declaring_2026_request_gets_a_task_and_only_its_principal_sees_it(home: Home) -> None:
    base = home.serve_http()
    api = ReviewerAPI(base)
    created = await rpc(base, "tools/call", {"name": "sql_execute", "arguments": HELD}, extensions={TASKS: {}},
                        name="sql_execute")
    task = created["result"]
    assert task["resultType"] == "task" and task["status"] == "working", created
    assert len(task["taskId"]) == 32 and task["ttlMs"] is None and task["pollIntervalMs"] > 0
    request = await api.wait_pending("sql_execute")
    assert request["id"] == task["taskId"]

    got = await rpc(base, "tasks/get", {"taskId": task["taskId"]}, extensions={TASKS: {}}, name=task["taskId"])
    assert got["result"]["status"] == "working" and got["result"]["resultType"] == "complete", got
    # Without the extension on the request: the spec's missing-capability error, whatever the task.
    bare = await rpc(base, "tasks/get", {"taskId": task["taskId"]}, name=task["taskId"])
    assert bare["error"]["code"] == -32021, bare
    assert bare["error"]["data"]["requiredCapabilities"] == {"extensions": {TASKS: {}}}
    unknown = await rpc(base, "tasks/get", {"taskId": "0" * 32}, extensions={TASKS: {}}, name="0" * 32)
    assert unknown["error"]["code"] == -32602 and "no such task" in unknown["error"]["message"], unknown
    update = await rpc(base, "tasks/update", {"taskId": task["taskId"], "inputResponses": {"x": {}}},
                       extensions={TASKS: {}}, name=task["taskId"])
    assert update["result"]["resultType"] == "complete", update

    # An approval runs it for the task, once; tasks/get then carries the tool's result.
    r = await api.vote(task["taskId"], "approve", "alice", "ok")
    assert r.status_code == 200, r.text

    async def completed() -> dict[str, Any] | None:
        got = await rpc(base, "tasks/get", {"taskId": task["taskId"]}, extensions={TASKS: {}}, name=task["taskId"])
        return got["result"] if got["result"]["status"] == "completed" else None

    done = await eventually(completed)
    assert not done["result"].get("isError") and "rows_affected" in json.dumps(done["result"]), done
    assert home.rows("SELECT qty FROM orders WHERE id = 1") == [(9,)]
    # Allowed calls answer directly, even for a declaring client.
    allowed = await rpc(base, "tools/call", {"name": "sql_query", "arguments": {"query": "SELECT 1"}},
                        extensions={TASKS: {}}, name="sql_query")
    assert allowed["result"]["resultType"] == "complete" and "taskId" not in allowed["result"], allowed
    assert not allowed["result"].get("isError"), allowed


@pytest.mark.parametrize("extensions", [None, {"io.example/other": {}}])
async def test_a_2026_request_that_does_not_declare_tasks_waits_as_before(home: Home,
                                                                       extensions: dict[str, Any] | None) -> None:
    base = home.serve_http()
    api = ReviewerAPI(base)
    answers: list[dict[str, Any]] = []

    async def call() -> None:
        answers.append(await rpc(base, "tools/call", {"name": "sql_execute", "arguments": HELD},
                                 extensions=extensions, name="sql_execute"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        request = await api.wait_pending("sql_execute")
        await anyio.sleep(0.5)
        assert not answers
        r = await api.vote(request["id"], "approve", "alice", "ok")
        assert r.status_code == 200, r.text
    result = answers[0]["result"]
    assert result["resultType"] == "complete" and not result.get("isError") and "taskId" not in result, answers


def result_of(text: str, *, secret: bool = False) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)],
                                meta={SECRET_RESULT_META: True} if secret else None)


def test_a_task_keeps_its_result_for_a_bounded_time_and_a_secret_one_for_one_reading_only() -> None:
    book = TaskBook(kept_s=60, max_bytes=10_000)
    book.open("t1", "agent")
    book.open("t1", "someone-else")  # the same request held twice: the first task stands
    assert book.tasks["t1"].principal == "agent"
    book.finish("t1", result_of("first"))
    book.finish("t1", result_of("second"))  # a second holder's outcome does not replace it
    task = book.get("t1")
    assert task is not None and task.result is not None and task.result["content"][0]["text"] == "first"
    book.given(task)
    assert book.tasks["t1"].result is not None  # not a secret: still there for the next tasks/get
    assert task.ended is not None
    book.forget(task.ended + 61)
    assert book.get("t1") is None

    book.open("t2", "agent")
    book.finish("t2", result_of("the key", secret=True))
    secret = book.get("t2")
    assert secret is not None and secret.result is not None
    book.given(secret)
    assert secret.result is None and book.kept_bytes == 0


def test_task_results_past_the_byte_bound_are_forgotten_oldest_first() -> None:
    book = TaskBook(kept_s=3600, max_bytes=600)
    for n in range(4):
        book.open(f"t{n}", "agent")
        book.finish(f"t{n}", result_of("x" * 200))
    assert book.kept_bytes <= 600
    assert "t3" in book.tasks and "t0" not in book.tasks


async def test_a_task_denied_by_a_reviewer_or_expired_completes_with_keyturns_error_result(home: Home) -> None:
    base = home.serve_http()
    api = ReviewerAPI(base)

    async def task_for(statement: str) -> str:
        created = await rpc(base, "tools/call", {"name": "sql_execute", "arguments": {"statement": statement}},
                            extensions={TASKS: {}}, name="sql_execute")
        assert created["result"]["resultType"] == "task", created
        return str(created["result"]["taskId"])

    async def ended(task_id: str) -> dict[str, Any]:
        async def done() -> dict[str, Any] | None:
            got = await rpc(base, "tasks/get", {"taskId": task_id}, extensions={TASKS: {}}, name=task_id)
            return got["result"] if got["result"]["status"] != "working" else None

        return await eventually(done, within=20)  # type: ignore[no-any-return]

    denied = await task_for("UPDATE orders SET qty = 0 WHERE id = 2")
    await api.wait_pending("sql_execute")
    r = await api.vote(denied, "deny", "alice", "not today")
    assert r.status_code == 200, r.text
    task = await ended(denied)
    # Not a protocol error: the extension's `completed`, with the error result a waiting caller would have had.
    assert task["status"] == "completed" and task["result"]["isError"], task
    assert "Denied by reviewer alice: not today" in task["result"]["content"][0]["text"]

    expired = await task_for("UPDATE orders SET item = 'quick_expire' WHERE id = 3")
    task = await ended(expired)
    assert task["status"] == "completed" and task["result"]["isError"], task
    assert "expired" in task["result"]["content"][0]["text"]
    assert home.rows("SELECT qty, item FROM orders WHERE id IN (2, 3) ORDER BY id") == [(5, "pear"), (7, "plum")]
