"""`keyturn proxy` serves an upstream's resources, prompts, completion and logging, and passes the requests the
upstream makes of its client (sampling, elicitation) to the agent's client: told through a real `keyturn proxy`
(serving HTTP, the shipped policy plus one rule that holds a read) and the SDK's client.

Every resource read is a call of `resources/read` in the ledger, ending in exactly one terminal event.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import warnings
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client import ClientRequestContext
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError

from server.models import TERMINAL_EVENTS
from server.proxy.relay import elicitation_message
from tests.conftest import ROOT, ReviewerAPI, agent_client
from tests.proxy.conftest import HERE, ProxyHome, text
from tests.proxy.test_stdio_serving import appending

FEATURES = HERE / "features_server.py"
HOLD_PLANS = """
  - id: plans-need-a-human
    description: the plan is read only with a human's approval
    tool: resources/read
    when: args.uri == "notes://plan"
    outcome: review
    risk: medium
    reason: plans are read with a human's approval
"""


@pytest.fixture
def base(home: ProxyHome) -> str:
    """`keyturn proxy --http` in front of the features server, deciding by the shipped policy plus one rule."""
    policy = home.dir / "policy.yaml"
    policy.write_text((ROOT / "policies" / "proxy.yaml").read_text() + HOLD_PLANS)
    home.write_config(tools=[], policy=str(policy), proxy={
        "upstreams": [{"name": "notes", "command": sys.executable, "args": [str(FEATURES)]}], "connect_timeout": 20})
    return home.proxy_http()


def reads(home: ProxyHome) -> dict[str, list[str]]:
    """Every `resources/read` call in the ledger: its URI -> the kinds of its terminal events."""
    out: dict[str, list[str]] = {}
    for call_id, arguments in ledger_calls(home, "resources/read"):
        ends = [e["kind"] for e in home.ledger_events(call_id) if e["kind"] in TERMINAL_EVENTS]
        out.setdefault(json.loads(arguments)["uri"], []).extend(ends)
    return out


def ledger_calls(home: ProxyHome, *tools: str) -> list[tuple[str, str]]:
    """(id, arguments) of the ledger's calls of `tools`, oldest first."""
    with sqlite3.connect(home.db) as conn:
        marks = ", ".join("?" for _ in tools)
        return list(conn.execute(f"SELECT id, arguments FROM calls WHERE tool IN ({marks}) ORDER BY rowid", tools))


