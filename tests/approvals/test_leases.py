"""Liveness by leases in the database (PostgreSQL): an instance is alive while its lease runs, renewed by its
heartbeat and counted on the database's clock; a call held by an instance whose lease ended stays open for the rejoin
window, and an approval that arrives meanwhile waits; the agent's retry through another instance takes the call
over; only after the window is the call `abandoned`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from server.approvals import ApprovalBroker, directory_from
from server.ledger import Store
from server.models import ReviewSpec, Verdict
from tests.pg import Cluster
from tests.stores import Stores

DIRECTORY = directory_from([("api:alice", "alice")], {"alice": []})


@pytest.fixture
def pg(tmp_path: object, postgres: Cluster) -> Stores:
    return Stores("postgres", tmp_path, postgres)  # type: ignore[arg-type]


@pytest.fixture
async def ledger(pg: Stores) -> AsyncIterator[Store]:
    async with pg.new() as opened:
        yield opened


async def held_by(ledger: Store, call_id: str, holder: str) -> None:
    await ledger.open_call(call_id=call_id, tool="write_thing", principal="agent", on_behalf_of=None, model=None,
                           args_hash=f"hash-{call_id}", redacted_arguments={"key": call_id}, state="pending",
                           holder=holder, events=[("call.received", {}), ("approval.requested", {})],
                           review=ReviewSpec(), expires=None)


def lease_ended(pg: Stores, instance: str, seconds_ago: float) -> None:
    """As if `instance` stopped renewing its lease that long ago (the database's clock)."""
    pg.tamper(f"UPDATE instances SET lease_until = extract(epoch FROM clock_timestamp())::float8 - {seconds_ago}"
              f" WHERE id = '{instance}'")


async def test_a_lease_says_who_is_alive_by_the_database_s_clock(ledger: Store, pg: Stores) -> None:
    await ledger.register_instance("a", "host-a", 1)
    await ledger.register_instance("b", "host-b", 1)  # the same pid on another machine: pids say nothing here
    lease_ended(pg, "b", 1)
    rows = {r["id"]: r for r in await ledger.instances()}
    assert rows["a"]["alive"] and not rows["b"]["alive"] and 1 <= rows["b"]["dead_for"] < 30
    await ledger.heartbeat("b")  # renewed: alive again
    assert all(r["alive"] for r in await ledger.instances())


async def test_a_dead_holder_s_call_waits_out_the_rejoin_window_and_is_taken_over_by_the_retry(
        ledger: Store, pg: Stores) -> None:
    broker = ApprovalBroker(ledger=ledger, directory=DIRECTORY, rejoin_window_s=60)
    await ledger.register_instance(broker.instance_id, "here", 1)
    await ledger.register_instance("holder", "there", 1)
    await ledger.register_instance("long-gone", "there", 2)
    await held_by(ledger, "left-behind", "holder")  # nobody calls again for this one
    await held_by(ledger, "in-window", "holder")
    await held_by(ledger, "past-window", "long-gone")
    assert await broker.abandon_orphans() == []  # every lease runs

    lease_ended(pg, "holder", 5)  # killed 5 s ago: within the window
    lease_ended(pg, "long-gone", 120)  # past it
    assert await broker.abandon_orphans() == ["past-window"]
    assert (await ledger.call_states(["in-window"])) == {"in-window": "pending"}
    assert "long-gone" not in {r["id"] for r in await ledger.instances()}

    # A reviewer approves while nobody holds the call: the approval waits; nothing runs it.
    vote = await broker.decide(Verdict(request_id="in-window", reviewer="api:alice", verdict="approve"))
    assert vote.accepted and vote.state == "approved" and "waiting for the agent" in vote.message
    assert await broker.abandon_orphans() == []
    # The agent calls again through this instance: it takes the call over; the approval is there to run, once.
    view = await broker.rejoin("agent", "write_thing", "hash-in-window", None, broker.instance_id)  # type: ignore[arg-type]
    assert view is not None and view.state == "approved"
    assert await ledger.holder("in-window") == broker.instance_id
    claims = [await ledger.transition("in-window", ("approved",), "running", "execution.started", {})
              for _ in range(3)]
    assert claims == [True, False, False]
    lease_ended(pg, "holder", 600)  # the window has passed: the call taken over is this instance's, not an orphan
    assert await broker.abandon_orphans() == ["left-behind"]
    assert (await ledger.call_states(["in-window"])) == {"in-window": "running"}
    kinds = [e.kind for e in await ledger.events("in-window")]
    assert kinds.count("call.rejoined") == 1 and "abandoned" not in kinds
