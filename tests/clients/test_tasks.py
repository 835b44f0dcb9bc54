"""Held calls as tasks (the MCP tasks extension, protocol 2026-07-28), through the official TypeScript client:
`@modelcontextprotocol/ext-tasks` on `@modelcontextprotocol/client` 2.x (Node 22), against a real `keyturn serve
--http`. A held call returns a task; `tasks/get` says working; a reviewer approves through keyturn's API; the task
completes with the tool's result, run once. A task withdrawn with `tasks/cancel` runs nothing, whatever a reviewer
does later. Another principal cannot see or cancel the task. The probe pack's run log witnesses every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from tests.clients.conftest import CLIENTS, NODE22
from tests.conftest import ROOT, TOKENS, Home, ReviewerAPI
from tests.helpers import eventually
from tests.reliability.conftest import RelHome

SCRIPT = ROOT / "tests" / "clients" / "tasks_client.mjs"

pytestmark = pytest.mark.skipif(
    not NODE22.exists() or not (CLIENTS / "@modelcontextprotocol" / "ext-tasks").exists(),
    reason="scripts/test-deps installs Node 22 and the TypeScript clients (@modelcontextprotocol/ext-tasks)")


class TasksClient:
    """The Node script: one JSON command in, one JSON answer out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    async def ask(self, op: str, timeout: float = 30, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        with anyio.fail_after(timeout):
            line = await anyio.to_thread.run_sync(self.proc.stdout.readline)
        assert line, f"the tasks client exited: {self.proc.stderr.read() if self.proc.stderr else ''}"
        return dict(json.loads(line))


def node_tasks_client(target: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([str(NODE22), str(SCRIPT), str(CLIENTS), *target],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@asynccontextmanager
async def tasks_client(base: str, token: str | None = None, *, stdio: Home | None = None) -> AsyncIterator[TasksClient]:
    """Over streamable HTTP at `base`, or over stdio: a `keyturn serve` of `stdio`'s home that the client starts."""
    if stdio is not None:
        params = stdio.stdio_params()
        server = {"command": params.command, "args": params.args, "cwd": str(params.cwd),
                  "env": {**(params.env or {}), "PATH": os.environ.get("PATH", "")}}
        proc = node_tasks_client(["stdio", json.dumps(server)])
    else:
        proc = node_tasks_client([f"{base}/mcp", *([token] if token else [])])
    try:
        client = TasksClient(proc)
        hello = await client.ask("hello")
        assert hello["era"] == "modern" and hello["protocolVersion"] == "2026-07-28", hello
        assert "io.modelcontextprotocol/tasks" in (hello["serverTasks"] or {}), hello
        yield client
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # (closes its pipes)


def kinds(home: RelHome, request_id: str) -> list[str]:
    return [e["kind"] for e in home.ledger_events(request_id)]


def ran(home: RelHome, tag: str) -> int:
    return sum(1 for r in home.runs() if r["tag"] == tag and r["phase"] == "ran")


async def test_a_held_call_is_a_task_that_completes_with_the_result_once_a_reviewer_approves(rhome: RelHome) -> None:
    base = rhome.serve_http()
    api = ReviewerAPI(base)
    async with tasks_client(base) as client:
        created = await client.ask("call", tool="probe_run", args={"tag": "hold-task"})
        assert created["kind"] == "task", created
        task_id = created["taskId"]
        request = await api.wait_pending("probe_run")
        assert request["id"] == task_id  # the task is the request
        working = await client.ask("snapshot", taskId=task_id)
        assert working["status"] == "working", working
        assert "waiting for human approval of probe_run" in working["statusMessage"]
        assert ran(rhome, "hold-task") == 0

        r = await api.vote(task_id, "approve", "alice", "ok")
        assert r.status_code == 200, r.text
        settled = await client.ask("settle", taskId=task_id)
        assert settled["status"] == "completed", settled
        assert not settled["result"].get("isError"), settled
        assert json.loads(settled["result"]["content"][0]["text"])["tag"] == "hold-task"
        again = await client.ask("snapshot", taskId=task_id)
        assert again["status"] == "completed" and again["raw"]["result"] == settled["result"], again

        # Allowed and denied calls are answered at once, with no task.
        allowed = await client.ask("call", tool="probe_run", args={"tag": "allow-task"})
        assert allowed["kind"] == "immediate" and not allowed["result"].get("isError"), allowed
        denied = await client.ask("call", tool="probe_run", args={"tag": "deny-task"})
        assert denied["kind"] == "immediate" and denied["result"]["isError"], denied
    assert ran(rhome, "hold-task") == 1
    assert kinds(rhome, task_id) == ["call.received", "decision", "approval.requested", "vote", "approval.granted",
                                     "execution.started", "executed"]
    assert rhome.assert_one_outcome_each()[task_id] == "executed"
    rhome.verify()


async def test_a_cancelled_task_is_withdrawn_and_a_later_approval_runs_nothing(rhome: RelHome) -> None:
    base = rhome.serve_http()
    api = ReviewerAPI(base)
    async with tasks_client(base) as client:
        created = await client.ask("call", tool="probe_run", args={"tag": "hold-task-cancel"})
        assert created["kind"] == "task", created
        task_id = created["taskId"]
        await api.wait_pending("probe_run")
        assert (await client.ask("cancel", taskId=task_id)) == {"ok": True}
        await eventually(lambda: rhome.calls()[task_id] == "cancelled")
        cancelled = await client.ask("snapshot", taskId=task_id)
        assert cancelled["status"] == "cancelled", cancelled
        assert "withdrawn" in cancelled["statusMessage"]

        r = await api.vote(task_id, "approve", "alice", "too late")
        assert r.status_code != 200, r.text
    assert ran(rhome, "hold-task-cancel") == 0
    assert "vote" not in kinds(rhome, task_id) and "execution.started" not in kinds(rhome, task_id)
    assert rhome.assert_one_outcome_each()[task_id] == "cancelled"
    rhome.verify()


async def test_another_principal_can_neither_see_nor_cancel_a_task(rhome: RelHome) -> None:
    agents = [{"name": name, "token_sha256": hashlib.sha256(TOKENS[name].encode()).hexdigest()}
              for name in ("agent-bob", "agent-ci")]
    rhome.configure(agents=agents)
    base = rhome.serve_http()
    api = ReviewerAPI(base)
    async with tasks_client(base, TOKENS["agent-bob"]) as bob, tasks_client(base, TOKENS["agent-ci"]) as ci:
        created = await bob.ask("call", tool="probe_run", args={"tag": "hold-task-mine"})
        assert created["kind"] == "task", created
        task_id = created["taskId"]
        await api.wait_pending("probe_run")

        seen = await ci.ask("snapshot", taskId=task_id)
        assert seen.get("code") == -32602 and "no such task" in seen["error"], seen
        refused = await ci.ask("cancel", taskId=task_id)
        assert refused.get("code") == -32602 and "no such task" in refused["error"], refused
        assert rhome.calls()[task_id] == "pending"
        assert (await bob.ask("snapshot", taskId=task_id))["status"] == "working"

        r = await api.vote(task_id, "approve", "alice", "ok")
        assert r.status_code == 200, r.text
        settled = await bob.ask("settle", taskId=task_id)
        assert settled["status"] == "completed" and not settled["result"].get("isError"), settled
        still = await ci.ask("snapshot", taskId=task_id)
        assert still.get("code") == -32602, still
    assert ran(rhome, "hold-task-mine") == 1
    assert rhome.assert_one_outcome_each()[task_id] == "executed"
    rhome.verify()


async def test_over_stdio_a_held_call_is_a_task_and_an_approval_from_another_process_completes_it(
        rhome: RelHome) -> None:
    base = rhome.serve_http()  # the reviewer API, in another process sharing the ledger (the desktop case)
    api = ReviewerAPI(base)
    async with tasks_client(base, stdio=rhome) as client:
        created = await client.ask("call", tool="probe_run", args={"tag": "hold-task-stdio"})
        assert created["kind"] == "task", created
        task_id = created["taskId"]
        await api.wait_pending("probe_run")
        assert (await client.ask("snapshot", taskId=task_id))["status"] == "working"
        r = await api.vote(task_id, "approve", "alice", "ok")
        assert r.status_code == 200, r.text
        settled = await client.ask("settle", taskId=task_id)
        assert settled["status"] == "completed" and not settled["result"].get("isError"), settled
        assert json.loads(settled["result"]["content"][0]["text"])["tag"] == "hold-task-stdio"
    assert ran(rhome, "hold-task-stdio") == 1
    assert rhome.assert_one_outcome_each()[task_id] == "executed"
    rhome.verify()
