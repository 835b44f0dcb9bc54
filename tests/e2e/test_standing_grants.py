"""Standing grants, end to end: a real `keyturn serve --http` with the shipped policy, the SDK's client as the
agent, reviewers through the HTTP API and the CLI. A grant lets calls like the approved one run without waiting,
within its bounds, and nothing else: another table, another statement kind, a call that needs more, another
agent, after its uses ran out, after revocation, after its time. Every step is chained and the chain verifies."""

from __future__ import annotations

import hashlib
from typing import Any

import anyio

from server.approvals.grants import GRANT_META_KEY
from server.config import default_policy_path
from tests.conftest import TOKENS, Home, ReviewerAPI, agent_client
from tests.helpers import client_call, eventually


def text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


AGENTS = [{"name": n, "token_sha256": hashlib.sha256(TOKENS[n].encode()).hexdigest(), **extra}
          for n, extra in (("agent-ci", {}), ("agent-bob", {"on_behalf_of": "bob"}))]


def shipped(home: Home) -> str:
    home.write_config(policy=str(default_policy_path()), agents=AGENTS)
    return home.serve_http()


async def approve(api: ReviewerAPI, request_id: str, who: str, grant: dict[str, Any] | None = None,
                  reason: str = "fine") -> Any:
    body: dict[str, Any] = {"reason": reason}
    if grant is not None:
        body["grant"] = grant
    return await api.request("POST", f"/api/requests/{request_id}/approve", who, body)


