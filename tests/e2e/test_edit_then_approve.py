"""Edit, then approve, end to end: a real `keyturn serve --http`, the SDK's client as the agent, and reviewers who
change a held call's arguments through the HTTP API. What runs is exactly the edited call, once; the edited call
needs at least what it would need if the agent had sent it; the agent is told what changed and why."""

from __future__ import annotations

import hashlib
from typing import Any

import anyio

from server.approvals.edits import EDIT_META_KEY
from server.canonical import args_hash
from server.config import default_policy_path
from tests.conftest import TOKENS, Home, ReviewerAPI, agent_client
from tests.helpers import client_call


def text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def kinds(home: Home, call_id: str) -> list[str]:
    return [e["kind"] for e in home.ledger_events(call_id)]


def terminal(home: Home, call_id: str) -> list[str]:
    ends = {"executed", "failed", "denied", "expired", "cancelled", "abandoned"}
    return [k for k in kinds(home, call_id) if k in ends]


async def edit(api: ReviewerAPI, request_id: str, who: str, arguments: Any, reason: str | None = "narrowed",
               **extra: Any) -> Any:
    body = {"arguments": arguments, "reason": reason, **extra}
    return await api.request("POST", f"/api/requests/{request_id}/approve", who, body)


async def test_a_reviewer_narrows_a_delete_and_exactly_the_narrowed_call_runs_once(home: Home) -> None:
    base = home.serve_http()
    api = ReviewerAPI(base)
    sent = {"statement": "DELETE FROM orders"}
    narrowed = {"statement": "DELETE FROM orders WHERE item = 'pear'"}
    async with agent_client(base) as client:
        async with client_call(client, "sql_execute", sent) as call:
            req = await api.wait_pending("sql_execute")
            r = await edit(api, req["id"], "alice", narrowed, "only the pear order, not the whole table")
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "approved" and "edited" in r.json()["message"]
    result = await call.result()
    assert not result.is_error, text(result)
    assert home.rows("SELECT item FROM orders ORDER BY id") == [("apple",), ("plum",)]
    # The agent is told that a reviewer changed its call, by whom, why, and how (field by field).
    said = text(result)
    assert "alice changed the arguments" in said and "only the pear order" in said
    assert "/statement" in said and "DELETE FROM orders WHERE item = 'pear'" in said
    meta = (result.meta or {})[EDIT_META_KEY]
    assert meta["editor"] == "alice" and meta["diff"] == [
        {"path": "/statement", "change": "changed", "before": sent["statement"], "after": narrowed["statement"]}]
    # The ledger keeps both hashes, the editor and the reason; the approval and the run are for the edited call.
    events = home.ledger_events(req["id"])
    received = next(e for e in events if e["kind"] == "call.received")["payload"]
    edited = next(e for e in events if e["kind"] == "arguments.edited")["payload"]
    assert received["args_hash"] == args_hash(sent) == edited["from_args_hash"]
    assert edited["args_hash"] == args_hash(narrowed) and edited["arguments"] == narrowed
    assert edited["person"] == "alice" and edited["reason"] == "only the pear order, not the whole table"
    granted = next(e for e in events if e["kind"] == "approval.granted")["payload"]
    started = next(e for e in events if e["kind"] == "execution.started")["payload"]
    assert granted["args_hash"] == started["args_hash"] == args_hash(narrowed)
    assert kinds(home, req["id"])[-5:] == ["arguments.edited", "vote", "approval.granted", "execution.started",
                                           "executed"]
    assert terminal(home, req["id"]) == ["executed"]
    verify = await api.request("GET", "/api/audit/verify", "alice")
    assert verify.json()["ok"], verify.text
    # The edit cannot be replayed, nor the call edited again after it ran.
    again = await edit(api, req["id"], "carol", narrowed)
    assert again.status_code == 409 and again.json()["code"] == "not_pending"


