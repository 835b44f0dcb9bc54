"""The ledger: a hash chain that notices edits and deletions, atomic transitions, and one chain across processes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from server.errors import LedgerError
from server.ledger import Ledger
from server.models import TERMINAL_EVENTS, TERMINAL_STATES
from server.outcomes import OUTCOMES
from tests.stores import Stores


async def open_ledger(path: Path) -> Ledger:
    return await Ledger(path).open()


async def test_events_chain_and_verify(stores: Stores) -> None:
    async with stores.new() as ledger:
        for i in range(5):
            await ledger.append("process.started", None, {"i": i})
        result = await ledger.verify()
        assert result.ok and result.count == 5
        events = await ledger.tail(5)
        assert [e.seq for e in events] == [1, 2, 3, 4, 5]
        assert all(events[i].prev_hash == events[i - 1].hash for i in range(1, 5))


async def test_verify_names_the_first_altered_or_missing_event(stores: Stores) -> None:
    async with stores.new() as ledger:
        for i in range(6):
            await ledger.append("process.started", None, {"i": i})
    stores.tamper("UPDATE events SET payload = '{\"i\":99}' WHERE seq = 3")
    async with stores.new() as ledger:
        result = await ledger.verify()
    assert not result.ok and result.first_bad_seq == 3
    stores.tamper("UPDATE events SET payload = '{\"i\":2}' WHERE seq = 3;"
                  "DELETE FROM events WHERE seq = 6")  # the newest: only the head record notices
    async with stores.new() as ledger:
        result = await ledger.verify()
    assert not result.ok and result.first_bad_seq == 6


async def test_transition_is_won_once_and_terminal_states_never_move(stores: Stores) -> None:
    async with stores.new() as ledger:
        await ledger.open_call(call_id="c1", tool="t", principal="p", on_behalf_of=None, model=None, args_hash="h",
                               redacted_arguments={}, state="approved", holder="me", events=[("call.received", {})])
        results = []

        async def claim() -> None:
            results.append(await ledger.transition("c1", ("approved",), "running", "execution.started", {}))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(claim)
        assert results.count(True) == 1
        assert await ledger.finish("c1", "executed", {})
        assert not await ledger.finish("c1", "failed", {})
        kinds = [e.kind for e in await ledger.events("c1")]
        assert kinds == ["call.received", "execution.started", "executed"]


async def test_calls_are_counted_by_state_up_to_a_cap_without_reading_them(stores: Stores) -> None:
    async with stores.new() as ledger:
        for i, state in enumerate(["pending", "pending", "pending", "approved", "executed"]):
            await ledger.open_call(call_id=f"c{i}", tool="t", principal="p", on_behalf_of=None, model=None,
                                   args_hash=f"h{i}", redacted_arguments={}, state=state, holder="me",
                                   events=[("call.received", {})])
        assert await ledger.count_calls(("pending",)) == 3
        assert await ledger.count_calls(("pending", "approved")) == 4
        assert await ledger.count_calls(("pending",), limit=2) == 2
        assert await ledger.count_calls(("denied",)) == 0
        assert await ledger.count_calls(("pending",)) == len(await ledger.list_calls(("pending",)))


@pytest.mark.parametrize("outcome", sorted(OUTCOMES))
async def test_finish_ends_a_call_once_as_its_outcome_says(stores: Stores, outcome: str) -> None:
    """Every way a call ends is one row of the outcomes table, written by `finish` alone: the call's final state and
    its one terminal event, in one transaction; a second end of any kind, concurrent or later, writes nothing."""
    end = OUTCOMES[outcome]
    async with stores.new() as ledger:
        await ledger.open_call(call_id="c1", tool="t", principal="p", on_behalf_of=None, model=None, args_hash="h",
                               redacted_arguments={}, state=end.ends[0], holder="me", events=[("call.received", {})])
        results: list[bool] = []

        async def finish(name: str) -> None:
            results.append(await ledger.finish("c1", name, {"i": name}, reason=f"because {name}"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(finish, outcome)
            for other in sorted(OUTCOMES):
                tg.start_soon(finish, other)
        assert results.count(True) == 1
        view = await ledger.get_call("c1")
        assert view is not None and view.state == end.state
        terminal = [e for e in await ledger.events("c1") if e.kind in TERMINAL_EVENTS]
        assert len(terminal) == 1 and terminal[0].kind == end.kind
        assert view.outcome_reason == f"because {terminal[0].payload['i']}"
        assert all(OUTCOMES[o].state in TERMINAL_STATES for o in OUTCOMES)


async def test_nothing_but_finish_writes_a_call_s_end(stores: Stores) -> None:
    async with stores.new() as ledger:
        await ledger.open_call(call_id="c1", tool="t", principal="p", on_behalf_of=None, model=None, args_hash="h",
                               redacted_arguments={}, state="running", holder="me", events=[("call.received", {})])
        with pytest.raises(LedgerError, match="finish"):
            await ledger.transition("c1", ("running",), "executed", "executed", {})
        with pytest.raises(LedgerError, match="finish"):
            await ledger.append("failed", "c1", {})
        with pytest.raises(LedgerError, match="finish"):
            await ledger.mutate_call("c1", lambda tx, row: tx.set_state("c1", "denied"))
        view = await ledger.get_call("c1")
        assert view is not None and view.state == "running"
        assert [e.kind for e in await ledger.events("c1")] == ["call.received"]
        assert not await ledger.finish("c1", "denied_by_reviewer", {})  # a running call is not ended by a reviewer
        assert await ledger.finish("c1", "failed", {})


def test_two_processes_appending_keep_one_chain(stores: Stores) -> None:
    db = stores.where("shared")
    script = textwrap.dedent(f"""
        import anyio, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from server.config import Settings
        from server.ledger.opening import store_for
        async def main():
            async with store_for(Settings(db={db!r})) as ledger:
                for i in range(200):
                    await ledger.append("process.started", None, {{"writer": sys.argv[1], "i": i}})
        anyio.run(main)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, name]) for name in ("a", "b", "c")]
    assert all(p.wait(60) == 0 for p in procs)

    async def check() -> None:
        async with stores.new("shared") as ledger:
            result = await ledger.verify()
            assert result.ok and result.count == 600, result.message

    anyio.run(check)


