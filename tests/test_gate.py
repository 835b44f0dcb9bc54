"""The gate fails closed: an error in classification, policy, ledger or a channel never runs the tool."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest

from server.approvals import ApprovalBroker, ReviewerDirectory
from server.approvals import broker as approvals
from server.classify import ClassifyContext
from server.gate import Gate, Identity
from server.guarded import guarded_tool
from server.ledger import Store
from server.models import Event, RequestView, Verdict
from server.policy import LivePolicy
from tests.helpers import agent, held_call, ledger_until, left_pending, until_event
from tests.stores import Stores

POLICY = """
version: 1
default: review
review: {timeout: 10m, approvers: [{any: true, quorum: 1}]}
rules:
  - {id: reads, tool: "read_*", outcome: allow, risk: low, reason: reads run}
  - {id: writes, tool: "write_*", outcome: review, risk: high, reason: writes are reviewed}
"""


@dataclass
class Runs:
    count: int = 0


def unchanged(arguments: dict[str, Any]) -> dict[str, Any]:
    return arguments


@dataclass
class FakeTool:
    """A gate `Runnable` made here, for what no registered tool does: its classifiers, what `validate` does and
    what `run` returns; `runs` counts its runs."""

    name: str
    runs: Runs
    classifiers: dict[str, str] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], dict[str, Any]] = unchanged
    result: Any = field(default_factory=lambda: types.CallToolResult(content=[]))
    annotations: dict[str, Any] = field(default_factory=dict)

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        return self.check(arguments)

    async def run(self, arguments: dict[str, Any]) -> types.CallToolResult:
        self.runs.count += 1
        return self.result  # type: ignore[no-any-return]


@pytest.fixture
async def world(tmp_path: Path, stores: Stores) -> AsyncIterator[tuple[Gate, Runs, Store]]:
    runs = Runs()

    @guarded_tool(name="read_thing")
    async def read_thing(key: str) -> str:
        runs.count += 1
        return f"value of {key}"

    @guarded_tool(name="write_thing")
    async def write_thing(key: str) -> str:
        runs.count += 1
        return "written"

    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    policy = LivePolicy(policy_file)
    policy.load()
    async with stores.new() as ledger:
        broker = ApprovalBroker(ledger=ledger, directory=ReviewerDirectory(
            identities={"api:alice": "alice"}, groups_of={"alice": frozenset()}), poll_interval_s=0.05)
        gate = Gate(ledger=ledger, broker=broker, policy=policy, classify_context=ClassifyContext(),
                    progress_interval_s=0.2)
        gate.tools = {"read_thing": read_thing, "write_thing": write_thing}  # type: ignore[attr-defined]
        yield gate, runs, ledger


AGENT = Identity(principal="agent")


async def terminal_kinds(ledger: Store) -> list[str]:
    terminal = {"executed", "failed", "denied", "expired", "cancelled", "abandoned"}
    return [e.kind for e in await ledger.tail(1000) if e.kind in terminal]


async def test_an_allowed_call_runs(world: tuple[Gate, Runs, Store]) -> None:
    gate, runs, ledger = world
    result = await gate.call(gate.tools["read_thing"], {"key": "a"}, AGENT)  # type: ignore[attr-defined]
    assert not result.is_error and runs.count == 1
    assert await terminal_kinds(ledger) == ["executed"]


async def test_a_classifier_failure_denies_and_never_runs(world: tuple[Gate, Runs, Store]) -> None:
    gate, runs, ledger = world

    # An upstream tool whose configured classifier kind does not exist.
    misconfigured = FakeTool("read_upstream", runs, classifiers={"key": "no-such-kind"})
    result = await gate.call(misconfigured, {"key": "a"}, AGENT)
    assert result.is_error and "could not evaluate" in result.content[0].text  # type: ignore[union-attr]
    assert runs.count == 0
    assert await terminal_kinds(ledger) == ["denied"]


async def test_arguments_that_are_not_plain_json_are_refused(world: tuple[Gate, Runs, Store]) -> None:
    gate, runs, _ = world
    result = await gate.call(gate.tools["read_thing"], {"key": float("nan")}, AGENT)  # type: ignore[attr-defined]
    assert result.is_error and runs.count == 0


async def test_an_argument_check_that_breaks_its_contract_denies_and_is_recorded(
        world: tuple[Gate, Runs, Store]) -> None:
    """A tool's `validate` may raise only `InvalidArguments`; anything else still ends the call, recorded."""
    gate, runs, ledger = world

    def breaks(arguments: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError(f"could not parse {arguments['key']}")

    result = await gate.call(FakeTool("read_broken", runs, check=breaks), {"key": "s3cr3t-value"}, AGENT)
    assert result.is_error and "could not check" in result.content[0].text  # type: ignore[union-attr]
    assert runs.count == 0
    assert await terminal_kinds(ledger) == ["denied"]
    events = await ledger.tail(10)
    assert [e.kind for e in events] == ["call.received", "denied"]
    assert "s3cr3t-value" not in str([e.payload for e in events])


async def test_a_result_that_cannot_be_recorded_is_withheld_and_the_run_still_ends_in_one_terminal_event(
        world: tuple[Gate, Runs, Store]) -> None:
    gate, runs, ledger = world

    # A broken tool: what it returns is not a result.
    result = await gate.call(FakeTool("read_odd", runs, result=None), {"key": "a"}, AGENT)
    assert result.is_error and "could not be recorded" in result.content[0].text  # type: ignore[union-attr]
    assert runs.count == 1
    assert await terminal_kinds(ledger) == ["failed"]
    [view] = await ledger.list_calls(("failed",))
    assert view.state == "failed"


async def test_a_ledger_that_cannot_write_stops_the_call(world: tuple[Gate, Runs, Store], stores: Stores) -> None:
    gate, runs, ledger = world
    await stores.refuse_writes(ledger)
    result = await gate.call(gate.tools["read_thing"], {"key": "a"}, AGENT)  # type: ignore[attr-defined]
    said = result.content[0].text  # type: ignore[union-attr]
    assert result.is_error and "did not run" in said
    assert runs.count == 0
    assert_ledger_not_named(said, stores)
    if stores.postgres:  # the database cannot be reached at all: the agent is not told where it lives either
        database = stores.where().rsplit("/", 1)[1]
        assert stores.cluster is not None
        stores.cluster.psql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        stores.cluster.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"
                            " AND pid <> pg_backend_pid()")
        try:
            result = await gate.call(gate.tools["read_thing"], {"key": "b"}, AGENT)  # type: ignore[attr-defined]
        finally:
            stores.cluster.psql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        said = result.content[0].text  # type: ignore[union-attr]
        assert result.is_error and "did not run" in said and "cannot be reached" in said, said
        assert_ledger_not_named(said, stores)
        assert runs.count == 0


