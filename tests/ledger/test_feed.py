"""The ledger's one feed: a follower is woken by this process's commits of the kinds it wants, and reads what any
process appended after the last event it saw. On PostgreSQL another process's commit wakes the follower too (NOTIFY)."""

from __future__ import annotations

import anyio

from tests.stores import Stores


async def test_a_local_commit_of_a_wanted_kind_wakes_the_follower_at_once(stores: Stores) -> None:
    async with stores.new() as ledger:
        feed = ledger.follow({"vote"})
        await feed.start()
        await ledger.append("notified", "c1", {})  # not wanted: no wake-up
        assert not await feed.wait(0.05)
        await ledger.append("vote", "c1", {"n": 1})
        with anyio.fail_after(1):
            assert await feed.wait(30)  # woken, not timed out
        events = await feed.read()
        assert [(e.kind, e.payload) for e in events] == [("vote", {"n": 1})]
        assert feed.last_seq == 2  # past the unwanted event too
        assert await feed.read() == []
        feed.close()
        await ledger.append("vote", "c1", {"n": 2})
        assert not await feed.wait(0.05)  # closed: no longer woken


async def test_another_process_s_appends_are_read_at_the_next_look(stores: Stores) -> None:
    async with stores.new() as ledger, stores.new() as other:
        woken: list[str] = []
        feed = ledger.follow({"approval.granted", "call.rejoined"}, on_local=lambda es: woken.extend(e.kind for e in es))
        assert await feed.start() == 0
        await other.append("approval.granted", "c1", {})
        await other.append("vote", "c2", {})
        await other.append("call.rejoined", "c3", {})
        if stores.postgres:  # another instance's commit wakes the follower (NOTIFY), never its on_local
            with anyio.fail_after(10):
                assert await feed.wait(30)
        else:
            assert not await feed.wait(0.05)  # another process's commit wakes nobody here: the poll finds it
        assert woken == []
        assert [e.call_id for e in await feed.read()] == ["c1", "c3"]

        async def rescan() -> set[str]:
            return {"rescanned"}

        assert await ledger.follow({"call.rejoined"}).calls_changed(rescan, 100) == {"rescanned"}  # a first look
        await other.append("call.rejoined", "c4", {})
        await other.append("vote", "c5", {})
        assert await feed.calls_changed(rescan, 100) == {"c4"}
        assert await feed.calls_changed(rescan, 100) == set()  # the head has not moved
        await other.append("call.rejoined", "c6", {})
        assert await feed.calls_changed(rescan, 0) == {"rescanned"}  # too far behind: a rescan
        await ledger.append("call.rejoined", "c7", {})
        assert woken == ["call.rejoined"]


async def test_a_long_backlog_is_read_in_rounds(stores: Stores) -> None:
    async with stores.new() as ledger:
        feed = ledger.follow({"vote"})
        await feed.start()
        async with stores.new() as other:
            for i in range(25):
                await other.append("vote", f"c{i}", {})
        first = await feed.read(limit=10)
        assert len(first) == 10 and await feed.wait(0)  # more to read: it woke itself (or, on PostgreSQL, NOTIFY did)
        rest = [*await feed.read(limit=10), *await feed.read(limit=10)]
        assert [e.call_id for e in first + rest] == [f"c{i}" for i in range(25)]