async def test_a_read_only_database_fails_closed_with_a_ledger_error(tmp_path: Path) -> None:
    # SQLite only: it turns on SQLite's query_only on the store's own connection (PostgreSQL: tests/ledger/test_postgres.py).
    db = tmp_path / "l.db"
    async with Ledger(db) as ledger:
        await ledger.append("process.started", None, {})
    async with Ledger(db) as ledger:
        await ledger._run(lambda conn: conn.execute("PRAGMA query_only = ON"))
        with pytest.raises(LedgerError):
            await ledger.append("process.started", None, {})


def test_the_chain_link_is_the_canonical_json_of_the_event() -> None:
    import math

    from server.canonical import canonical_json, sha256_hex
    from server.ledger import event_hash

    payloads = ['{"a":1}', '{"q":"SELECT \\"x\\" FROM t -- é ✓ \\u0000"}', "", "\\", '"\n\t\u2028']
    for seq, ts, kind, call_id in [(1, 0.0, "decision", None), (2**40, 1795314156.4804032, "call.received", "ab" * 16),
                                   (7, -1e-310, 'k"\\', "é\u0001"), (3, 1e22, "x", "")]:
        for payload in payloads:
            body = canonical_json({"seq": seq, "ts": ts, "kind": kind, "call_id": call_id, "payload": payload})
            assert event_hash("f" * 64, seq, ts, kind, call_id, payload) == sha256_hex("f" * 64 + body)
    with pytest.raises(ValueError):  # not representable: refused, as canonical JSON refuses it
        event_hash("0" * 64, 1, math.nan, "k", None, "{}")


async def test_a_version_1_ledger_is_migrated_and_open_requests_are_found_by_their_own_index(tmp_path: Path) -> None:
    # SQLite only: SQLite's own migrations and query plans (PostgreSQL's: tests/ledger/test_postgres.py).
    from server.ledger import MIGRATIONS

    db = tmp_path / "l.db"
    with sqlite3.connect(db) as conn:  # a ledger written by keyturn before migration 2
        conn.executescript(MIGRATIONS[0] + "; CREATE TABLE schema_version (version INTEGER NOT NULL);"
                           " INSERT INTO schema_version VALUES (1);")
    async with Ledger(db) as ledger:
        await ledger.open_call(call_id="c1", tool="t", principal="p", on_behalf_of=None, model=None, args_hash="h",
                               redacted_arguments={}, state="pending", holder=None, events=[("call.received", {})])
        found = await ledger.find_open("p", "t", "h")
        assert found is not None and found.id == "c1"
        assert await ledger.finish("c1", "expired", {})
        assert await ledger.find_open("p", "t", "h") is None
    with sqlite3.connect(db) as conn:
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        plan = " ".join(str(r) for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM calls WHERE principal = 'p' AND tool = 't' AND args_hash = 'h'"
            " AND state IN ('pending','approved') ORDER BY created LIMIT 1"))
        assert max(r[0] for r in conn.execute("SELECT version FROM schema_version")) == len(MIGRATIONS)
    assert "calls_open_same" in indexes and "calls_same" not in indexes and "events_kind" not in indexes
    assert "calls_open_same" in plan