def assert_ledger_not_named(said: str, stores: Stores) -> None:
    """What an agent reads of a ledger failure names the cause, never where the ledger lives."""
    where = stores.where()
    if stores.postgres:
        assert stores.cluster is not None
        for part in (where.rsplit("/", 1)[1], "127.0.0.1", str(stores.cluster.port), "postgres"):
            assert part not in said, (part, said)
    else:
        assert where not in said and str(stores.dir) not in said, said


async def test_a_failing_channel_neither_blocks_nor_approves(world: tuple[Gate, Runs, Store]) -> None:
    gate, runs, ledger = world

    class BrokenChannel:
        name = "broken"

        async def request_opened(self, request: RequestView) -> None:
            raise ConnectionError("chat API is down")

        async def request_changed(self, request: RequestView, event: Event) -> None:
            raise ConnectionError("chat API is down")

    gate.broker.notifiers.append(BrokenChannel())
    async with held_call(gate, gate.tools["write_thing"], {"key": "k"}, AGENT) as call:  # type: ignore[attr-defined]
        request = await call.request()
        # The request is recorded before any channel hears of it; the failure is recorded when the channel fails.
        kinds = [e.kind for e in await call.until("notify.failed")]
        assert kinds[:3] == ["call.received", "decision", "approval.requested"] and runs.count == 0
        await gate.broker.decide(Verdict(request_id=request.id, reviewer="api:alice", verdict="approve"))
        result = await call.result()
    assert not result.is_error and runs.count == 1
    assert await terminal_kinds(ledger) == ["executed"]


