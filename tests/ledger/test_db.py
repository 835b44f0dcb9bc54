"""Where the ledger's work runs: at once on the loop, in the database thread while another process holds the
lock (the loop never waits), long reads on a read-only connection of their own, and WAL checkpoints on their
own thread.

SQLite only: these are the SQLite store's threads, locks and WAL (the PostgreSQL store's are in test_postgres.py)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from server.errors import LedgerError
from server.ledger import Ledger
from server.ledger import db as ledger_db
from server.ledger.db import CHECKPOINT_EVERY
from tests.helpers import eventually


async def test_a_write_waits_off_the_loop_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    async with Ledger(db) as ledger:
        await ledger.append("process.started", None, {"i": 0})
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process writing
        other.execute("INSERT INTO instances(id, host, pid, started, heartbeat) VALUES ('x', 'h', 1, 0, 0)")
        written = anyio.Event()

        async def write() -> None:
            await ledger.append("process.started", None, {"i": 1})
            written.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            with anyio.fail_after(2):
                for _ in range(5):  # the loop goes on while the write waits for the lock (time passes: a sleep)
                    await anyio.sleep(0.02)
                    assert await ledger.get_call("nothing") is None  # and quick reads go on too
            assert not written.is_set()
            other.execute("COMMIT")
            with anyio.fail_after(5):
                await written.wait()
        other.close()
        result = await ledger.verify()
        assert result.ok and result.count == 2


async def test_checkpoints_copy_the_wal_into_the_database_file(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    async with Ledger(db) as ledger:
        before = db.stat().st_size
        for i in range(CHECKPOINT_EVERY + 1):
            await ledger.append("process.started", None, {"i": i, "pad": "x" * 200})
        await eventually(lambda: db.stat().st_size > before, within=10)  # another thread's work: no event to wait on
        assert (await ledger.verify()).ok


async def test_the_busy_timeout_counts_the_wait_for_another_process_not_the_queue_for_the_connection(
        tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    async with Ledger(db, busy_timeout_ms=300) as ledger:
        await ledger.append("process.started", None, {"i": 0})
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process writing, for a moment
        results: list[object] = []

        async def write() -> None:
            try:
                results.append(await ledger.append("process.started", None, {"i": 1}))
            except LedgerError as e:
                results.append(e)

        async with anyio.create_task_group() as tg:
            # The connection is busy in the database thread (a long read) for longer than the busy timeout.
            tg.start_soon(ledger._run, lambda conn: time.sleep(0.6))
            await anyio.sleep(0.05)
            tg.start_soon(write)
            await anyio.sleep(0.65)  # the read is over; the write now waits on the other process's lock
            other.execute("COMMIT")
        other.close()
        assert len(results) == 1 and not isinstance(results[0], LedgerError), results
        assert (await ledger.verify()).count == 2


async def test_a_lock_held_past_the_busy_timeout_fails_the_write(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    async with Ledger(db, busy_timeout_ms=300) as ledger:
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with anyio.fail_after(5), pytest.raises(LedgerError, match="database is locked"):
            await ledger.append("process.started", None, {})
        other.execute("ROLLBACK")
        other.close()
        await ledger.append("process.started", None, {})  # and the next write goes through


async def test_a_long_read_holds_up_no_write(tmp_path: Path) -> None:
    """A verify of a big ledger takes seconds: agents' calls must not wait for it. Here a long read is held open
    until the writes are done; were writes queued behind it, they would never finish and the test would fail."""
    async with Ledger(tmp_path / "l.db") as ledger:
        await ledger.append("process.started", None, {"i": 0})
        reading, release = threading.Event(), threading.Event()
        seen: list[int] = []

        def long_read(conn: sqlite3.Connection) -> None:
            seen.append(conn.execute("SELECT count(*) FROM events").fetchone()[0])
            reading.set()
            release.wait(timeout=60)
            seen.append(conn.execute("SELECT count(*) FROM events").fetchone()[0])

        async with anyio.create_task_group() as tg:
            tg.start_soon(ledger._db.read, long_read)
            await anyio.to_thread.run_sync(reading.wait, 60)
            with anyio.fail_after(30):  # only a write stuck behind the read would take this long
                for i in range(1, 6):
                    await ledger.append("process.started", None, {"i": i})
                assert len(await ledger.tail(100)) == 6  # quick reads go on too
            release.set()
        assert seen == [1, 1]  # one snapshot for the whole read, whatever was written meanwhile
        result = await ledger.verify()
        assert result.ok and result.count == 6


async def test_the_long_read_connection_cannot_write(tmp_path: Path) -> None:
    async with Ledger(tmp_path / "l.db") as ledger:
        await ledger.append("process.started", None, {})
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            await ledger._db.read(lambda conn: conn.execute("DELETE FROM events"))
        assert (await ledger.verify()).count == 1


async def test_verify_sees_one_snapshot_while_calls_are_recorded(tmp_path: Path) -> None:
    """The chain's head is read after its events, in the same snapshot: writes meanwhile are not 'missing events'."""
    async with Ledger(tmp_path / "l.db") as ledger:
        for i in range(3000):
            await ledger.append("process.started", None, {"i": i})
        results = []

        async def writer() -> None:
            for i in range(300):
                await ledger.append("process.started", None, {"w": i})
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            for _ in range(5):
                results.append(await ledger.verify())
        assert all(r.ok for r in results), [r.message for r in results]
        assert (await ledger.verify()).count == 3300