async def test_an_edit_that_raises_the_bar_waits_for_the_approvers_the_edited_call_needs(home: Home) -> None:
    base = home.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        async with client_call(client, "sql_execute", {"statement": "UPDATE orders SET qty = 0 WHERE id = 1"}) as call:
            req = await api.wait_pending("sql_execute")  # needs one approval from anyone
            # Edited into a payroll change, which needs two DBAs: the editor's approval is one of them.
            r = await edit(api, req["id"], "alice", {"statement": "UPDATE payroll SET salary = 0"}, "payroll instead")
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "pending" and "needs more approvals" in r.json()["message"]
            shown = (await api.request("GET", f"/api/requests/{req['id']}", "alice")).json()["request"]
            assert shown["arguments"] == {"statement": "UPDATE payroll SET salary = 0"}
            # dave may approve the original kind of call, but he is no DBA: his vote does not reach the quorum.
            dave = await api.vote(req["id"], "approve", "dave", "fine by me")
            assert dave.status_code == 200 and dave.json()["state"] == "pending"
            assert home.rows("SELECT salary FROM payroll") == [(100,)]
            carol = await api.vote(req["id"], "approve", "carol", "second DBA")
            assert carol.status_code == 200 and carol.json()["state"] == "approved", carol.text
    result = await call.result()
    assert not result.is_error, text(result)
    assert home.rows("SELECT salary FROM payroll") == [(0,)]
    assert home.rows("SELECT qty FROM orders WHERE id = 1") == [(3,)]  # the original call never ran
    assert terminal(home, req["id"]) == ["executed"]


async def test_a_denial_after_an_edit_reaches_the_agent_as_guidance(home: Home) -> None:
    base = home.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        async with client_call(client, "sql_execute", {"statement": "UPDATE orders SET qty = 0 WHERE id = 1"}) as call:
            req = await api.wait_pending("sql_execute")
            r = await edit(api, req["id"], "alice", {"statement": "UPDATE payroll SET salary = 0"}, "payroll instead")
            assert r.json()["state"] == "pending"
            no = await api.vote(req["id"], "deny", "carol", "payroll changes go through the HR tool; file a ticket")
            assert no.status_code == 200 and no.json()["state"] == "denied"
    result = await call.result()
    assert result.is_error and "file a ticket" in text(result) and "carol" in text(result)
    assert home.rows("SELECT salary FROM payroll") == [(100,)]
    assert terminal(home, req["id"]) == ["denied"]


async def test_widening_a_delete_under_the_shipped_policy_needs_what_the_wide_delete_needs(home: Home) -> None:
    home.write_config(policy=str(default_policy_path()))
    base = home.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        async with client_call(client, "sql_execute", {"statement": "DELETE FROM orders WHERE id = 1"}) as call:
            req = await api.wait_pending("sql_execute")  # sql-write: one approval
            r = await edit(api, req["id"], "alice", {"statement": "DELETE FROM orders"}, "clear them all")
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "pending"  # sql-mass-change: two people
            assert home.rows("SELECT count(*) FROM orders") == [(3,)]
            no_reason = await api.vote(req["id"], "approve", "carol")
            assert no_reason.status_code == 400 and no_reason.json()["code"] == "reason_required"
            carol = await api.vote(req["id"], "approve", "carol", "agreed, clear them")
            assert carol.json()["state"] == "approved", carol.text
    result = await call.result()
    assert not result.is_error, text(result)
    assert home.rows("SELECT count(*) FROM orders") == [(0,)]
    edited = next(e for e in home.ledger_events(req["id"]) if e["kind"] == "arguments.edited")["payload"]
    assert [r["id"] for r in edited["decision"]["rules"]] == ["sql-write", "sql-mass-change"]
    assert any(g["quorum"] == 2 for g in edited["review"]["groups"])


