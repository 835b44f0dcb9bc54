"""Edit, then approve, from Teams: a real `keyturn serve --http`, the SDK's MCP client holding a call, and a reviewer
submitting the card's edit form as a signed `adaptiveCard/action` invoke. The edited call is judged again like every
edit; what runs is exactly the edited call, once; nothing a card sends that keyturn does not know is ignored."""

from __future__ import annotations

import json
from typing import Any

import anyio

from server.canonical import args_hash
from server.channels.teams.cards import EDIT_ARGUMENTS_INPUT, EDIT_REASON_INPUT
from tests.channels.teams.conftest import OIDS, TENANT, TeamsHome, card_text, request_id_of
from tests.conftest import agent_client


def text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def edit_invoke(th: TeamsHome, request_id: str, person: str, arguments: Any, reason: str | None,
                **data: Any) -> dict[str, Any]:
    activity = th.invoke(request_id, "edit", person)
    fields = activity["value"]["action"]["data"]
    fields[EDIT_ARGUMENTS_INPUT] = arguments if isinstance(arguments, str) else json.dumps(arguments)
    if reason is not None:
        fields[EDIT_REASON_INPUT] = reason
    fields.update(data)
    return activity


async def test_a_reviewer_edits_in_teams_and_exactly_the_edited_call_runs(teams_home: TeamsHome) -> None:
    th = teams_home
    base = th.serve()
    sent = {"statement": "DELETE FROM orders WHERE item = 'pear'"}
    narrowed = {"statement": "DELETE FROM orders WHERE item = 'pear' AND qty > 100"}
    results = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", sent))

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            card = await th.wait_card("sql_execute")
            request_id = request_id_of(card)
            assert [a["title"] for a in card["actions"]] == ["Approve", "Deny", "Edit & approve"]
            # What is wrong with the form is said on the card, and nothing is counted.
            no_reason = await th.post(edit_invoke(th, request_id, "alice", narrowed, "  "))
            assert "Say why you changed the arguments" in card_text(no_reason.json()["value"])
            not_json = await th.post(edit_invoke(th, request_id, "alice", "{statement: oops", "narrower"))
            assert "must be a JSON object" in card_text(not_json.json()["value"])
            invalid = await th.post(edit_invoke(th, request_id, "alice", {"sql": "DELETE FROM orders"}, "narrower"))
            assert "Your edit was not counted" in card_text(invalid.json()["value"])
            # A field keyturn does not know is refused, never ignored.
            extra = await th.post(edit_invoke(th, request_id, "alice", narrowed, "narrower", approve_all=True))
            assert extra.json()["statusCode"] == 400 and "'approve_all'" in extra.json()["value"]["message"]
            r = await th.post(edit_invoke(th, request_id, "alice", narrowed, "only the big pear orders"))
            assert r.status_code == 200, r.text
            redrawn = card_text(r.json()["value"])
            assert "You approved the edited call" in redrawn, redrawn
    assert not results[0].is_error, text(results[0])
    said = text(results[0])
    assert "alice changed the arguments" in said and "only the big pear orders" in said
    assert th.home.rows("SELECT item FROM orders ORDER BY id") == [("apple",), ("pear",), ("plum",)]  # no big pears
    events = th.home.ledger_events(request_id)
    edited = next(e["payload"] for e in events if e["kind"] == "arguments.edited")
    assert edited["from_args_hash"] == args_hash(sent) and edited["args_hash"] == args_hash(narrowed)
    assert edited["channel"] == "teams" and edited["person"] == "alice"
    assert edited["reviewer"] == f"teams:{TENANT}/{OIDS['alice']}"
    started = next(e["payload"] for e in events if e["kind"] == "execution.started")
    assert started["args_hash"] == args_hash(narrowed)
    refused = [e["payload"].get("code") for e in events if e["kind"] == "vote.refused"]
    assert refused == ["invalid_arguments"]  # the malformed forms never reached the broker


async def test_approve_with_an_edit_form_filled_in_is_a_plain_approval(teams_home: TeamsHome) -> None:
    """Approve gathers every input of the card; it never turns into an edit (only the edit form's own button edits)."""
    th = teams_home
    base = th.serve()
    results = []
    async with agent_client(base) as client:
        async def agent() -> None:
            results.append(await client.call_tool("sql_execute", {"statement": "UPDATE orders SET qty = 1 WHERE id = 1"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            request_id = request_id_of(await th.wait_card("sql_execute"))
            activity = th.invoke(request_id, "approve", "alice", "fine")
            activity["value"]["action"]["data"][EDIT_ARGUMENTS_INPUT] = json.dumps(
                {"statement": "UPDATE orders SET qty = 999"})
            activity["value"]["action"]["data"][EDIT_REASON_INPUT] = "sneaky"
            r = await th.post(activity)
            assert "You approved" in card_text(r.json()["value"])
    assert not results[0].is_error, text(results[0])
    assert th.home.rows("SELECT qty FROM orders ORDER BY id") == [(1,), (5,), (7,)]
    assert not [e for e in th.home.ledger_events(request_id) if e["kind"] == "arguments.edited"]
