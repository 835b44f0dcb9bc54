"""The Teams bot end to end: a real `keyturn serve --http`, the SDK's MCP client holding a call, the fake Bot
Connector receiving the card, and reviewers clicking Approve / Deny as signed `adaptiveCard/action` invokes."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import anyio
import yaml
from mcp import Client

from tests.channels.teams.conftest import APP_PASSWORD, LINK_SECRET, OIDS, TENANT, TeamsHome, card_text, new_key, request_id_of
from tests.conftest import TOKENS, ReviewerAPI, agent_client
from tests.helpers import client_call, eventually

TERMINAL = {"executed", "failed", "denied", "expired", "cancelled", "abandoned"}


def text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def kinds(th: TeamsHome, request_id: str) -> list[str]:
    return [e["kind"] for e in th.home.ledger_events(request_id)]


def terminal(th: TeamsHome, request_id: str) -> list[str]:
    return [k for k in kinds(th, request_id) if k in TERMINAL]


def votes(th: TeamsHome, request_id: str) -> list[dict[str, Any]]:
    return [e["payload"] for e in th.home.ledger_events(request_id) if e["kind"] in ("vote", "vote.refused")]


def agent_bob() -> dict[str, Any]:
    return {"name": "agent-bob", "token_sha256": hashlib.sha256(TOKENS["agent-bob"].encode()).hexdigest(),
            "on_behalf_of": "bob"}


async def test_approve_in_teams_runs_the_call_and_the_card_follows_the_request(teams_home: TeamsHome) -> None:
    th = teams_home
    base = th.serve()
    results = []
    async with agent_client(base) as client:
        async def agent() -> None:
            statement = "DELETE FROM orders WHERE item = 'pear'"
            results.append(await client.call_tool("sql_execute", {"statement": statement}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            card = await th.wait_card("sql_execute")
            request_id = request_id_of(card)
            shown = card_text(card)
            assert "DELETE FROM orders WHERE item = 'pear'" in shown and "writes-reviewed" in shown
            assert th.home.rows("SELECT count(*) FROM orders") == [(3,)]  # held: nothing ran yet
            r = await th.post(th.invoke(request_id, "approve", "alice", "checked with the team"))
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["statusCode"] == 200 and body["type"] == "application/vnd.microsoft.card.adaptive"
            redrawn = card_text(body["value"])
            assert "Approved by alice" in redrawn and "You approved" in redrawn
            # No Approve once approved; while it has not run, only the Deny that takes an approval back.
            assert [a["verb"] for a in body["value"].get("actions", [])] in ([], ["keyturn.deny"])
    assert not results[0].is_error, text(results[0])
    assert th.home.rows("SELECT item FROM orders ORDER BY id") == [("apple",), ("plum",)]
    assert terminal(th, request_id) == ["executed"]
    (vote,) = votes(th, request_id)
    assert vote["reviewer"] == f"teams:{TENANT}/{OIDS['alice']}" and vote["person"] == "alice"
    assert vote["channel"] == "teams" and vote["reason"] == "checked with the team"
    notified = [e["payload"] for e in th.home.ledger_events(request_id) if e["kind"] == "notified"]
    activity_id = th.fake.sent[0]["id"]
    assert {"channel": "teams", "conversation_id": th.fake.sent[0]["conversation_id"],
            "activity_id": activity_id} in notified
    final = await th.wait_update(activity_id, "executed")
    assert "Approved by alice" in card_text(final)


async def test_deny_with_a_reason_reaches_the_agent_and_the_ledger(teams_home: TeamsHome) -> None:
    th = teams_home
    base = th.serve()
    results = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 0"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            request_id = request_id_of(await th.wait_card("sql_execute"))
            no_reason = await th.post(th.invoke(request_id, "deny", "alice", "   "))
            assert no_reason.status_code == 200
            assert "not counted" in card_text(no_reason.json()["value"])
            assert "Approval needed" in card_text(no_reason.json()["value"])  # still pending, buttons kept
            r = await th.post(th.invoke(request_id, "deny", "alice", "not during the sale"))
            assert "Denied by alice: not during the sale" in card_text(r.json()["value"])
    assert results[0].is_error and "not during the sale" in text(results[0]) and "alice" in text(results[0])
    assert th.home.rows("SELECT sum(qty) FROM orders") == [(15,)]
    assert terminal(th, request_id) == ["denied"]
    denied = next(e["payload"] for e in th.home.ledger_events(request_id) if e["kind"] == "denied")
    assert denied["reason"] == "not during the sale" and denied["reviewer"] == f"teams:{TENANT}/{OIDS['alice']}"
    assert [v["code"] for v in votes(th, request_id) if "code" in v] == ["reason_required"]
    await th.wait_update(th.fake.sent[0]["id"], "Denied")


async def test_the_requester_and_ineligible_people_cannot_decide_from_teams(teams_home: TeamsHome) -> None:
    th = teams_home
    base = th.serve(agents=[agent_bob()])
    results = []
    async with agent_client(base, TOKENS["agent-bob"]) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "UPDATE payroll SET salary = 1"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            request_id = request_id_of(await th.wait_card("sql_execute"))
            selfie = await th.post(th.invoke(request_id, "approve", "bob", "looks fine to me"))
            assert "requester cannot approve" in card_text(selfie.json()["value"])
            outsider = await th.post(th.invoke(request_id, "approve", "dave", "sure"))
            assert "not eligible" in card_text(outsider.json()["value"])
            stranger = await th.post(th.invoke(request_id, "approve", "alice", "hi",
                                               **{"from": {"id": "29:x", "aadObjectId": "ffffffff-0000-4000-8000-0"}}))
            assert "not a configured reviewer" in card_text(stranger.json()["value"])
            anonymous = await th.post(th.invoke(request_id, "approve", None))
            assert "did not say who you are" in card_text(anonymous.json()["value"])
            first = await th.post(th.invoke(request_id, "approve", "alice", "ok"))
            assert "Approval needed" in card_text(first.json()["value"])  # two DBAs needed
            second = await th.post(th.invoke(request_id, "approve", "carol", "ok"))
            assert "Approved by alice, carol" in card_text(second.json()["value"])
    assert not results[0].is_error, text(results[0])
    assert th.home.rows("SELECT salary FROM payroll") == [(1,)]
    refused = [v["code"] for v in votes(th, request_id) if "code" in v]
    assert refused == ["self_approval", "not_eligible", "unknown_reviewer"]
    assert terminal(th, request_id) == ["executed"]


async def test_replayed_and_racing_clicks_count_once(teams_home: TeamsHome) -> None:
    th = teams_home
    base = th.serve()
    results = []
    async with agent_client(base) as client:
        async def agent() -> None:
            statement = "UPDATE orders SET qty = 9 WHERE id = 1"
            results.append(await client.call_tool("sql_execute", {"statement": statement}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            request_id = request_id_of(await th.wait_card("sql_execute"))
            responses: list[str] = []

            async def click(person: str) -> None:
                r = await th.post(th.invoke(request_id, "approve", person, "go"))
                assert r.status_code == 200
                responses.append(card_text(r.json()["value"]))

            async with anyio.create_task_group() as clicks:
                for person in ("alice", "carol", "alice", "carol"):
                    clicks.start_soon(click, person)
            assert sum("You approved" in r for r in responses) == 1
            assert sum("not counted" in r for r in responses) == 3
            replay = th.invoke(request_id, "approve", "alice", "again")
            for _ in range(2):
                r = await th.post(replay)
                assert "not counted" in card_text(r.json()["value"])
    assert not results[0].is_error
    assert th.home.rows("SELECT qty FROM orders WHERE id = 1") == [(9,)]
    assert kinds(th, request_id).count("vote") == 1
    assert kinds(th, request_id).count("execution.started") == 1
    assert terminal(th, request_id) == ["executed"]


async def test_unauthenticated_invokes_get_401_and_decide_nothing(teams_home: TeamsHome) -> None:
    th = teams_home
    base = th.serve()
    results = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 2"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            request_id = request_id_of(await th.wait_card("sql_execute"))
            activity = th.invoke(request_id, "approve", "alice", "ok")
            fake = th.fake
            bad_tokens = {
                "missing": None,
                "not a jwt": "garbage",
                "wrong audience": fake.jwt(aud="another-bot"),
                "wrong serviceurl": fake.jwt(serviceurl="https://attacker.example/"),
                "expired": fake.jwt(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200, nbf=None),
                "wrong key": fake.jwt(key=new_key()),
                "wrong issuer": fake.jwt(iss="https://sts.windows.net/x/"),
            }
            for case, token in bad_tokens.items():
                r = await th.post(activity, token=token)
                assert r.status_code == 401, case
            moved = dict(activity, serviceUrl="https://attacker.example/")
            assert (await th.post(moved)).status_code == 401  # the token is for another serviceUrl
            assert votes(th, request_id) == []
            assert kinds(th, request_id)[-1] in {"approval.requested", "notified"}
            r = await th.post(activity)
            assert r.status_code == 200 and "You approved" in card_text(r.json()["value"])
    assert not results[0].is_error
    assert terminal(th, request_id) == ["executed"]


async def test_an_expired_request_updates_its_card_and_other_activities_are_ignored(teams_home: TeamsHome) -> None:
    th = teams_home
    base = th.serve()
    async with agent_client(base) as client:
        with anyio.fail_after(30):
            result = await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 1 -- quick_expire"})
    assert result.is_error and "expired" in text(result)
    request_id = request_id_of(th.fake.cards_sent()[0])
    assert terminal(th, request_id) == ["expired"]
    card = await th.wait_update(th.fake.sent[0]["id"], "Expired")
    assert "actions" not in card
    late = await th.post(th.invoke(request_id, "approve", "alice", "too late"))
    assert "not counted" in card_text(late.json()["value"])
    message = {**th.invoke(request_id, "approve", "alice"), "type": "message", "name": None, "text": "hi"}
    assert (await th.post(message)).status_code == 200
    assert terminal(th, request_id) == ["expired"] and "vote" not in kinds(th, request_id)


async def test_a_teams_outage_is_recorded_and_approves_nothing(teams_home: TeamsHome) -> None:
    th = teams_home
    th.fake.always_fail = 503
    base = th.serve()
    api = ReviewerAPI(base)
    results = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 5"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            req = await api.wait_pending("sql_execute")
            await eventually(lambda: "notify.failed" in kinds(th, req["id"]))
            failed = next(e["payload"] for e in th.home.ledger_events(req["id"]) if e["kind"] == "notify.failed")
            assert failed["channel"] == "teams" and "503" in failed["error"]
            assert (await api.pending())[0]["state"] == "pending"
            assert (await api.vote(req["id"], "deny", "alice", "teams is down, not now")).status_code == 200
    assert results[0].is_error and terminal(th, req["id"]) == ["denied"]


async def test_a_decision_made_in_another_keyturn_process_updates_the_card(teams_home: TeamsHome) -> None:
    th = teams_home
    base = th.serve()
    config = yaml.safe_load(th.home.config.read_text())
    del config["teams"]  # a second process on the same ledger, without Teams (e.g. the reviewer API host)
    other_config = th.home.dir / "other.yaml"
    other_config.write_text(yaml.safe_dump(config))
    api = ReviewerAPI(th.home.serve_http(None, "--config", str(other_config)))
    results = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 7"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            request_id = request_id_of(await th.wait_card("sql_execute"))
            assert (await api.vote(request_id, "deny", "carol", "decided elsewhere")).status_code == 200
            card = await th.wait_update(th.fake.sent[0]["id"], "Denied")
    assert "Denied by carol: decided elsewhere" in card_text(card)
    assert results[0].is_error and terminal(th, request_id) == ["denied"]


async def test_a_stdio_agents_held_call_gets_a_card_and_is_decided_through_the_http_process(
        teams_home: TeamsHome) -> None:
    th = teams_home
    th.serve()  # the HTTP process: the bot endpoint Teams posts clicks to
    params = th.home.stdio_params()
    params = params.model_copy(update={"env": {**(params.env or {}), "KEYTURN_TEAMS_APP_PASSWORD": APP_PASSWORD,
                                               "KEYTURN_LINK_SECRET": LINK_SECRET}})
    results = []
    async with Client(params) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "DELETE FROM orders WHERE id = 2"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            request_id = request_id_of(await th.wait_card("sql_execute"))  # posted by the stdio process
            r = await th.post(th.invoke(request_id, "approve", "alice", "ok"))
            assert "You approved" in card_text(r.json()["value"])
    assert not results[0].is_error, text(results[0])
    assert th.home.rows("SELECT count(*) FROM orders") == [(2,)]
    assert terminal(th, request_id) == ["executed"]
    await th.wait_update(th.fake.sent[0]["id"], "executed")


async def test_signed_checkpoints_reach_the_reviewers_conversation_as_a_witness(teams_home: TeamsHome) -> None:
    """A quiet card with the latest signed checkpoint in the reviewers' conversation: a copy a rewrite of the ledger
    file cannot reach, that `keyturn audit verify --checkpoint` accepts."""
    teams_home.serve(checkpoints={"every_s": 0.2})
    fake = teams_home.fake

    def checkpoint_cards() -> list[str]:
        with fake.lock:
            cards = [s["activity"]["attachments"][0]["content"] for s in fake.sent]
        return [card_text(c) for c in cards if "keyturn: ledger checkpoint" in card_text(c)]

    await eventually(lambda: bool(checkpoint_cards()))
    line = checkpoint_cards()[0]
    witness = teams_home.home.dir / "from-teams.jsonl"
    witness.write_text(line[line.index("{"):line.index("}") + 1] + "\n")
    key = line.rsplit("--public-key ", 1)[1].rstrip(")")
    out = teams_home.home.keyturn("audit", "verify", "--config", str(teams_home.home.config),
                                  "--checkpoint", str(witness), "--public-key", key)
    assert out.returncode == 0, out.stdout + out.stderr


async def test_an_approver_changes_their_mind_in_teams_and_a_deny_stays_final(teams_home: TeamsHome) -> None:
    th = teams_home
    base = th.serve(agents=[agent_bob()])
    results = []
    async with agent_client(base, TOKENS["agent-bob"]) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "UPDATE payroll SET salary = 1"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            request_id = request_id_of(await th.wait_card("sql_execute"))
            first = card_text((await th.post(th.invoke(request_id, "approve", "alice", "ok"))).json()["value"])
            assert "2 approvals from group:dba (different people) · 1 of 2 approvals" in first
            changed = await th.post(th.invoke(request_id, "deny", "alice", "the raise is not signed off"))
            assert "You denied: denied by alice, who had approved" in card_text(changed.json()["value"])
            final = await th.post(th.invoke(request_id, "approve", "carol", "ok"))
            assert "not counted" in card_text(final.json()["value"])  # a deny stays final
    assert results[0].is_error and "the raise is not signed off" in text(results[0])
    assert th.home.rows("SELECT salary FROM payroll") == [(100,)]
    changes = [(v["verdict"], v.get("changed_from")) for v in votes(th, request_id) if "code" not in v]
    assert changes == [("approve", None), ("deny", "approve")]
    assert [v["code"] for v in votes(th, request_id) if "code" in v] == ["not_pending"]
    assert terminal(th, request_id) == ["denied"]


def revoke_invoke(th: TeamsHome, grant_id: str, person: str | None, reason: str | None) -> dict[str, Any]:
    activity = th.invoke("unused", "revokeGrant", person, reason)
    data = activity["value"]["action"]["data"]
    del data["request_id"]
    data["grant_id"] = grant_id
    return activity


async def test_a_grant_made_from_a_request_gets_a_card_whose_revoke_ends_it(teams_home: TeamsHome) -> None:
    th = teams_home
    base = th.serve()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        async with client_call(client, "sql_execute", {"statement": "UPDATE orders SET qty = 1 WHERE id = 1"}) as call:
            request_id = request_id_of(await th.wait_card("sql_execute"))
            r = await api.request("POST", f"/api/requests/{request_id}/approve", "alice",
                                  {"reason": "qty fixes", "grant": {"for": "1h", "uses": 3}})
            assert r.status_code == 200, r.text
        assert not (await call.result()).is_error
        announced = await eventually(lambda: next(
            (c for c in th.fake.cards_sent() if "standing grant" in card_text(c)), None))
        grant_id = announced["actions"][0]["data"]["grant_id"]
        assert [a["verb"] for a in announced["actions"]] == ["keyturn.revokeGrant"]
        shown = card_text(announced)
        assert grant_id in shown and "alice" in shown and request_id in shown and "up to 3 call(s)" in shown
        ran = await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 2 WHERE id = 1"})
        assert not ran.is_error and grant_id in text(ran)

        # Unauthenticated, unknown people and blank reasons revoke nothing.
        assert (await th.post(revoke_invoke(th, grant_id, "carol", "x"), token=None)).status_code == 401
        stranger = (await th.post(revoke_invoke(th, grant_id, "mallory", "mine"))).json()
        assert "Not revoked" in card_text(stranger["value"])
        blank = (await th.post(revoke_invoke(th, grant_id, "carol", "  "))).json()
        assert "Not revoked" in card_text(blank["value"]) and blank["value"]["actions"]
        assert not any(e["kind"] == "grant.revoked" for e in th.home.ledger_events(grant_id))
        r = await th.post(revoke_invoke(th, grant_id, "carol", "the migration is done"))
        body = r.json()
        assert body["statusCode"] == 200 and "You revoked this grant" in card_text(body["value"])
        assert not body["value"].get("actions")
        again = (await th.post(revoke_invoke(th, grant_id, "carol", "twice"))).json()
        assert "not live" in card_text(again["value"])
        revoked = [e["payload"] for e in th.home.ledger_events(grant_id) if e["kind"] == "grant.revoked"]
        assert [(p["person"], p["channel"], p["reason"]) for p in revoked] == [
            ("carol", "teams", "the migration is done")]

        # Revoked: the next call like it waits for a reviewer again.
        async with client_call(client, "sql_execute", {"statement": "UPDATE orders SET qty = 3 WHERE id = 1"}) as call:
            def second_request_card() -> dict[str, Any] | None:
                cards = [c for c in th.fake.cards_sent() if "request_id" in json.dumps(c.get("actions"))]
                return cards[1] if len(cards) > 1 else None

            held = request_id_of(await eventually(second_request_card))
            assert (await api.vote(held, "deny", "alice", "revoked")).status_code == 200
        assert (await call.result()).is_error
    assert th.home.rows("SELECT qty FROM orders WHERE id = 1") == [(2,)]