async def test_reviewer_bodies_are_strict_and_bad_edits_are_refused_without_changing_the_request(home: Home) -> None:
    home.write_config(agents=[{"name": "agent-bob", "token_sha256": hashlib.sha256(
        TOKENS["agent-bob"].encode()).hexdigest(), "on_behalf_of": "bob"}])
    base = home.serve_http()
    api = ReviewerAPI(base)
    sent = {"statement": "DELETE FROM orders WHERE item = 'pear'"}
    async with agent_client(base, TOKENS["agent-bob"]) as client:
        async with client_call(client, "sql_execute", sent) as call:
            req = await api.wait_pending("sql_execute")
            path = f"/api/requests/{req['id']}"
            # A field keyturn does not know is refused, naming it, never ignored: at the top and inside a grant.
            grants = await api.request("POST", path + "/approve", "alice", {"reason": "ok", "grants": {"for": "1h"}})
            assert grants.status_code == 400 and grants.json()["fields"] == ["grants"]
            assert "grants" in grants.json()["error"]
            grant = await api.request("POST", path + "/approve", "alice",
                                      {"reason": "ok", "grant": {"for": "1h", "uses": 1, "scope": "all"}})
            assert grant.status_code == 400 and grant.json()["fields"] == ["grant.scope"]
            assert "scope" in grant.json()["error"]
            tool = await edit(api, req["id"], "alice", {"statement": "SELECT 1"}, tool="sql_query")
            assert tool.status_code == 400 and tool.json()["fields"] == ["tool"]
            deny = await api.request("POST", path + "/deny", "alice", {"reason": "no", "arguments": sent})
            assert deny.status_code == 400 and deny.json()["fields"] == ["arguments"]
            not_object = await edit(api, req["id"], "alice", ["DELETE FROM orders"])
            assert not_object.status_code == 400 and not_object.json()["code"] == "bad_request"
            # Arguments the tool's schema refuses, an edit the policy denies, a secret, no reason.
            schema = await edit(api, req["id"], "alice", {"statment": "DELETE FROM orders"})
            assert schema.status_code == 400 and schema.json()["code"] == "invalid_arguments"
            drop = await edit(api, req["id"], "alice", {"statement": "DROP TABLE orders"})
            assert drop.status_code == 403 and drop.json()["code"] == "denied_by_policy"
            assert "no-drop" in drop.json()["error"]
            secret = await edit(api, req["id"], "alice",
                                {"statement": "UPDATE orders SET item = 'AKIAIOSFODNN7EXAMPLE' WHERE id = 2"})
            assert secret.status_code == 400 and secret.json()["code"] == "masked_values"
            assert "AKIAIOSFODNN7EXAMPLE" not in secret.text
            silent = await edit(api, req["id"], "alice", {"statement": "DELETE FROM orders WHERE id = 2"}, None)
            assert silent.status_code == 400 and silent.json()["code"] == "reason_required"
            # Whom the agent acts for cannot edit (nor so approve) its own call.
            selfie = await edit(api, req["id"], "bob", {"statement": "DELETE FROM orders WHERE id = 2"})
            assert selfie.status_code == 403 and selfie.json()["code"] == "self_approval"
            shown = (await api.request("GET", path, "alice")).json()["request"]
            assert shown["state"] == "pending" and shown["arguments"] == sent and shown["votes"] == []
            # One edit; then neither its replay nor another edit.
            ok = await edit(api, req["id"], "alice", {"statement": "DELETE FROM orders WHERE id = 2"})
            assert ok.status_code == 200 and ok.json()["state"] == "approved"
    result = await call.result()
    assert not result.is_error, text(result)
    assert home.rows("SELECT item FROM orders ORDER BY id") == [("apple",), ("plum",)]
    assert not any(e["kind"] == "vote.refused" and "AKIAIOSFODNN7EXAMPLE" in str(e["payload"])
                   for e in home.ledger_events())
    refused = [e["payload"]["code"] for e in home.ledger_events(req["id"]) if e["kind"] == "vote.refused"]
    assert refused == ["invalid_arguments", "denied_by_policy", "masked_values", "reason_required", "self_approval"]
    assert kinds(home, req["id"]).count("arguments.edited") == 1


