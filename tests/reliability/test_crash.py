"""`kill -9` of the keyturn process: while calls are held, while an approved call is running, and in the
middle of a burst of writes. After a restart the ledger verifies, every event recorded before the kill is
still there unchanged, held requests are `abandoned`, and nothing runs without a new approval."""

from __future__ import annotations

import os
import signal
from typing import Any

import anyio
import anyio.abc

from tests.conftest import ReviewerAPI, agent_client
from tests.helpers import eventually, outcome_of
from tests.reliability.conftest import RelHome, text


async def calls_in_flight(base: str, calls: list[tuple[str, dict[str, Any]]], tg: anyio.abc.TaskGroup,
                          results: dict[str, Any]) -> None:
    """Start each call in its own client session; a result (or the exception the kill causes) lands in `results`."""

    async def one(tool: str, args: dict[str, Any]) -> None:
        try:
            async with agent_client(base) as client:
                results[args["tag"]] = await client.call_tool(tool, args)
        except Exception as e:  # the server was killed under this call
            results[args["tag"]] = e

    for tool, args in calls:
        tg.start_soon(one, tool, args)


def assert_prefix_kept(before: list[tuple[int, str, str]], after: list[tuple[int, str, str]]) -> None:
    assert after[: len(before)] == before, "events recorded before the kill changed or disappeared"


async def test_kill_9_while_calls_are_held_abandons_them_and_nothing_runs_without_a_new_approval(rhome: RelHome) -> None:
    base = rhome.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        done = await client.call_tool("probe_run", {"tag": "allow-before"})
        denied = await client.call_tool("probe_run", {"tag": "deny-before"})
    assert not done.is_error and denied.is_error
    held = [("probe_run", {"tag": "hold-a"}), ("probe_run", {"tag": "two-b"}), ("probe_block", {"tag": "hold-c"})]
    results: dict[str, Any] = {}
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            await calls_in_flight(base, held, tg, results)
            await eventually(lambda: len([s for s in rhome.calls().values() if s == "pending"]) == 3)
            # One vote is in (a quorum of two is not): it must survive the crash, and not count afterwards.
            two = next(r for r in await api.pending() if r["arguments"]["tag"] == "two-b")
            vote = await api.vote(two["id"], "approve", "alice", "one of two")
            assert vote.status_code == 200 and vote.json()["state"] == "pending"
            before = rhome.event_snapshot()
            rhome.kill9(rhome.procs[0])
            await eventually(lambda: len(results) == 3)
            tg.cancel_scope.cancel()
    assert all(isinstance(r, Exception) or r.is_error for r in results.values()), results

    base = rhome.serve_http()
    api = ReviewerAPI(base)
    assert_prefix_kept(before, rhome.event_snapshot())
    assert await api.pending() == []
    held_ids = [c for c, s in rhome.calls().items() if s == "abandoned"]
    assert len(held_ids) == 3
    for request_id in held_ids:
        late = await api.vote(request_id, "approve", "alice", "approving after the crash")
        assert late.status_code == 409 and late.json()["code"] == "not_pending"
        abandoned = [e for e in rhome.ledger_events(request_id) if e["kind"] == "abandoned"]
        assert abandoned[0]["payload"]["stage"] == "pending"
    assert two["id"] in held_ids
    assert [e["payload"]["person"] for e in rhome.ledger_events(two["id"]) if e["kind"] == "vote"] == ["alice"]
    # The agent comes back with the same call: a new request, which runs only once a human approves it.
    results.clear()
    with anyio.fail_after(60):
        async with agent_client(base) as client:
            async with anyio.create_task_group() as tg:
                async def again() -> None:
                    results["again"] = await client.call_tool("probe_run", {"tag": "hold-a"})

                tg.start_soon(again)
                req = await api.wait_pending("probe_run")
                assert req["id"] not in held_ids
                assert [r["tag"] for r in rhome.runs()] == ["allow-before"]  # nothing ran on its own
                assert (await api.vote(req["id"], "approve", "carol", "fresh approval")).status_code == 200
    assert not results["again"].is_error, text(results["again"])
    assert [r["tag"] for r in rhome.runs()] == ["allow-before", "hold-a"]
    rhome.stop_all()
    rhome.verify()
    outcomes = rhome.assert_one_outcome_each()
    assert sorted(outcomes.values()) == ["abandoned", "abandoned", "abandoned", "denied", "executed", "executed"]