async def past_the_restart_while_a_read_is_held(ledger: Ledger) -> None:
    """With a read held open: fill the WAL past the restart threshold until a checkpoint is asked for. The
    checkpointer must end its pass (a restart waiting for the read would not, for the 60 s busy timeout), and
    writes must go on meanwhile."""
    checkpointer = ledger._db._checkpointer
    assert checkpointer is not None
    for i in range(CHECKPOINT_EVERY):
        await ledger.append("process.started", None, {"i": i, "pad": "x" * 500})
    await eventually(lambda: checkpointer.passes >= 1, within=30)  # another thread's work: no event to wait on
    with anyio.fail_after(30):
        for i in range(CHECKPOINT_EVERY):
            await ledger.append("process.started", None, {"i": i, "pad": "x" * 500})


async def test_a_long_read_puts_off_the_wal_restart_rather_than_make_writers_wait_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The complete checkpoint that restarts a long WAL waits for readers, and writers wait while it does: it is
    not run while this process reads. Were it run, these writes would wait for the held read and time out."""
    monkeypatch.setattr(ledger_db, "WAL_RESTART_FRAMES", 20)
    db = tmp_path / "l.db"
    async with Ledger(db, busy_timeout_ms=60_000) as ledger:
        await ledger.append("process.started", None, {})
        reading, release = threading.Event(), threading.Event()

        def long_read(conn: sqlite3.Connection) -> None:
            conn.execute("SELECT count(*) FROM events").fetchone()
            reading.set()
            release.wait(timeout=120)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ledger._db.read, long_read)
            await anyio.to_thread.run_sync(reading.wait, 60)
            await past_the_restart_while_a_read_is_held(ledger)
            release.set()
        for i in range(CHECKPOINT_EVERY):  # the read is over: the next checkpoints restart the WAL
            await ledger.append("process.started", None, {"j": i})
        wal = db.with_name(db.name + "-wal")
        await eventually(lambda: wal.stat().st_size == 0, within=30)  # another thread's work: no event to wait on
        assert (await ledger.verify()).count == 1 + 3 * CHECKPOINT_EVERY


async def test_another_process_s_long_read_holds_up_the_wal_restart_only_briefly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An auditor's `keyturn audit verify` in another process is a reader this process cannot see: the restart
    waits for it only `RESTART_WAIT_MS`, then gives up until later, and writers go on."""
    monkeypatch.setattr(ledger_db, "WAL_RESTART_FRAMES", 20)
    db = tmp_path / "l.db"
    async with Ledger(db, busy_timeout_ms=60_000) as ledger:
        await ledger.append("process.started", None, {})
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN")
        other.execute("SELECT count(*) FROM events").fetchone()  # a read transaction, held
        await past_the_restart_while_a_read_is_held(ledger)
        other.execute("ROLLBACK")
        other.close()
        assert (await ledger.verify()).count == 1 + 2 * CHECKPOINT_EVERY