async def test_an_edit_cannot_be_replayed_nor_follow_another_edit_nor_discard_approvals(home: Home) -> None:
    base = home.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        async with client_call(client, "sql_execute", {"statement": "UPDATE orders SET qty = 0 WHERE id = 1"}) as call:
            req = await api.wait_pending("sql_execute")
            r = await edit(api, req["id"], "alice", {"statement": "UPDATE payroll SET salary = 7"}, "payroll")
            assert r.json()["state"] == "pending"
            replay = await edit(api, req["id"], "alice", {"statement": "UPDATE payroll SET salary = 7"}, "payroll")
            assert replay.status_code == 409 and replay.json()["code"] == "duplicate"
            other = await edit(api, req["id"], "carol", {"statement": "UPDATE orders SET qty = 9 WHERE id = 1"})
            assert other.status_code == 409 and other.json()["code"] == "already_edited"
            carol = await api.vote(req["id"], "approve", "carol", "ok")
            assert carol.json()["state"] == "approved"
    result = await call.result()
    assert not result.is_error
    assert home.rows("SELECT salary FROM payroll") == [(7,)]
    assert home.rows("SELECT qty FROM orders WHERE id = 1") == [(3,)]

    # A request that already has an approval for its arguments as sent is not edited (the approval would be
    # discarded): it is denied with guidance instead.
    async with agent_client(base) as client:
        async with client_call(client, "sql_execute", {"statement": "UPDATE payroll SET salary = 1"}) as call:
            req = await api.wait_pending("sql_execute")
            first = await api.vote(req["id"], "approve", "alice", "ok")
            assert first.json()["state"] == "pending"
            late = await edit(api, req["id"], "carol", {"statement": "UPDATE payroll SET salary = 2"})
            assert late.status_code == 409 and late.json()["code"] == "already_voted"
            no = await api.vote(req["id"], "deny", "carol", "set it to 2, not 1")
            assert no.json()["state"] == "denied"
    result = await call.result()
    assert result.is_error and "set it to 2, not 1" in text(result)
    assert home.rows("SELECT salary FROM payroll") == [(7,)]


async def test_the_cli_approves_with_edited_arguments_and_the_audit_shows_the_edit(home: Home) -> None:
    base = home.serve_http()
    api = ReviewerAPI(base)

    def keyturn(*args: str) -> Any:
        return home.keyturn(*args, token=TOKENS["alice"], url=base)

    async with agent_client(base) as client:
        async with client_call(client, "sql_execute", {"statement": "UPDATE orders SET qty = 0"}) as call:
            req = await api.wait_pending("sql_execute")
            bad = await anyio.to_thread.run_sync(lambda: keyturn("approve", req["id"], "--args", "[1]", "--reason", "x"))
            assert bad.returncode != 0 and "JSON object" in bad.stderr
            broken = await anyio.to_thread.run_sync(lambda: keyturn("approve", req["id"], "--args", "{", "--reason", "x"))
            assert broken.returncode != 0 and "JSON object" in broken.stderr
            schema = await anyio.to_thread.run_sync(lambda: keyturn(
                "approve", req["id"], "--args", '{"sql": "UPDATE orders SET qty = 1"}', "--reason", "x"))
            assert schema.returncode != 0 and "invalid arguments" in schema.stderr, schema.stderr
            done = await anyio.to_thread.run_sync(lambda: keyturn(
                "approve", req["id"], "--args", '{"statement": "UPDATE orders SET qty = 1 WHERE id = 3"}',
                "--reason", "only the plum order"))
            assert done.returncode == 0, done.stderr
            assert "edited" in done.stdout and "approved" in done.stdout
    result = await call.result()
    assert not result.is_error, text(result)
    assert home.rows("SELECT qty FROM orders ORDER BY id") == [(3,), (5,), (1,)]
    story = await anyio.to_thread.run_sync(lambda: home.keyturn("audit", "show", req["id"], "--config", str(home.config)))
    assert story.returncode == 0, story.stderr
    line = next(ln for ln in story.stdout.splitlines() if "arguments.edited" in ln)
    assert "by alice: only the plum order" in line
    assert args_hash({"statement": "UPDATE orders SET qty = 0"})[:12] in line
    assert args_hash({"statement": "UPDATE orders SET qty = 1 WHERE id = 3"})[:12] in line
    # The tables an edit changed (the shown arguments, the review now needed) agree with the chain.
    verify = await anyio.to_thread.run_sync(lambda: home.keyturn("audit", "verify", "--config", str(home.config)))
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def test_an_edited_call_that_fails_tells_the_agent_it_ran_as_edited(home: Home) -> None:
    base = home.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        async with client_call(client, "sql_execute", {"statement": "UPDATE orders SET qty = 0"}) as call:
            req = await api.wait_pending("sql_execute")
            r = await edit(api, req["id"], "alice", {"statement": "UPDATE order_archive SET qty = 0"}, "the archive")
            assert r.json()["state"] == "approved", r.text
    result = await call.result()
    assert result.is_error and "it ran as reviewer alice edited it: the archive" in text(result), text(result)
    assert "order_archive" in text(result)
    assert home.rows("SELECT sum(qty) FROM orders") == [(15,)]
    assert terminal(home, req["id"]) == ["failed"]