async def test_the_requester_identity_can_never_approve(world: tuple[Gate, Runs, Store]) -> None:
    gate, runs, ledger = world
    alice_agent = Identity(principal="alice-bot", on_behalf_of="alice")
    async with held_call(gate, gate.tools["write_thing"], {"key": "k"}, alice_agent) as call:  # type: ignore[attr-defined]
        request = await call.request()
        refused = await gate.broker.decide(Verdict(request_id=request.id, reviewer="api:alice", verdict="approve"))
        assert not refused.accepted and refused.code == "self_approval"
        assert await gate.broker.cancel(request.id, "alice-bot", "never mind")
    assert runs.count == 0
    assert await terminal_kinds(ledger) == ["cancelled"]


async def test_an_approval_is_bound_to_its_arguments_and_consumed_by_the_run(world: tuple[Gate, Runs, Store]) -> None:
    gate, runs, ledger = world
    write = gate.tools["write_thing"]  # type: ignore[attr-defined]
    request = await left_pending(gate, write, {"key": "approved-one"}, AGENT)
    assert [v.id for v in await ledger.list_calls(("pending",))] == [request.id]
    await gate.broker.decide(Verdict(request_id=request.id, reviewer="api:alice", verdict="approve"))
    # Other arguments are another request: the approval does not carry over.
    await left_pending(gate, write, {"key": "something-else"}, AGENT)
    assert runs.count == 0
    assert (await ledger.get_call(request.id)).state == "approved"  # type: ignore[union-attr]
    # The approved arguments run once; the same call again, before the request expires, gets that run's kept
    # result and does not run again (after the expiry it would need a new approval).
    result = await gate.call(write, {"key": "approved-one"}, AGENT)
    assert not result.is_error and runs.count == 1
    with anyio.fail_after(5):
        again = await gate.call(write, {"key": "approved-one"}, AGENT)
    assert again == result
    assert runs.count == 1
    assert len(await ledger.list_calls(("pending",))) == 1  # only the other arguments' request
    assert [e.kind for e in await ledger.events(request.id)][-2:] == ["call.rejoined", "result.delivered"]


async def test_two_processes_waiting_on_one_approval_run_it_once(world: tuple[Gate, Runs, Store],
                                                                  stores: Stores) -> None:
    gate, runs, ledger = world
    # A second "process": its own connection, broker and gate on the same database file.
    async with stores.new() as other_ledger:
        other_broker = ApprovalBroker(ledger=other_ledger, directory=gate.broker.directory, poll_interval_s=0.05)
        other = Gate(ledger=other_ledger, broker=other_broker, policy=gate.policy,
                     classify_context=ClassifyContext(), progress_interval_s=0.2)
        write = gate.tools["write_thing"]  # type: ignore[attr-defined]

        async with agent() as calls:
            calls.tg.start_soon(other_broker.poll_store)
            first = calls.call(gate, write, {"key": "shared"}, AGENT)
            request = await first.request()
            second = calls.call(other, write, {"key": "shared"}, AGENT)
            await until_event(ledger, request.id, "call.rejoined")
            await gate.broker.decide(Verdict(request_id=request.id, reviewer="api:alice", verdict="approve"))
            results = [await first.result(), await second.result()]
            calls.stop()
    assert runs.count == 1
    assert sorted(bool(r.is_error) for r in results) == [False, True]
    kinds = [e.kind for e in await ledger.events(request.id)]
    assert kinds.count("execution.started") == 1 and kinds.count("executed") == 1


