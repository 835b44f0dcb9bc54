"""The spine end to end over streamable HTTP: a real `keyturn serve --http` subprocess, the SDK's client,
and reviewers deciding through the HTTP API from another task."""

from __future__ import annotations

import sqlite3

import anyio
import pytest

from tests.conftest import TOKENS, Home, ReviewerAPI, agent_client
from tests.helpers import client_call, outcome_of


def text(result) -> str:  # type: ignore[no-untyped-def]
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def terminal_events(home: Home, call_id: str) -> list[str]:
    terminal = {"executed", "failed", "denied", "expired", "cancelled", "abandoned"}
    return [e["kind"] for e in home.ledger_events(call_id) if e["kind"] in terminal]


async def test_allowed_call_runs_at_once_and_is_recorded(home: Home) -> None:
    base = home.serve_http()
    async with agent_client(base) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert {"sql_query", "sql_execute", "sql_export", "keyturn_status"} <= tools
        result = await client.call_tool("sql_query", {"query": "SELECT item, qty FROM orders ORDER BY id"})
    assert not result.is_error, text(result)
    assert "apple" in text(result)
    calls = [e for e in home.ledger_events() if e["kind"] == "call.received"]
    assert calls[-1]["payload"]["principal"] == "local"
    assert terminal_events(home, calls[-1]["call_id"]) == ["executed"]


async def test_denied_call_says_which_rule_and_why_and_does_nothing(home: Home) -> None:
    base = home.serve_http()
    async with agent_client(base) as client:
        result = await client.call_tool("sql_execute", {"statement": "DROP TABLE orders"})
    assert result.is_error
    assert "no-drop" in text(result) and "dropping tables is never allowed" in text(result)
    assert home.rows("SELECT count(*) FROM orders") == [(3,)]
    denied = [e for e in home.ledger_events() if e["kind"] == "denied"]
    assert denied[-1]["payload"]["by"] == "policy"


async def test_held_call_is_approved_through_the_api_and_runs_exactly_the_approved_arguments(home: Home) -> None:
    base = home.serve_http()
    api = ReviewerAPI(base)
    progress: list[str] = []

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    async with agent_client(base) as client:
        async with client_call(client, "sql_execute", {"statement": "DELETE FROM orders WHERE item = 'pear'"},
                               progress_callback=on_progress) as call:
            req = await api.wait_pending("sql_execute")
            assert req["arguments"] == {"statement": "DELETE FROM orders WHERE item = 'pear'"}
            assert home.rows("SELECT count(*) FROM orders") == [(3,)]  # held: nothing ran yet
            await call.progressed()
            r = await api.vote(req["id"], "approve", "alice", "checked with the team")
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "approved"
    result = await call.result()
    assert not result.is_error, text(result)
    assert home.rows("SELECT item FROM orders ORDER BY id") == [("apple",), ("plum",)]
    assert req["id"] in progress[0] and "waiting for human approval" in progress[0]
    kinds = [e["kind"] for e in home.ledger_events(req["id"])]
    assert kinds[:3] == ["call.received", "decision", "approval.requested"]
    assert kinds[-3:] == ["approval.granted", "execution.started", "executed"]
    assert terminal_events(home, req["id"]) == ["executed"]
    vote = next(e for e in home.ledger_events(req["id"]) if e["kind"] == "vote")
    assert vote["payload"]["person"] == "alice" and vote["payload"]["reason"] == "checked with the team"
    # The approval was consumed: approving again is refused.
    again = await api.vote(req["id"], "approve", "carol", "late")
    assert again.status_code == 409


async def test_held_call_denied_with_a_reason_that_reaches_the_agent(home: Home) -> None:
    base = home.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        async with client_call(client, "sql_execute", {"statement": "UPDATE orders SET qty = 0"}) as call:
            req = await api.wait_pending("sql_execute")
            bad = await api.vote(req["id"], "deny", "alice")  # a denial needs a reason
            assert bad.status_code == 400
            r = await api.vote(req["id"], "deny", "alice", "not during the sale")
            assert r.status_code == 200 and r.json()["state"] == "denied"
    result = await call.result()
    assert result.is_error and "not during the sale" in text(result) and "alice" in text(result)
    assert home.rows("SELECT sum(qty) FROM orders") == [(15,)]
    assert terminal_events(home, req["id"]) == ["denied"]


async def test_held_call_expires_and_is_recorded_as_expired_not_denied(home: Home) -> None:
    base = home.serve_http()
    async with agent_client(base) as client:
        with anyio.fail_after(30):
            result = await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 1 -- quick_expire"})
    assert result.is_error and "expired" in text(result)
    assert home.rows("SELECT sum(qty) FROM orders") == [(15,)]
    call_id = outcome_of(result)["request_id"]
    assert terminal_events(home, call_id) == ["expired"]
    assert not any(e["kind"] == "vote" for e in home.ledger_events(call_id))


