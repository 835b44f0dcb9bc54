"""Where the ledger's work runs: at once on the loop, in the database thread while another process holds the
lock (the loop never waits), and WAL checkpoints on their own thread."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio

from server.ledger import Ledger
from server.ledger_db import CHECKPOINT_EVERY


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
                for _ in range(5):  # the loop goes on while the write waits for the lock
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
        with anyio.fail_after(10):
            while db.stat().st_size <= before:  # another thread's work: no event to wait on
                await anyio.sleep(0.02)
        assert (await ledger.verify()).ok