@pytest.mark.parametrize("rescan", [False, True])
async def test_a_decision_made_by_another_process_wakes_the_waiting_call_at_the_next_poll(
        world: tuple[Gate, Runs, Store], monkeypatch: pytest.MonkeyPatch, rescan: bool, stores: Stores) -> None:
    """The waiting process hears of it from the store (a poll), not only at its next progress round (a minute here);
    a poll reads what was appended since the last one, or the waiters' states when it fell far behind."""
    gate, runs, ledger = world
    if rescan:
        monkeypatch.setattr(approvals, "POLL_RESCAN_EVENTS", 0)
    async with stores.new() as other_ledger:
        other_broker = ApprovalBroker(ledger=other_ledger, directory=gate.broker.directory, poll_interval_s=0.05)
        other = Gate(ledger=other_ledger, broker=other_broker, policy=gate.policy,
                     classify_context=ClassifyContext(), progress_interval_s=60)
        write = gate.tools["write_thing"]  # type: ignore[attr-defined]

        async with agent() as calls:
            calls.tg.start_soon(other_broker.poll_store)
            held = {key: calls.call(other, write, {"key": key}, AGENT) for key in ("first", "second", "third")}
            for call in held.values():
                await call.request()

            async def polled_since() -> bool:  # three held calls, and a poll since (the next one reads what is new)
                return other_broker.feed.last_seq is not None

            await ledger_until(other_ledger, polled_since)
            await ledger.append("unrelated", None, {})  # the head moves on: the next poll looks
            first = await held["first"].request()
            await gate.broker.decide(Verdict(request_id=first.id, reviewer="api:alice", verdict="approve"))
            result = await held["first"].result()
            assert runs.count == 1 and not result.is_error
            second = await held["second"].request()
            await gate.broker.decide(Verdict(request_id=second.id, reviewer="api:alice", verdict="deny",
                                             reason="not today"))
            result = await held["second"].result()
            assert result.is_error and "not today" in result.content[0].text  # type: ignore[union-attr]
            calls.stop()
    assert runs.count == 1  # the third still waits (and was never woken into running)


async def test_a_tool_error_quoting_a_declared_secret_is_masked_everywhere(world: tuple[Gate, Runs, Store]) -> None:
    gate, _, ledger = world
    token = "hunter2"

    @guarded_tool(name="read_with_token", classifiers={"value": "secret"})
    async def read_with_token(value: str) -> str:
        raise RuntimeError(f"upstream refused credentials {value}")

    result = await gate.call(read_with_token, {"value": token}, AGENT)
    assert result.is_error
    assert token not in result.content[0].text  # type: ignore[union-attr]
    events = await ledger.tail(1000)
    assert not any(token in str(e.payload) for e in events)
    assert any(e.kind == "failed" for e in events)


async def test_a_secret_quoted_by_another_argument_is_masked_there_too(world: tuple[Gate, Runs, Store]) -> None:
    gate, runs, ledger = world

    @guarded_tool(name="read_db")
    async def read_db(password: str, command: str) -> str:
        runs.count += 1
        return "done"

    result = await gate.call(read_db, {"password": "s3cr3t-pw", "command": "mysql -ps3cr3t-pw -e 'select 1'"}, AGENT)
    assert not result.is_error and runs.count == 1  # what runs is the real arguments
    events = await ledger.tail(1000)
    assert not any("s3cr3t-pw" in str(e.payload) for e in events)
    view = await ledger.get_call(next(e.call_id for e in events if e.kind == "call.received") or "")
    assert view is not None and view.arguments == {"password": "«redacted»", "command": "mysql -p«redacted» -e 'select 1'"}


async def test_a_short_secret_changes_nothing_the_policy_said(world: tuple[Gate, Runs, Store]) -> None:
    """A secret is masked in the decision's reasons and facts; the outcome, risk, rules and digest are the policy's."""
    gate, runs, ledger = world

    @guarded_tool(name="read_login")
    async def read_login(user: str, password: str) -> str:
        runs.count += 1
        return "ok"

    result = await gate.call(read_login, {"user": "bob", "password": "ow"}, AGENT)  # "ow" is in "allow" and "low"
    assert not result.is_error and runs.count == 1
    assert await terminal_kinds(ledger) == ["executed"]
    decision = next(e for e in await ledger.tail(1000) if e.kind == "decision")
    assert (decision.payload["outcome"], decision.payload["risk"]) == ("allow", "low")
    assert decision.payload["policy_digest"] == gate.policy.current.digest
    assert decision.payload["rules"] == [{"id": "reads", "outcome": "allow", "risk": "low", "reason": "reads run"}]


