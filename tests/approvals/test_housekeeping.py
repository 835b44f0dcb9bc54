"""Housekeeping reads only what it acts on: expired requests (longest expired first, a batch per round) and the
open calls of other processes, so its cost does not grow with the number of calls this process holds."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from server.approvals import ApprovalBroker, ReviewerDirectory
from server.approvals import broker as approvals
from server.ledger import Store
from server.ledger import shared as shared_module
from tests.stores import Stores

DIRECTORY = ReviewerDirectory(identities={}, groups_of={})


@pytest.fixture
async def ledger(stores: Stores) -> AsyncIterator[Store]:
    async with stores.new() as ledger:
        yield ledger


async def open_call(ledger: Store, call_id: str, *, state: str = "pending", expires: float | None = None,
                    holder: str | None = None) -> None:
    await ledger.open_call(call_id=call_id, tool="write_thing", principal="agent", on_behalf_of=None, model=None,
                           args_hash=f"hash-{call_id}", redacted_arguments={"key": call_id}, state=state,
                           holder=holder, events=[("call.received", {})], expires=expires)


async def states(ledger: Store, *ids: str) -> list[str]:
    found = await ledger.call_states(list(ids))
    return [found[i] for i in ids]


async def test_expired_requests_are_expired_longest_expired_first_a_batch_a_round(
        ledger: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(approvals, "SWEEP_BATCH", 2)
    broker = ApprovalBroker(ledger=ledger, directory=DIRECTORY)
    now = time.time()
    for i, age in enumerate([50, 40, 30, 20, 10]):
        await open_call(ledger, f"old-{i}", expires=now - age)
    await open_call(ledger, "approved-old", state="approved", expires=now - 5)
    await open_call(ledger, "fresh", expires=now + 600)
    await open_call(ledger, "no-expiry")
    await open_call(ledger, "running-old", state="running", expires=now - 60)  # not open for review: untouched

    assert await broker.sweep_expired() == 2
    assert await states(ledger, "old-0", "old-1", "old-2") == ["expired", "expired", "pending"]
    assert await broker.sweep_expired() == 2
    assert await broker.sweep_expired() == 2  # old-4 and the approved one
    assert await broker.sweep_expired() == 0
    assert await states(ledger, "old-4", "approved-old", "fresh", "no-expiry", "running-old") == [
        "expired", "expired", "pending", "pending", "running"]
    kinds = [e.kind for e in await ledger.events("old-3")]
    assert kinds.count("expired") == 1


async def test_orphans_of_a_stopped_process_are_abandoned_and_live_ones_kept(ledger: Store) -> None:
    broker = ApprovalBroker(ledger=ledger, directory=DIRECTORY)
    await ledger.register_instance(broker.instance_id, "here", 1)
    await ledger.register_instance("alive", "there", 2)
    await ledger.register_instance("dead", "there", 3)
    await open_call(ledger, "mine", holder=broker.instance_id)
    await open_call(ledger, "alive-pending", holder="alive")
    await open_call(ledger, "dead-pending", holder="dead")
    await open_call(ledger, "dead-running", state="running", holder="dead")
    await open_call(ledger, "nobody")  # no process holds it
    await open_call(ledger, "dead-but-done", state="executed", holder="dead")

    async def alive(row: object) -> bool:
        return row["id"] == "alive"  # type: ignore[index]

    abandoned = await broker.abandon_orphans(alive)
    assert sorted(abandoned) == ["dead-pending", "dead-running", "nobody"]
    assert await states(ledger, "mine", "alive-pending", "dead-pending", "dead-running", "nobody",
                        "dead-but-done") == ["pending", "pending", "abandoned", "abandoned", "abandoned", "executed"]
    [event] = [e for e in await ledger.events("dead-running") if e.kind == "abandoned"]
    assert event.payload["stage"] == "running" and "outcome is unknown" in event.payload["reason"]
    assert {row["id"] for row in await ledger.instances()} == {broker.instance_id, "alive"}


async def test_the_states_of_many_calls_are_all_read_a_chunk_at_a_time(
        ledger: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_module, "CALL_STATES_CHUNK", 2)  # (both stores read call states there)
    for i in range(5):
        await open_call(ledger, f"c{i}", state="pending" if i % 2 else "approved")
    assert await ledger.call_states(["c0", "c1", "c2", "c3", "c4", "missing"]) == {
        "c0": "approved", "c1": "pending", "c2": "approved", "c3": "pending", "c4": "approved"}
    assert await ledger.call_states([]) == {}
