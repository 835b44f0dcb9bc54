"""Approvals a reviewer can trust, end to end with the shipped policy: a real `keyturn serve --http`, the SDK's
client as the agent, reviewers through the HTTP API and the CLI. What a request needs is told the same way
everywhere and is what the quorum really is; an approver may change their mind until the call is claimed to run,
and a deny stays final; the rules the configured reviewers can never approve are named at start-up."""

from __future__ import annotations

import anyio

from tests.conftest import ROOT, TOKENS, Home, ReviewerAPI, agent_client
from tests.helpers import client_call, eventually

SHIPPED = ROOT / "policies" / "default.yaml"
MASS_DELETE = {"statement": "DELETE FROM orders"}  # sql-write (1 of anyone) and sql-mass-change (2 of anyone)


def text(result) -> str:  # type: ignore[no-untyped-def]
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def kinds(home: Home, request_id: str) -> list[str]:
    return [e["kind"] for e in home.ledger_events(request_id)]


async def test_a_mass_delete_needs_two_people_everywhere_and_an_approver_may_deny_before_it_runs(home: Home) -> None:
    home.write_config(policy=str(SHIPPED))
    base = home.serve_http()
    api = ReviewerAPI(base)
    progress: list[str] = []

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    async with agent_client(base) as client:
        async with client_call(client, "sql_execute", MASS_DELETE, progress_callback=on_progress) as call:
            req = await api.wait_pending("sql_execute")
            assert {r["id"] for r in req["rules"]} >= {"sql-write", "sql-mass-change"}
            needs = req["needs"]
            assert (needs["approvals"], needs["needed"], needs["met"]) == (0, 2, False)  # not "0 of 3"
            assert needs["text"] == "2 approvals from any reviewer (different people)"
            assert needs["progress"] == "0 of 2 approvals" and needs["require_reason"] is True
            assert req["expires"] - req["created"] > 25 * 60  # sql-mass-change's own 30m, not sql-write's 15m
            listed = home.keyturn("pending", url=base, token=TOKENS["dave"])
            assert listed.returncode == 0, listed.stderr
            assert "needs: 2 approvals from any reviewer (different people) (0 of 2 approvals)" in listed.stdout

            first = await api.vote(req["id"], "approve", "alice", "looked at it")
            assert first.status_code == 200 and first.json()["state"] == "pending"  # one click is not the quorum
            assert "1 of 2 approvals" in first.json()["message"]
            await eventually(lambda: any("1 of 2 approvals; needs 2 approvals from any reviewer" in m
                                         for m in progress))
            shown = (await api.request("GET", f"/api/requests/{req['id']}", "carol")).json()["request"]
            assert shown["needs"]["progress"] == "1 of 2 approvals"
            assert home.rows("SELECT count(*) FROM orders") == [(3,)]

            # alice changes her mind, through the CLI: her approval becomes a denial, and the call is denied.
            changed = home.keyturn("deny", req["id"], "--reason", "wrong table after all", url=base,
                                   token=TOKENS["alice"])
            assert changed.returncode == 0, changed.stderr
            assert "denied by alice, who had approved" in changed.stdout
    result = await call.result()
    assert result.is_error and "alice" in text(result) and "wrong table after all" in text(result)
    assert home.rows("SELECT count(*) FROM orders") == [(3,)]
    votes = [e["payload"] for e in home.ledger_events(req["id"]) if e["kind"] == "vote"]
    assert [(v["person"], v["verdict"], v.get("changed_from")) for v in votes] == [
        ("alice", "approve", None), ("alice", "deny", "approve")]
    # A deny stays final: neither the one who denied nor anyone else turns it into an approval.
    for who in ("alice", "carol"):
        again = await api.vote(req["id"], "approve", who, "let it run")
        assert (again.status_code, again.json()["code"]) == (409, "not_pending")
    assert kinds(home, req["id"]).count("denied") == 1 and "execution.started" not in kinds(home, req["id"])
    verified = (await api.request("GET", "/api/audit/verify", "dave")).json()
    assert verified["ok"], verified


async def test_an_approval_waiting_for_its_agent_can_be_taken_back_only_by_an_approver(home: Home) -> None:
    home.write_config(policy=str(SHIPPED))
    base = home.serve_http()
    api = ReviewerAPI(base)
    async with agent_client(base) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.call_tool, "sql_execute", MASS_DELETE)
            req = await api.wait_pending("sql_execute")
            tg.cancel_scope.cancel()  # the agent gives up; its request stays
    await eventually(lambda: "client.left" in kinds(home, req["id"]))
    assert (await api.vote(req["id"], "approve", "alice", "fine")).json()["state"] == "pending"
    approved = await api.vote(req["id"], "approve", "carol", "fine")
    assert approved.json()["state"] == "approved" and "waiting for the agent" in approved.json()["message"]
    shown = (await api.request("GET", f"/api/requests/{req['id']}", "dave")).json()["request"]
    assert shown["needs"]["met"] and shown["needs"]["progress"] == "2 of 2 approvals"

    outsider = await api.vote(req["id"], "deny", "dave", "I did not approve it but I object")
    assert (outsider.status_code, outsider.json()["code"]) == (409, "not_pending")  # only an approver takes back
    unexplained = await api.vote(req["id"], "deny", "carol")
    assert (unexplained.status_code, unexplained.json()["code"]) == (400, "reason_required")
    withdrawn = await api.vote(req["id"], "deny", "carol", "the sale starts in an hour")
    assert withdrawn.status_code == 200, withdrawn.text
    assert withdrawn.json()["state"] == "denied" and "withdrawn" in withdrawn.json()["message"]
    assert [k for k in kinds(home, req["id"]) if k != "vote.refused"][-3:] == ["approval.granted", "vote", "denied"]
    assert kinds(home, req["id"]).count("vote.refused") == 2  # dave's, and carol's without a reason
    assert home.rows("SELECT count(*) FROM orders") == [(3,)]
    # The agent comes back: nothing of the withdrawn approval runs; it is held again as a new request.
    async with agent_client(base) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.call_tool, "sql_execute", MASS_DELETE)
            again = await api.wait_pending("sql_execute")
            tg.cancel_scope.cancel()
    assert again["id"] != req["id"] and home.rows("SELECT count(*) FROM orders") == [(3,)]
    assert (await api.request("GET", "/api/audit/verify", "dave")).json()["ok"]


async def test_a_lone_reviewer_is_told_at_start_which_rules_it_can_never_approve(home: Home) -> None:
    home.write_config(policy=str(SHIPPED), people={"alice": {}},
                      reviewers=[{"identity": "api:alice", "person": "alice", "token_sha256": __import__(
                          "hashlib").sha256(TOKENS["alice"].encode()).hexdigest()}])
    port_base = home.serve_http()
    log = next(home.dir.glob(f"serve-{port_base.rsplit(':', 1)[1]}.log")).read_text()
    warnings = [line for line in log.splitlines() if "can never be approved" in line]
    assert len(warnings) == 3, log
    for warning, rule in zip(warnings, ("sql-mass-change", "sql-large-change", "sql-impact-unknown"), strict=True):
        assert f"rule '{rule}' can never be approved: 2 from any reviewer but only 1 reviewer(s) can: alice" in warning

    checked = home.keyturn("policy", "check", str(SHIPPED), "--config", str(home.config))
    assert checked.returncode == 0, checked.stderr
    assert "warning: rule 'sql-mass-change' can never be approved" in checked.stdout