async def test_kill_9_while_an_approved_call_runs_records_an_unknown_outcome_and_never_reruns_it(
        rhome: RelHome) -> None:
    base = rhome.serve_http()
    api = ReviewerAPI(base)
    results: dict[str, Any] = {}
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            await calls_in_flight(base, [("probe_block", {"tag": "hold-long"})], tg, results)
            req = await api.wait_pending("probe_block")
            assert (await api.vote(req["id"], "approve", "alice", "go")).status_code == 200
            await eventually(lambda: [r["phase"] for r in rhome.runs()] == ["started"])
            assert rhome.calls()[req["id"]] == "running"
            before = rhome.event_snapshot()
            rhome.kill9(rhome.procs[0])
            await eventually(lambda: "hold-long" in results)
            tg.cancel_scope.cancel()

    base = rhome.serve_http()
    api = ReviewerAPI(base)
    assert_prefix_kept(before, rhome.event_snapshot())
    events = rhome.ledger_events(req["id"])
    kinds = [e["kind"] for e in events]
    assert kinds[-3:] == ["approval.granted", "execution.started", "abandoned"]
    assert events[-1]["payload"]["stage"] == "running"
    assert "outcome is unknown" in events[-1]["payload"]["reason"]
    # The same call again: the consumed approval does not carry over; it waits for a human, then is denied.
    rhome.open_gate("hold-long")  # were it to run, it would finish at once
    with anyio.fail_after(60):
        async with agent_client(base) as client:
            async with anyio.create_task_group() as tg:
                async def again() -> None:
                    results["again"] = await client.call_tool("probe_block", {"tag": "hold-long"})

                tg.start_soon(again)
                fresh = await api.wait_pending("probe_block")
                assert fresh["id"] != req["id"]
                r = await api.vote(fresh["id"], "deny", "carol", "it may already have run once")
                assert r.status_code == 200
    assert results["again"].is_error and "it may already have run once" in text(results["again"])
    assert [r["phase"] for r in rhome.runs()] == ["started"]  # the killed run, and nothing since
    rhome.stop_all()
    rhome.verify()
    assert sorted(rhome.assert_one_outcome_each().values()) == ["abandoned", "denied"]


async def test_kill_9_in_a_burst_of_calls_leaves_a_verifiable_ledger_with_one_outcome_per_call(rhome: RelHome) -> None:
    base = rhome.serve_http()
    api = ReviewerAPI(base)
    calls = [("probe_run", {"tag": f"{kind}-{i}"}) for i in range(12) for kind in ("allow", "deny", "hold")]
    results: dict[str, Any] = {}

    async def reviewer() -> None:
        while True:  # approve every held call as it appears, until the server dies under us
            try:
                for req in await api.pending():
                    await api.vote(req["id"], "approve", "alice", "burst")
            except Exception:
                return
            await anyio.sleep(0.02)

    with anyio.fail_after(90):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reviewer)
            await calls_in_flight(base, calls, tg, results)
            await eventually(lambda: len(rhome.runs()) >= 8, every=0.01)  # mid-burst
            rhome.kill9(rhome.procs[0])
            await eventually(lambda: len(results) == len(calls))
            tg.cancel_scope.cancel()

    rhome.serve_http()
    rhome.stop_all()
    rhome.verify()
    outcomes = rhome.assert_one_outcome_each()
    assert "abandoned" in outcomes.values()  # the kill caught calls in flight
    ran = {r["tag"] for r in rhome.runs()}
    assert len(ran) == len(rhome.runs())  # nothing ran twice
    by_tag = {}
    for e in rhome.ledger_events():
        if e["kind"] == "call.received":
            by_tag[e["payload"]["arguments"]["tag"]] = e["call_id"]
    for tag in ran:
        assert not tag.startswith("deny"), tag
        assert outcomes[by_tag[tag]] in ("executed", "abandoned"), (tag, outcomes[by_tag[tag]])
    for tag, call_id in by_tag.items():
        if outcomes[call_id] == "executed":
            assert tag in ran, f"{tag} is recorded as executed but never ran"
        if tag.startswith("hold") and tag in ran:
            kinds = [e["kind"] for e in rhome.ledger_events(call_id)]
            assert "approval.granted" in kinds and kinds.count("execution.started") == 1
    # Every call the agents saw end normally is in the ledger with that outcome.
    for tag, result in results.items():
        if not isinstance(result, Exception) and "request_id" not in outcome_of(result) and not result.is_error:
            assert outcomes[by_tag[tag]] == "executed"


async def test_a_held_call_whose_process_is_killed_is_abandoned_by_the_process_still_serving_reviewers(
        rhome: RelHome) -> None:
    """The desktop case: an agent's stdio keyturn holds the call, another keyturn serves the reviewer API. When the
    holder dies, the survivor must not keep offering a request nobody waits for: it is abandoned, and refused."""
    import sqlite3

    from mcp import Client

    base = rhome.serve_http()
    api = ReviewerAPI(base)
    http_pid = rhome.procs[0].pid
    with anyio.fail_after(90):
        try:
            async with Client(rhome.stdio_params()) as client:
                async with anyio.create_task_group() as tg:
                    async def agent() -> None:
                        await client.call_tool("probe_run", {"tag": "hold-orphan"})

                    tg.start_soon(agent)
                    req = await api.wait_pending("probe_run")
                    with sqlite3.connect(rhome.db) as conn:
                        pids = [pid for (pid,) in conn.execute("SELECT pid FROM instances") if pid != http_pid]
                    assert len(pids) == 1
                    before = rhome.event_snapshot()
                    os.kill(pids[0], signal.SIGKILL)
                    tg.cancel_scope.cancel()
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, ExceptionGroup):
            pass  # the stdio pipe broke under the client: that is the point
        # The survivor notices within a few housekeeping rounds, without a restart.
        await eventually(lambda: rhome.calls()[req["id"]] == "abandoned", within=30)
    assert_prefix_kept(before, rhome.event_snapshot())
    late = await api.vote(req["id"], "approve", "alice", "nobody is waiting for this")
    assert late.status_code == 409 and late.json()["code"] == "not_pending"
    assert await api.pending() == []
    assert rhome.runs() == []
    rhome.stop_all()
    rhome.verify()
    assert list(rhome.assert_one_outcome_each().values()) == ["abandoned"]