async def test_a_call_s_chain_is_proven_against_what_this_process_verified(stores: Stores) -> None:
    """`call_chain` verifies what was appended since its last proof, and checks the call's own events against the
    hashes they had when verified: an event changed later, even with its own hash recomputed, or removed, is named,
    at every proof that meets it."""
    from server.canonical import canonical_json
    from server.ledger.chain import event_hash

    async with stores.new() as ledger:
        for i in range(3):
            await ledger.append("call.received", "a", {"i": i})
            await ledger.append("vote", "b", {"i": i})
        events, broken = await ledger.call_chain("a")
        assert broken is None and [e.seq for e in events] == [1, 3, 5]
        await ledger.append("vote", "b", {"i": 3})
        events, broken = await ledger.call_chain("b")
        assert broken is None and [e.seq for e in events] == [2, 4, 6, 7]

        [(prev, ts)] = stores.tamper("SELECT prev_hash, ts FROM events WHERE seq = 4")
        forged = canonical_json({"i": 99})
        stores.tamper(f"UPDATE events SET payload = '{forged}', "
                      f"hash = '{event_hash(prev, 4, float(ts), 'vote', 'b', forged)}' WHERE seq = 4")
        for _ in range(2):
            assert await ledger.call_chain("b") == ([], "event 4 (vote) changed after it was verified")
        stores.tamper("DELETE FROM events WHERE seq = 3")
        assert await ledger.call_chain("a") == ([], "event 3 is missing from the chain")
        assert await ledger.call_chain("a") == ([], "event 3 is missing from the chain")
        await ledger.append("vote", "c", {})  # a call whose own stretch is whole is still proven
        events, broken = await ledger.call_chain("c")
        assert broken is None and [e.seq for e in events] == [8]


async def test_a_store_whose_last_head_is_stale_appends_after_the_other_s_events(stores: Stores) -> None:
    """A store links its next event to the head it committed last, without reading it; when another store (another
    process) appended meanwhile, that event's number is taken, and the transaction runs again from the real head."""
    async with stores.new("shared") as first, stores.new("shared") as second:
        for i in range(5):
            await first.append("process.started", None, {"by": "first", "i": i})
            await first.open_call(call_id=f"c{i}", tool="t", principal="p", on_behalf_of=None, model=None,
                                  args_hash="h", redacted_arguments={}, state="allowed", holder="x",
                                  events=[("call.received", {"i": i}), ("decision", {"i": i})])
            await second.append("process.started", None, {"by": "second", "i": i})
            assert await second.finish(f"c{i}", "executed", {"i": i})
        result = await first.verify()
        assert result.ok and result.count == 25, result.message
        assert [e.seq for e in await first.events(limit=100)] == list(range(1, 26))
        assert [e.kind for e in await first.events("c4")] == ["call.received", "decision", "executed"]


async def test_events_deleted_at_the_tail_behind_a_running_store_stay_a_gap(tmp_path: Path) -> None:
    """The tail and the head row deleted while the store runs: its next append links to the head it committed, so
    the deletion is a gap that verify names, not a shorter chain that goes on as if whole."""
    async with Ledger(tmp_path / "l.db") as ledger:
        for i in range(5):
            await ledger.append("process.started", None, {"i": i})
        with sqlite3.connect(tmp_path / "l.db") as conn:
            [(h3,)] = conn.execute("SELECT hash FROM events WHERE seq = 3")
            conn.execute("DELETE FROM events WHERE seq > 3")
            conn.execute("UPDATE chain_head SET seq = 3, hash = ? WHERE id = 1", (h3,))
        event = await ledger.append("process.started", None, {"i": 5})
        assert event.seq == 6
        result = await ledger.verify()
        assert not result.ok and result.first_bad_seq == 4 and "event 4 is missing" in result.message