async def test_requester_cannot_approve_its_own_call_and_ineligible_reviewers_are_refused(home: Home) -> None:
    home.write_config(agents=[{"name": "agent-bob", "token_sha256": __import__("hashlib").sha256(
        TOKENS["agent-bob"].encode()).hexdigest(), "on_behalf_of": "bob"}])
    base = home.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base, TOKENS["agent-bob"]) as client:
        async with client_call(client, "sql_execute", {"statement": "UPDATE payroll SET salary = 1"}) as call:
            req = await api.wait_pending("sql_execute")
            assert req["principal"] == "agent-bob" and req["on_behalf_of"] == "bob"
            selfie = await api.vote(req["id"], "approve", "bob", "looks fine to me")
            assert selfie.status_code == 403 and selfie.json()["code"] == "self_approval"
            outsider = await api.vote(req["id"], "approve", "dave", "sure")
            assert outsider.status_code == 403 and outsider.json()["code"] == "not_eligible"
            first = await api.vote(req["id"], "approve", "alice", "ok")
            assert first.json()["state"] == "pending"  # needs two DBAs
            twice = await api.vote(req["id"], "approve", "alice", "ok again")
            assert twice.status_code == 409 and twice.json()["code"] == "duplicate"
            second = await api.vote(req["id"], "approve", "carol", "ok")
            assert second.json()["state"] == "approved"
    result = await call.result()
    assert not result.is_error
    assert home.rows("SELECT salary FROM payroll") == [(1,)]
    refused = [e["payload"]["code"] for e in home.ledger_events(req["id"]) if e["kind"] == "vote.refused"]
    assert refused == ["self_approval", "not_eligible", "duplicate"]


async def test_bad_tokens_unknown_tools_and_unknown_requests_get_clear_errors(home: Home) -> None:
    home.write_config(agents=[{"name": "agent-ci", "token_sha256": __import__("hashlib").sha256(
        TOKENS["agent-ci"].encode()).hexdigest()}])
    base = home.serve_http()
    api = ReviewerAPI(base)
    assert (await api.request("GET", "/api/requests", None)).status_code == 401
    r = await api.request("GET", "/api/requests", None)
    assert "traceback" not in r.text.lower()
    # an agent token is not a reviewer token
    async with __import__("httpx2").AsyncClient() as http:
        r = await http.get(base + "/api/requests", headers={"Authorization": f"Bearer {TOKENS['agent-ci']}"})
        assert r.status_code == 401
        r = await http.post(base + "/mcp", json={}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await http.get(base + "/api/requests", headers={"Host": "evil.example", "Authorization":
                                                            f"Bearer {TOKENS['alice']}"})
        assert r.status_code == 421  # DNS-rebinding protection on the reviewer API too
    assert (await api.vote("nope", "approve", "alice", "x")).status_code == 404
    assert (await api.request("POST", "/api/requests/nope/approve", "alice", body=[1, 2])).status_code in (400, 404)
    async with agent_client(base, TOKENS["agent-ci"]) as client:
        with pytest.raises(Exception, match="unknown tool"):
            await client.call_tool("no_such_tool", {})
        bad = await client.call_tool("sql_query", {"query": 42})
        assert bad.is_error and "invalid arguments" in text(bad)
        status = await client.call_tool("keyturn_status", {"request_id": "nope"})
        assert status.is_error


def test_audit_verify_passes_then_names_the_altered_event(home: Home) -> None:
    import asyncio

    base = home.serve_http()

    async def some_calls() -> None:
        async with agent_client(base) as client:
            await client.call_tool("sql_query", {"query": "SELECT 1"})
            await client.call_tool("sql_execute", {"statement": "DROP TABLE orders"})

    asyncio.run(some_calls())
    home.stop_all()
    ok = home.keyturn("audit", "verify", "--config", str(home.config))
    assert ok.returncode == 0, ok.stderr
    assert "chain intact" in ok.stdout
    tail = home.keyturn("audit", "tail", "--config", str(home.config))
    assert "call.received" in tail.stdout and "denied" in tail.stdout
    with sqlite3.connect(home.db) as conn:
        seq = conn.execute("SELECT seq FROM events WHERE kind = 'denied'").fetchone()[0]
        conn.execute("UPDATE events SET payload = replace(payload, 'policy', 'reviewer') WHERE seq = ?", (seq,))
    broken = home.keyturn("audit", "verify", "--config", str(home.config))
    assert broken.returncode == 1
    assert f"event {seq}" in broken.stdout
    with sqlite3.connect(home.db) as conn:
        conn.execute("UPDATE events SET payload = replace(payload, 'reviewer', 'policy') WHERE seq = ?", (seq,))
        conn.execute("DELETE FROM events WHERE seq = 2")
    deleted = home.keyturn("audit", "verify", "--config", str(home.config))
    assert deleted.returncode == 1 and "event 2" in deleted.stdout
