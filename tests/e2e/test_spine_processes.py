"""Processes and time: stdio agents deciding through another process's API, restarts, clients that give up,
the reviewer CLI, and start-up refusals."""

from __future__ import annotations

import os
import signal
import sys

import anyio
from mcp import Client

from tests.conftest import TOKENS, Home, ReviewerAPI, agent_client, free_port
from tests.helpers import client_call


def text(result) -> str:  # type: ignore[no-untyped-def]
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


async def test_stdio_agent_held_call_decided_through_another_process_within_a_second(home: Home) -> None:
    base = home.serve_http()  # the reviewer API process, sharing the same database
    api = ReviewerAPI(base)
    async with Client(home.stdio_params()) as client:
        ok = await client.call_tool("sql_query", {"query": "SELECT count(*) AS n FROM orders"})
        assert not ok.is_error and "3" in text(ok)

        async with client_call(client, "sql_execute", {"statement": "DELETE FROM orders WHERE id = 1"}) as call:
            req = await api.wait_pending("sql_execute")
            r = await api.vote(req["id"], "approve", "alice", "fine")
            assert r.status_code == 200
            # polled from the store within a second (+ slack for a busy CI box)
            result = await call.result(timeout=1.5)
    assert not result.is_error, text(result)
    assert home.rows("SELECT count(*) FROM orders") == [(2,)]
    kinds = [e["kind"] for e in home.ledger_events(req["id"])]
    assert kinds.count("execution.started") == 1 and kinds[-1] == "executed"


async def test_a_client_that_gives_up_comes_back_and_the_approved_call_runs_exactly_once(home: Home) -> None:
    base = home.serve_http()
    api = ReviewerAPI(base)
    statement = {"statement": "INSERT INTO orders(item, qty) VALUES ('fig', 1)"}
    async with agent_client(base) as client:
        with anyio.move_on_after(1.5):
            await client.call_tool("sql_execute", statement)
        req = await api.wait_pending("sql_execute")

        async def repeat() -> None:
            with anyio.move_on_after(1.0):
                await client.call_tool("sql_execute", statement)

        await repeat()  # still pending: the repeat waits on the same request
        assert len(await api.pending()) == 1
        assert (await api.vote(req["id"], "approve", "alice", "ok")).status_code == 200
        status = await client.call_tool("keyturn_status", {"request_id": req["id"]})
        assert status.structured_content["state"] == "approved"
        assert home.rows("SELECT count(*) FROM orders WHERE item = 'fig'") == [(0,)]  # nobody was waiting
        again = await client.call_tool("sql_execute", statement)
        assert not again.is_error, text(again)
        assert home.rows("SELECT count(*) FROM orders WHERE item = 'fig'") == [(1,)]
        # the approval was consumed: the same call again, before the request expires, gets that run's result
        with anyio.fail_after(10):
            once_more = await client.call_tool("sql_execute", statement)
        assert once_more == again
    assert home.rows("SELECT count(*) FROM orders WHERE item = 'fig'") == [(1,)]
    assert await api.pending() == []
    kinds = [e["kind"] for e in home.ledger_events(req["id"])]
    assert kinds.count("call.rejoined") == 3 and kinds.count("executed") == 1
    assert kinds[-1] == "result.delivered"


async def test_held_requests_are_abandoned_when_the_process_dies_and_never_run(home: Home) -> None:
    base = home.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        with anyio.move_on_after(1.0):
            await client.call_tool("sql_execute", {"statement": "DELETE FROM orders"})
    req = await api.wait_pending("sql_execute")
    proc = home.procs[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    base = home.serve_http()
    api = ReviewerAPI(base)
    assert await api.pending() == []
    r = await api.vote(req["id"], "approve", "alice", "too late")
    assert r.status_code == 409
    assert home.rows("SELECT count(*) FROM orders") == [(3,)]
    kinds = [e["kind"] for e in home.ledger_events(req["id"])]
    assert kinds[-2:] == ["abandoned", "vote.refused"]
    assert not {"executed", "failed", "expired", "denied"} & set(kinds)
    home.stop_all()
    verify = home.keyturn("audit", "verify", "--config", str(home.config))
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def test_reviewer_cli_lists_shows_and_approves(home: Home) -> None:
    base = home.serve_http()
    async with agent_client(base) as client:
        async with client_call(client, "sql_execute", {"statement": "UPDATE orders SET qty = 9 WHERE id = 3"}) as call:
            req = await ReviewerAPI(base).wait_pending("sql_execute")
            pending = await anyio.to_thread.run_sync(lambda: home.keyturn("pending", token=TOKENS["carol"], url=base))
            assert req["id"] in pending.stdout and "writes need a human" in pending.stdout
            shown = await anyio.to_thread.run_sync(lambda: home.keyturn("show", req["id"], token=TOKENS["carol"], url=base))
            assert "approval.requested" in shown.stdout
            approved = await anyio.to_thread.run_sync(lambda: home.keyturn(
                "approve", req["id"], "--reason", "ticket OPS-12", token=TOKENS["carol"], url=base))
            assert approved.returncode == 0, approved.stderr
    result = await call.result()
    assert not result.is_error
    home.stop_all()
    story = home.keyturn("audit", "show", req["id"], "--config", str(home.config))
    assert "approve by carol" in story.stdout and "ticket OPS-12" in story.stdout and "executed" in story.stdout
    bad = home.keyturn("approve", req["id"], "--reason", "x", token="not-a-token", url=base)
    assert bad.returncode == 2 and "keyturn:" in bad.stderr


def test_refuses_a_public_address_without_agent_tokens_and_reports_bad_config(home: Home) -> None:
    out = home.keyturn("serve", "--http", f"0.0.0.0:{free_port()}", "--config", str(home.config), timeout=30)
    assert out.returncode == 2 and "refusing to listen on 0.0.0.0" in out.stderr
    home.config.write_text("people: [1, 2\n")
    out = home.keyturn("serve", "--config", str(home.config), timeout=30)
    assert out.returncode == 2 and "not valid YAML" in out.stderr
    home.config.write_text("reviewers: [{identity: 'api:x', person: nobody}]\nsurprise: 1\n")
    out = home.keyturn("serve", "--config", str(home.config), timeout=30)
    assert out.returncode == 2 and "surprise" in out.stderr and "Traceback" not in out.stderr
    bad_policy = home.dir / "bad.yaml"
    bad_policy.write_text("version: 1\nrules:\n  - id: x\n    tool: '*'\n    outcome: allow\n    when: 'args.('\n")
    home.write_config(policy=str(bad_policy))
    out = home.keyturn("serve", "--config", str(home.config), timeout=30)
    assert out.returncode == 2 and "bad.yaml" in out.stderr and "Traceback" not in out.stderr
    assert sys.executable
