"""What the TypeScript SDK 1.x client (`@modelcontextprotocol/sdk`, the one most agents embed) does with a held call,
measured against a real `keyturn serve --http` (the numbers in docs/clients.md come from these stories).

Its request timeout ends the call with `-32001 Request timed out`, a `notifications/cancelled` and the request's
stream closed: keyturn records `client.left` and keeps the request open. With progress and `resetTimeoutOnProgress`,
keyturn's progress keeps the call alive past that timeout until the approval; `maxTotalTimeout` still bounds it."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import anyio
import pytest

from tests.clients.conftest import CLIENTS, NODE22
from tests.conftest import ROOT, ReviewerAPI
from tests.helpers import eventually
from tests.reliability.conftest import RelHome

SCRIPT = ROOT / "tests" / "clients" / "sdk1_held.mjs"

pytestmark = pytest.mark.skipif(
    not NODE22.exists() or not (CLIENTS / "@modelcontextprotocol" / "sdk").exists(),
    reason="scripts/test-deps installs Node 22 and the TypeScript SDK 1.x (@modelcontextprotocol/sdk)")


def sdk1_call(base: str, tag: str, options: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen([str(NODE22), str(SCRIPT), str(CLIENTS), f"{base}/mcp", "probe_run",
                             json.dumps({"tag": tag}), json.dumps(options)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def ended(proc: subprocess.Popen[str], within: float = 60) -> dict[str, Any]:
    await eventually(lambda: proc.poll() is not None, within=within, every=0.1)
    out, err = proc.communicate()
    assert out.strip(), err
    return dict(json.loads(out.strip().splitlines()[-1]))


def kinds(home: RelHome, request_id: str) -> list[str]:
    return [e["kind"] for e in home.ledger_events(request_id)]


async def test_the_request_timeout_ends_a_held_call_with_a_cancel_and_the_request_stays_open(rhome: RelHome) -> None:
    base = rhome.serve_http()
    api = ReviewerAPI(base)
    proc = sdk1_call(base, "hold-sdk1-timeout", {"timeout": 2000})
    request = await api.wait_pending("probe_run")
    out = await ended(proc)
    assert out["ended"] == "error" and out["code"] == -32001 and "timed out" in out["message"], out
    assert 2000 <= out["elapsedMs"] < 10_000, out
    await eventually(lambda: "client.left" in kinds(rhome, request["id"]))
    left = next(e for e in rhome.ledger_events(request["id"]) if e["kind"] == "client.left")
    # It sends notifications/cancelled and drops the request's stream: whichever keyturn sees first is recorded.
    assert left["payload"]["reason"] in ("the caller cancelled its request", "the caller's connection closed")
    assert rhome.calls()[request["id"]] == "pending"


async def test_progress_with_reset_keeps_a_held_call_alive_past_the_timeout_until_the_approval(rhome: RelHome) -> None:
    base = rhome.serve_http()  # progress every 0.5 s (the test configuration)
    api = ReviewerAPI(base)
    proc = sdk1_call(base, "hold-sdk1-reset", {"timeout": 2000, "resetTimeoutOnProgress": True, "progress": True})
    request = await api.wait_pending("probe_run")
    await anyio.sleep(5)  # well past its 2 s timeout
    assert proc.poll() is None
    r = await api.vote(request["id"], "approve", "alice", "ok")
    assert r.status_code == 200, r.text
    out = await ended(proc)
    assert out["ended"] == "result" and not out["result"].get("isError"), out
    assert out["elapsedMs"] > 5000 and any("waiting for human approval" in m for m in out["progress"]), out
    assert rhome.assert_one_outcome_each()[request["id"]] == "executed"


async def test_max_total_timeout_bounds_a_held_call_even_with_progress(rhome: RelHome) -> None:
    base = rhome.serve_http()
    api = ReviewerAPI(base)
    proc = sdk1_call(base, "hold-sdk1-total", {"timeout": 2000, "resetTimeoutOnProgress": True,
                                               "maxTotalTimeout": 4000, "progress": True})
    request = await api.wait_pending("probe_run")
    out = await ended(proc)
    assert out["ended"] == "error" and out["code"] == -32001 and "Maximum total timeout" in out["message"], out
    assert 4000 <= out["elapsedMs"] < 12_000, out
    await eventually(lambda: "client.left" in kinds(rhome, request["id"]))
    assert rhome.calls()[request["id"]] == "pending"