# -- what the tool declares it would refuse ----------------------------------------------------------------------


async def test_a_call_the_tool_would_refuse_is_denied_by_keyturn_before_the_policy(
        world: tuple[Gate, Runs, Store]) -> None:
    """Even under a rule that holds every write for a human: the tool's own refusal ends the call at once, with one
    terminal event and nobody asked, and the agent is told the ledger's word for it."""
    gate, runs, ledger = world
    asked: list[dict[str, Any]] = []

    @guarded_tool(name="write_refusing", classifiers={"key": "secret"})
    async def write_refusing(key: str, note: str = "") -> str:
        runs.count += 1
        return "written"

    @write_refusing.refuses
    def _refuses(args: dict[str, Any]) -> str | None:
        asked.append(args)
        return "this store is read-only" if args["note"] == "write" else None

    with anyio.fail_after(10):  # a held call would wait ten minutes
        result = await gate.call(write_refusing, {"key": "sk-live-0123456789abcdef0123", "note": "write"}, AGENT)
    meta = (result.meta or {})["io.keyturn/outcome"]
    assert result.is_error and runs.count == 0 and asked == [{"key": "sk-live-0123456789abcdef0123", "note": "write"}]
    assert meta["outcome"] == "denied" and meta["by"] == "keyturn" and meta["code"] == "tool_refuses", meta
    assert result.content[0].text == "Denied by keyturn: write_refusing would refuse it: this store is read-only"  # type: ignore[union-attr]
    events = await ledger.events(meta["call_id"])
    assert [e.kind for e in events] == ["call.received", "denied"]
    assert events[1].payload == {"by": "keyturn", "code": "tool_refuses", "reason": meta["reason"]}
    assert events[0].payload["arguments"]["note"] == "write"
    assert "sk-live-0123456789abcdef0123" not in str(events[0].payload)  # kept like any call's: redacted
    view = await ledger.get_call(meta["call_id"])
    assert view is not None and view.state == "denied" and view.policy_digest is None
    assert not any(e.kind == "approval.requested" for e in await ledger.tail(100))


async def test_a_refusal_check_that_fails_denies_and_a_refusal_of_nothing_goes_to_the_policy(
        world: tuple[Gate, Runs, Store]) -> None:
    gate, runs, ledger = world

    @guarded_tool(name="read_checked")
    async def read_checked(key: str) -> str:
        runs.count += 1
        return "read"

    @read_checked.refuses
    def _refuses(args: dict[str, Any]) -> str | None:
        if args["key"] == "boom":
            raise RuntimeError("the check broke")
        return None

    broken = await gate.call(read_checked, {"key": "boom"}, AGENT)
    meta = (broken.meta or {})["io.keyturn/outcome"]
    assert broken.is_error and runs.count == 0  # fail closed
    assert meta["outcome"] == "denied" and meta["by"] == "keyturn" and meta["code"] == "error", meta
    fine = await gate.call(read_checked, {"key": "a"}, AGENT)
    assert not fine.is_error and runs.count == 1
    assert await terminal_kinds(ledger) == ["denied", "executed"]


async def test_invalid_arguments_end_as_denied_by_keyturn_in_the_ledger_and_to_the_agent(
        world: tuple[Gate, Runs, Store]) -> None:
    gate, runs, ledger = world
    result = await gate.call(gate.tools["read_thing"], {"key": 7, "extra": 1}, AGENT)  # type: ignore[attr-defined]
    meta = (result.meta or {})["io.keyturn/outcome"]
    assert result.is_error and runs.count == 0
    assert (meta["outcome"], meta["by"], meta["code"]) == ("denied", "keyturn", "invalid_arguments")
    assert result.content[0].text.startswith("Denied by keyturn: invalid arguments: ")  # type: ignore[union-attr]
    assert await terminal_kinds(ledger) == [meta["outcome"]]