async def test_resources_are_listed_read_through_the_gate_held_and_refused(home: ProxyHome, base: str) -> None:
    api = ReviewerAPI(base)
    held: list[Any] = []
    with anyio.fail_after(60):
        async with agent_client(base, mode="legacy") as client:
            caps = client.server_capabilities
            assert caps.resources is not None and caps.resources.subscribe
            assert caps.prompts is not None and caps.completions is not None and caps.logging is not None
            listed = await client.list_resources()
            assert {str(r.uri) for r in listed.resources} == {"notes://readme", "notes://plan"}
            templates = await client.list_resource_templates()
            assert {t.uri_template for t in templates.resource_templates} == {"notes://{name}", "file:///{+path}"}

            readme = await client.read_resource("notes://readme")  # allowed by the shipped policy: a read
            assert readme.contents[0].text == "read me first"  # type: ignore[union-attr]
            other = await client.read_resource("notes://shopping")  # a template matches it
            assert "made up for notes://shopping" in other.contents[0].text  # type: ignore[union-attr]

            with pytest.raises(MCPError, match="unknown resource 'elsewhere://x'"):
                await client.read_resource("elsewhere://x")
            # keyturn's own ledger, named through the upstream's file template: the built-in guard denies it.
            with pytest.raises(MCPError, match=r"(?i)denied by policy.*keyturn") as denied:
                await client.read_resource(f"file://{home.db}")
            # The error's data carries keyturn's details, as an error result's `_meta` does.
            assert denied.value.error.data["outcome"] == "denied", denied.value.error.data

            async def read_plan() -> None:
                held.append(await client.read_resource("notes://plan"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(read_plan)
                request = await api.wait_pending("resources/read")
                assert request["arguments"]["uri"] == "notes://plan"
                assert (await api.vote(request["id"], "approve", "alice", "ok")).status_code == 200
    assert held[0].contents[0].text == "the secret plan"
    assert reads(home) == {"notes://readme": ["executed"], "notes://shopping": ["executed"],
                           f"file://{home.db}": ["denied"], "notes://plan": ["executed"]}
    assert home.terminal(request["id"]) == "executed"


async def test_subscriptions_prompts_completion_and_logging_pass_through(home: ProxyHome, base: str) -> None:
    updated, logged = anyio.Event(), anyio.Event()
    messages: list[types.LoggingMessageNotificationParams] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification) and str(message.params.uri) == "notes://readme":
            updated.set()

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        messages.append(params)
        logged.set()

    with anyio.fail_after(60), warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        async with agent_client(base, mode="legacy", message_handler=on_message, logging_callback=on_log) as client:
            await client.subscribe_resource("notes://readme")
            touched = await client.call_tool("touch", {"uri": "notes://readme"})
            assert text(touched) == "touched notes://readme"
            await updated.wait()

            prompts = await client.list_prompts()
            assert [p.name for p in prompts.prompts] == ["greet"]
            prompt = await client.get_prompt("greet", {"name": "alice"})
            assert prompt.messages[0].content.text == "Say hello to alice."  # type: ignore[union-attr]
            completion = await client.complete(types.PromptReference(type="ref/prompt", name="greet"),
                                               {"name": "name", "value": "al"})
            assert completion.completion.values == ["alice", "alan"]
            by_template = await client.complete(
                types.ResourceTemplateReference(type="ref/resource", uri="notes://{name}"), {"name": "name", "value": "r"})
            assert by_template.completion.values == ["readme"]

            await client.set_logging_level("info")
            assert text(await client.call_tool("log", {})) == "logged"
            await logged.wait()
    assert messages[0].level == "warning" and messages[0].data == {"note": "from upstream"}


async def test_sampling_elicitation_and_roots_from_the_upstream_are_answered_by_the_agents_client(
    home: ProxyHome, base: str
) -> None:
    async def sampling(ctx: ClientRequestContext, params: types.CreateMessageRequestParams) -> Any:
        return types.CreateMessageResult(role="assistant", model="test-model",
                                         content=types.TextContent(type="text", text="hi from the agent"))

    async def elicitation(ctx: ClientRequestContext, params: types.ElicitRequestParams) -> Any:
        # Named as the upstream's question, never taken for keyturn's own.
        assert params.message == elicitation_message("notes", "your name?"), params.message
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async def roots(ctx: ClientRequestContext) -> Any:
        return types.ListRootsResult(roots=[types.Root(uri="file:///srv/project")])

    with anyio.fail_after(60):
        async with agent_client(base, mode="legacy", sampling_callback=sampling, elicitation_callback=elicitation,
                                list_roots_callback=roots) as client:
            assert text(await client.call_tool("sample", {})) == "the model said: hi from the agent"
            assert text(await client.call_tool("ask", {})) == "elicited: accept {'name': 'Ada'}"
            assert text(await client.call_tool("roots", {})) == "roots: ['file:///srv/project']"
        # A client that declared neither: the upstream's request is refused, saying so.
        async with agent_client(base, mode="legacy") as client:
            refused = await client.call_tool("sample", {})
            assert "did not declare" in text(refused), text(refused)
    ends = [[e["kind"] for e in home.ledger_events(call_id) if e["kind"] in TERMINAL_EVENTS]
            for call_id, _ in ledger_calls(home, "sample", "ask", "roots")]
    assert ends == [["executed"], ["executed"], ["executed"], ["failed"]]  # the refused one: the upstream's error result


async def test_a_2026_era_agent_reads_listens_and_is_told_what_it_cannot_be_asked(home: ProxyHome, base: str) -> None:
    updated = anyio.Event()

    async def sampling(ctx: ClientRequestContext, params: types.CreateMessageRequestParams) -> Any:
        raise AssertionError("a 2026-era session has no channel for the upstream's request")

    with anyio.fail_after(60):
        async with agent_client(base, sampling_callback=sampling) as client:  # the SDK's default: a 2026-era session
            readme = await client.read_resource("notes://readme")
            assert readme.contents[0].text == "read me first"  # type: ignore[union-attr]
            prompt = await client.get_prompt("greet", {"name": "bob"})
            assert prompt.messages[0].content.text == "Say hello to bob."  # type: ignore[union-attr]
            async with client.listen(resource_subscriptions=["notes://readme"]) as subscription:
                async def follow() -> None:
                    async for event in subscription:
                        if getattr(event, "uri", None) == "notes://readme":
                            updated.set()
                            return

                async with anyio.create_task_group() as tg:
                    tg.start_soon(follow)
                    while not updated.is_set():  # (the upstream's stream is opened again for the new URI)
                        await client.call_tool("touch", {"uri": "notes://readme"})
                        with anyio.move_on_after(0.5):
                            await updated.wait()
            refused = await client.call_tool("sample", {})
            assert "has no channel for it" in text(refused), text(refused)
    assert reads(home) == {"notes://readme": ["executed"]}


async def test_over_stdio_a_read_is_gated_and_the_upstreams_sampling_reaches_the_agent(home: ProxyHome) -> None:
    policy = home.dir / "policy.yaml"
    policy.write_text((ROOT / "policies" / "proxy.yaml").read_text())
    home.write_config(tools=[], policy=str(policy), proxy={
        "upstreams": [{"name": "notes", "command": sys.executable, "args": [str(FEATURES)]}], "connect_timeout": 20})

    async def sampling(ctx: ClientRequestContext, params: types.CreateMessageRequestParams) -> Any:
        return types.CreateMessageResult(role="assistant", model="m", content=types.TextContent(type="text", text="yo"))

    with anyio.fail_after(60), appending(home.dir / "proxy.log") as errlog:
        async with Client(stdio_client(home.proxy_params(), errlog=errlog), mode="legacy",
                          sampling_callback=sampling) as client:
            readme = await client.read_resource("notes://readme")
            assert readme.contents[0].text == "read me first"  # type: ignore[union-attr]
            with pytest.raises(MCPError, match=r"(?i)denied by policy.*keyturn"):
                await client.read_resource(f"file://{home.db}")
            assert text(await client.call_tool("sample", {})) == "the model said: yo"
    assert reads(home) == {"notes://readme": ["executed"], f"file://{home.db}": ["denied"]}