async def held_then_denied(api: ReviewerAPI, client: Any, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """The call is held for a reviewer (no grant covers it); denied so the agent gets an answer. The request."""
    async with client_call(client, tool, arguments) as call:
        req = await api.wait_pending(tool)
        assert req["arguments"] == arguments
        r = await api.vote(req["id"], "deny", "alice", "not under the grant")
        assert r.status_code == 200, r.text
    result = await call.result()
    assert result.is_error and "not under the grant" in text(result)
    return req


async def granted_from(api: ReviewerAPI, client: Any, arguments: dict[str, Any], grant: dict[str, Any],
                       who: str = "alice") -> tuple[dict[str, Any], str]:
    """A held sql_execute call approved by `who` with a grant: (the request, the grant's id)."""
    async with client_call(client, "sql_execute", arguments) as call:
        req = await api.wait_pending("sql_execute")
        r = await approve(api, req["id"], who, grant, reason="routine qty fixes for the next hour")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "approved" and "standing grant g" in r.json()["message"]
    result = await call.result()
    assert not result.is_error, text(result)
    grant_id = r.json()["message"].split("standing grant ")[1].split()[0].rstrip(";")
    return req, grant_id


async def test_a_grant_covers_calls_like_the_approved_one_within_its_bounds_and_nothing_else(home: Home) -> None:
    base = shipped(home)
    api = ReviewerAPI(base)
    async with agent_client(base, TOKENS["agent-ci"]) as client:
        req, grant_id = await granted_from(api, client, {"statement": "UPDATE orders SET qty = 1 WHERE id = 1"},
                                           {"for": "1h", "uses": 2})
        grants = (await api.request("GET", "/api/grants", "dave")).json()["grants"]
        assert [g["id"] for g in grants] == [grant_id]
        g = grants[0]
        assert (g["principal"], g["tool"], g["rules"], g["uses"], g["used"]) == (
            "agent-ci", "sql_execute", ["sql-write"], 2, 0)
        assert g["approvers"] == ["alice"] and g["request_id"] == req["id"]
        # keyturn's proposal: the same table and statement kind, and no more rows than the approved call touched
        # (measured before anyone was asked: one row).
        assert g["conditions"] == ['facts.sql.tables == ["orders"] && facts.sql.kinds == ["update"]'
                                   " && facts.sql.rows_affected <= 1"]

        # Within its bounds: runs at once, and says so (text and _meta); the ledger chains grant.used.
        first = await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 2 WHERE id = 2"})
        assert not first.is_error, text(first)
        assert f"standing grant {grant_id}" in text(first) and "approved by alice" in text(first)
        meta = (first.meta or {})[GRANT_META_KEY]
        assert (meta["grant"], meta["request_id"], meta["use"], meta["uses"]) == (grant_id, req["id"], 1, 2)
        assert home.rows("SELECT qty FROM orders WHERE id = 2") == [(2,)]

        # Outside them: more rows than the approved call touched (the same rule, table and kind), another table,
        # another statement kind, a mass change (another rule, critical): held.
        await held_then_denied(api, client, "sql_execute",
                               {"statement": "UPDATE orders SET qty = 5 WHERE id IN (1, 3)"})
        await held_then_denied(api, client, "sql_execute", {"statement": "UPDATE payroll SET salary = 1 WHERE id = 1"})
        await held_then_denied(api, client, "sql_execute", {"statement": "DELETE FROM orders WHERE id = 3"})
        await held_then_denied(api, client, "sql_execute", {"statement": "UPDATE orders SET qty = 0"})
        assert home.rows("SELECT count(*) FROM payroll WHERE salary = 1") == [(0,)]

    # Another agent, even one acting for a reviewer, is never covered by agent-ci's grant.
    async with agent_client(base, TOKENS["agent-bob"]) as bob:
        await held_then_denied(api, bob, "sql_execute", {"statement": "UPDATE orders SET qty = 9 WHERE id = 1"})

    async with agent_client(base, TOKENS["agent-ci"]) as client:
        last = await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 3 WHERE id = 3"})
        assert not last.is_error and "use 2 of 2" in text(last)
        # Its uses ran out: the next call like it waits for a reviewer again.
        await held_then_denied(api, client, "sql_execute", {"statement": "UPDATE orders SET qty = 4 WHERE id = 3"})
    assert home.rows("SELECT qty FROM orders ORDER BY id") == [(1,), (2,), (3,)]

    chained = [(e["kind"], e["payload"]) for e in home.ledger_events(grant_id)]
    assert [k for k, _ in chained] == ["grant.created", "grant.used", "grant.used", "grant.expired"]
    created = chained[0][1]
    assert created["request_id"] == req["id"] and created["approvers"] == ["alice"]
    assert created["policy_digest"] == req["policy_digest"] and created["reason"].startswith("routine")
    assert chained[3][1]["reason"] == "its uses ran out"
    # The call's own records say who approved it: the grant, its request and its approvers.
    used_call = chained[1][1]["call_id"]
    kinds = [e["kind"] for e in home.ledger_events(used_call)]
    assert kinds == ["call.received", "decision", "execution.started", "executed"]
    started = next(e for e in home.ledger_events(used_call) if e["kind"] == "execution.started")["payload"]
    assert started["grant"]["id"] == grant_id and started["grant"]["request_id"] == req["id"]
    listed = (await api.request("GET", "/api/grants?all=1", "alice")).json()["grants"]
    assert [(g["state"], g["used"], g["end_reason"]) for g in listed] == [("expired", 2, "its uses ran out")]
    verify = home.keyturn("audit", "verify", "--config", str(home.config))
    assert verify.returncode == 0 and "chain intact" in verify.stdout, verify.stdout + verify.stderr


async def test_revoked_and_expired_grants_cover_nothing_and_revoking_needs_a_reason(home: Home) -> None:
    base = shipped(home)
    api = ReviewerAPI(base)
    async with agent_client(base, TOKENS["agent-ci"]) as client:
        _, grant_id = await granted_from(api, client, {"statement": "UPDATE orders SET qty = 1 WHERE id = 1"},
                                         {"for": "1h", "uses": 5})
        ok = await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 2 WHERE id = 1"})
        assert not ok.is_error and grant_id in text(ok)

        path = f"/api/grants/{grant_id}/revoke"
        silent = await api.request("POST", path, "carol", {})
        assert silent.status_code == 400 and silent.json()["code"] == "reason_required"
        extra = await api.request("POST", path, "carol", {"reason": "x", "uses": 0})
        assert extra.status_code == 400 and extra.json()["fields"] == ["uses"]
        anonymous = await api.request("POST", path, None, {"reason": "x"})
        assert anonymous.status_code == 401
        # The CLI: `keyturn grants` lists it; `keyturn revoke` ends it.
        listed = home.keyturn("grants", token=TOKENS["carol"], url=base)
        assert listed.returncode == 0 and grant_id in listed.stdout and "1/5 used" in listed.stdout, listed.stderr
        revoked = home.keyturn("revoke", grant_id, "--reason", "the migration is done", token=TOKENS["carol"],
                               url=base)
        assert revoked.returncode == 0 and "revoked by carol" in revoked.stdout, revoked.stderr
        again = await api.request("POST", path, "carol", {"reason": "twice"})
        assert again.status_code == 409 and again.json()["code"] == "not_live"
        unknown = await api.request("POST", "/api/grants/gnope/revoke", "carol", {"reason": "x"})
        assert unknown.status_code == 404
        assert "no live grants" in home.keyturn("grants", token=TOKENS["carol"], url=base).stdout

        # A revoked grant is not used again, by the same call or any other.
        await held_then_denied(api, client, "sql_execute", {"statement": "UPDATE orders SET qty = 2 WHERE id = 1"})

        # A grant whose time passes: housekeeping ends it (grant.expired), and it covers nothing after.
        _, short = await granted_from(api, client, {"statement": "UPDATE orders SET qty = 5 WHERE id = 2"},
                                      {"for": "1s", "uses": 5})

        async def expired() -> bool:
            return any(e["kind"] == "grant.expired" for e in home.ledger_events(short))

        await eventually(expired, within=30)
        await held_then_denied(api, client, "sql_execute", {"statement": "UPDATE orders SET qty = 6 WHERE id = 2"})
    assert home.rows("SELECT qty FROM orders WHERE id = 2") == [(5,)]
    revoke_event = next(e for e in home.ledger_events(grant_id) if e["kind"] == "grant.revoked")["payload"]
    assert (revoke_event["person"], revoke_event["reason"], revoke_event["channel"]) == (
        "carol", "the migration is done", "api")
    assert next(e for e in home.ledger_events(short) if e["kind"] == "grant.expired")["payload"]["reason"] == \
        "its time passed"
    tail = home.keyturn("audit", "tail", "-n", "200", "--config", str(home.config))
    assert "grant.revoked" in tail.stdout and "the migration is done" in tail.stdout
    assert "under grant" in tail.stdout and "grant.expired" in tail.stdout
    story = home.keyturn("audit", "show", grant_id, "--config", str(home.config))
    assert story.returncode == 0, story.stderr
    assert f"grant {grant_id}: sql_execute for agent-ci" in story.stdout and "made by alice" in story.stdout
    assert "state: revoked (the migration is done)" in story.stdout and "grant.used" in story.stdout
    verify = home.keyturn("audit", "verify", "--config", str(home.config))
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def test_grants_are_refused_where_the_policy_forbids_them_and_never_broader_than_the_call(home: Home) -> None:
    base = shipped(home)
    api = ReviewerAPI(base)
    async with agent_client(base, TOKENS["agent-bob"]) as client:
        # sql-mass-change is critical (grants: false in the shipped policy): refused, and the request stays pending.
        async with client_call(client, "sql_execute", {"statement": "DELETE FROM orders"}) as call:
            req = await api.wait_pending("sql_execute")
            offered = (await api.request("GET", f"/api/requests/{req['id']}", "alice")).json()["grant"]
            assert not offered["allowed"] and "sql-mass-change" in offered["why_not"]
            refused = await approve(api, req["id"], "alice", {"for": "1h", "uses": 1})
            assert refused.status_code == 400 and refused.json()["code"] == "grants_forbidden"
            assert "sql-mass-change" in refused.json()["error"]
            shown = (await api.request("GET", f"/api/requests/{req['id']}", "alice")).json()["request"]
            assert shown["state"] == "pending" and shown["votes"] == []
            await api.vote(req["id"], "deny", "alice", "no mass deletes")
        assert (await call.result()).is_error

        async with client_call(client, "sql_execute", {"statement": "UPDATE orders SET qty = 1 WHERE id = 1"}) as call:
            req = await api.wait_pending("sql_execute")
            rid = req["id"]
            offered = (await api.request("GET", f"/api/requests/{rid}", "alice")).json()["grant"]
            assert offered["allowed"] and offered["max_for_s"] == 8 * 3600 and offered["max_uses"] == 100
            assert offered["proposed"] == ('facts.sql.tables == ["orders"] && facts.sql.kinds == ["update"]'
                                           " && facts.sql.rows_affected <= 1")
            shown = home.keyturn("show", rid, token=TOKENS["alice"], url=base)
            assert "keyturn proposes: facts.sql.tables" in shown.stdout, shown.stderr
            # Over the policy's caps: refused naming the cap, never clamped.
            long = await approve(api, rid, "alice", {"for": "9h", "uses": 1})
            assert long.status_code == 400 and "max_for" in long.json()["error"]
            many = await approve(api, rid, "alice", {"for": "1h", "uses": 101})
            assert many.status_code == 400 and "max_uses" in many.json()["error"]
            # Conditions that do not compile, read what a grant may not read, or try to escape the AND.
            for when in ("args.statement ==", "facts.sql.nope == 1", "principal == 'x'", "true) || (true",
                         "facts.sql.tables == ['payroll']"):
                bad = await approve(api, rid, "alice", {"for": "1h", "uses": 1, "when": when})
                assert bad.status_code == 400 and bad.json()["code"] == "invalid_condition", (when, bad.text)
            malformed = await approve(api, rid, "alice", {"for": "soon", "uses": 1})
            assert malformed.status_code == 400
            # A denial, or an edit, never carries a grant.
            deny = await api.request("POST", f"/api/requests/{rid}/deny", "alice",
                                     {"reason": "x", "grant": {"for": "1h", "uses": 1}})
            assert deny.status_code == 400 and deny.json()["fields"] == ["grant"]
            edit = await api.request("POST", f"/api/requests/{rid}/approve", "alice", {
                "reason": "x", "arguments": {"statement": "UPDATE orders SET qty = 1 WHERE id = 2"},
                "grant": {"for": "1h", "uses": 1}})
            assert edit.status_code == 400 and edit.json()["code"] == "bad_request"
            # The person the agent acts for cannot grant its agent anything.
            selfie = await approve(api, rid, "bob", {"for": "1h", "uses": 5})
            assert selfie.status_code == 403 and selfie.json()["code"] == "self_approval"
            assert (await api.request("GET", "/api/grants", "alice")).json()["grants"] == []
            # A condition that only says true is ANDed with keyturn's proposal: it widens nothing.
            wide = await approve(api, rid, "alice", {"for": "1h", "uses": 5, "when": "true || args.statement != ''"})
            assert wide.status_code == 200, wide.text
        assert not (await call.result()).is_error
        grant = (await api.request("GET", "/api/grants", "alice")).json()["grants"][0]
        assert grant["conditions"] == ['facts.sql.tables == ["orders"] && facts.sql.kinds == ["update"]'
                                       " && facts.sql.rows_affected <= 1", "true || args.statement != ''"]
        assert grant["on_behalf_of"] == "bob"
        await held_then_denied(api, client, "sql_execute", {"statement": "UPDATE payroll SET salary = 1 WHERE id = 1"})
        await held_then_denied(api, client, "sql_execute", {"statement": "DELETE FROM orders"})

    # A reviewer's narrowing holds: only changes of the row with id 1 are covered by this one.
    async with agent_client(base, TOKENS["agent-ci"]) as ci:
        async with client_call(ci, "sql_execute", {"statement": "UPDATE orders SET qty = 7 WHERE id = 1"}) as call:
            req = await api.wait_pending("sql_execute")
            narrow = await approve(api, req["id"], "carol", {"for": "30m", "uses": 3,
                                                             "when": "args.statement.endsWith('WHERE id = 1')"})
            assert narrow.status_code == 200, narrow.text
        assert not (await call.result()).is_error
        ok = await ci.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 8 WHERE id = 1"})
        assert not ok.is_error and GRANT_META_KEY in (ok.meta or {})
        await held_then_denied(api, ci, "sql_execute", {"statement": "UPDATE orders SET qty = 8 WHERE id = 2"})
    verify = home.keyturn("audit", "verify", "--config", str(home.config))
    assert verify.returncode == 0, verify.stdout + verify.stderr


QUORUM_POLICY = """
version: 1
default: review
review:
  timeout: 15m
  approvers: [{any: true}]
  grants: {max_for: 2h, max_uses: 10}
rules:
  - id: orders-write
    tool: sql_execute
    when: facts.sql.writes
    outcome: review
    risk: high
    review: {approvers: [{group: dba, quorum: 2}]}
  - id: reads
    tool: sql_query
    outcome: allow
"""


async def test_a_grant_needs_every_approver_of_the_quorum_and_takes_the_narrowest_terms(home: Home) -> None:
    policy = home.dir / "quorum.yaml"
    policy.write_text(QUORUM_POLICY, encoding="utf-8")
    home.write_config(policy=str(policy), agents=AGENTS)
    base = home.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base, TOKENS["agent-ci"]) as client:
        # The first approver approves this call only; the second asks for a grant: refused, the request still
        # pending; the second then approves the call alone.
        async with client_call(client, "sql_execute", {"statement": "UPDATE orders SET qty = 1 WHERE id = 1"}) as c:
            req = await api.wait_pending("sql_execute")
            assert (await approve(api, req["id"], "alice")).json()["state"] == "pending"
            late = await approve(api, req["id"], "carol", {"for": "1h", "uses": 5})
            assert late.status_code == 409 and late.json()["code"] == "grant_not_agreed"
            assert (await approve(api, req["id"], "carol")).json()["state"] == "approved"
        assert not (await c.result()).is_error
        assert (await api.request("GET", "/api/grants", "alice")).json()["grants"] == []

        # Both agree: the grant is made by the vote completing the quorum, on the narrowest terms of the two.
        async with client_call(client, "sql_execute", {"statement": "UPDATE orders SET qty = 2 WHERE id = 1"}) as c:
            req = await api.wait_pending("sql_execute")
            first = await approve(api, req["id"], "alice", {"for": "2h", "uses": 2})
            assert first.json()["state"] == "pending" and "grant" in first.json()["message"]
            assert (await api.request("GET", "/api/grants", "alice")).json()["grants"] == []
            second = await approve(api, req["id"], "carol", {"for": "1h", "uses": 9,
                                                             "when": "args.statement.contains('id = 1')"})
            assert second.json()["state"] == "approved" and "standing grant" in second.json()["message"]
        assert not (await c.result()).is_error
        grant = (await api.request("GET", "/api/grants", "alice")).json()["grants"][0]
        assert grant["uses"] == 2 and grant["approvers"] == ["alice", "carol"]
        assert abs(grant["expires"] - grant["created"] - 3600) < 1e-6
        assert grant["conditions"][1:] == ["args.statement.contains('id = 1')"]
        ran = await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 3 WHERE id = 1"})
        assert not ran.is_error and "approved by alice, carol" in text(ran)
        with anyio.fail_after(30):
            await held_then_denied(api, client, "sql_execute",
                                   {"statement": "UPDATE orders SET qty = 3 WHERE id = 2"})
