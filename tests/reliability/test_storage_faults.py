"""The ledger's storage fails: its disk is full (a real, tiny tmpfs filled to the last byte), or another
process holds SQLite's write lock (`BEGIN EXCLUSIVE`). Calls fail closed with a clear error and nothing
runs; reviewers get a clear 503; when the fault clears keyturn recovers without a restart, and every call
it recorded ends in exactly one outcome."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import ReviewerAPI, agent_client
from tests.helpers import eventually, outcome_of
from tests.reliability.conftest import RelHome, text

DISK_BYTES = 8 * 1024 * 1024


@contextmanager
def tiny_disk(path: Path) -> Iterator[Path]:
    """A real filesystem of DISK_BYTES mounted at `path` (tmpfs; the suite runs as root in CI)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0700", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test (needs root or CAP_SYS_ADMIN): {mounted.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(disk: Path) -> Path:
    """Write a file until the filesystem has no byte left (ENOSPC)."""
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    return filler


def free_bytes(disk: Path) -> int:
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


async def approve_and_wait(api: ReviewerAPI, request_id: str, results: dict[str, Any], key: str) -> None:
    r = await api.vote(request_id, "approve", "alice", "storage is back")
    assert r.status_code == 200, r.text
    await eventually(lambda: key in results)


async def test_disk_full_fails_calls_closed_with_a_clear_error_and_keyturn_recovers_when_space_returns(
        rhome: RelHome) -> None:
    disk = rhome.dir / "disk"
    with tiny_disk(disk):
        rhome.db = disk / "ledger.db"
        rhome.configure(db=str(rhome.db))
        base = rhome.serve_http()
        api = ReviewerAPI(base)
        results: dict[str, Any] = {}
        with anyio.fail_after(120):
            async with agent_client(base) as client, anyio.create_task_group() as tg:
                assert not (await client.call_tool("probe_run", {"tag": "allow-before"})).is_error

                async def call(tool: str, tag: str) -> None:
                    async with agent_client(base) as own:
                        results[tag] = await own.call_tool(tool, {"tag": tag})

                tg.start_soon(call, "probe_run", "hold-before")  # held before the disk fills
                tg.start_soon(call, "probe_block", "allow-running")  # running when the disk fills
                held = await api.wait_pending("probe_run")
                await eventually(lambda: [r["tag"] for r in rhome.runs()] == ["allow-before", "allow-running"])

                filler = fill(disk)
                assert free_bytes(disk) == 0
                for tag in ("allow-full", "hold-full", "deny-full"):
                    result = await client.call_tool("probe_run", {"tag": tag})
                    assert result.is_error, tag
                    said = text(result)
                    assert "could not record this call, so it did not run" in said or "Denied by policy" in said, said
                    assert "Traceback" not in said
                full = text(await client.call_tool("probe_run", {"tag": "allow-full-2"}))
                assert "database or disk is full" in full, full
                assert str(rhome.db) not in full and str(rhome.dir) not in full  # the cause, never where it lives
                refused = await api.vote(held["id"], "approve", "alice", "while the disk is full")
                assert refused.status_code == 503 and refused.json()["code"] == "ledger_unavailable", refused.text
                assert "database or disk is full" in refused.json()["error"]
                assert str(rhome.dir) not in refused.text
                assert (await api.pending())[0]["id"] == held["id"]  # reads still work, nothing was decided
                rhome.open_gate("allow-running")  # the running tool finishes while nothing can be recorded
                await eventually(lambda: "allow-running" in results)
                finished = results["allow-running"]
                assert finished.is_error and "did not run" not in text(finished), text(finished)
                assert "ran" in text(finished) and "could not record" in text(finished)
                assert [r["tag"] for r in rhome.runs()] == ["allow-before", "allow-running", "allow-running"]

                filler.unlink()  # the fault clears: no restart
                after = await client.call_tool("probe_run", {"tag": "allow-after"})
                assert not after.is_error, text(after)
                await approve_and_wait(api, held["id"], results, "hold-before")
                assert not results["hold-before"].is_error, text(results["hold-before"])
                # The run whose outcome could not be recorded gets its outcome once the disk has room again.
                running_id = next(c for c, s in rhome.calls().items()
                                  if c not in (held["id"],) and s in ("allowed", "running", "executed")
                                  and any(e["kind"] == "call.received" and e["payload"]["arguments"]["tag"]
                                          == "allow-running" for e in rhome.ledger_events(c)))
                await eventually(lambda: rhome.calls()[running_id] == "executed", within=30)
        ran = [r["tag"] for r in rhome.runs() if r.get("phase") != "started"]
        assert ran == ["allow-before", "allow-running", "allow-after", "hold-before"]
        log = rhome.log_text()
        assert "database or disk is full" in log
        rhome.stop_all()
        rhome.verify()
        outcomes = rhome.assert_one_outcome_each()
        assert sorted(outcomes.values()) == ["executed"] * 4


def hold_write_lock(db: Path) -> subprocess.Popen[str]:
    """Another process that takes SQLite's write lock on the ledger (BEGIN EXCLUSIVE) until told to let go."""
    script = (
        "import sqlite3, sys\n"
        f"conn = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
        "conn.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
        "conn.execute('ROLLBACK')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def release(proc: subprocess.Popen[str]) -> None:
    proc.communicate("\n", timeout=10)


async def test_a_ledger_locked_by_another_process_fails_calls_closed_and_keyturn_recovers_when_it_is_released(
        rhome: RelHome) -> None:
    base = rhome.serve_http()
    api = ReviewerAPI(base)
    results: dict[str, Any] = {}
    with anyio.fail_after(120):
        async with agent_client(base) as client, anyio.create_task_group() as tg:
            async def held_call() -> None:
                async with agent_client(base) as own:
                    results["hold-before"] = await own.call_tool("probe_run", {"tag": "hold-before"})

            tg.start_soon(held_call)
            held = await api.wait_pending("probe_run")
            locker = await anyio.to_thread.run_sync(hold_write_lock, rhome.db)
            try:
                for tag in ("allow-locked", "hold-locked"):
                    result = await client.call_tool("probe_run", {"tag": tag})
                    assert result.is_error and "could not record this call, so it did not run" in text(result)
                    assert "database is locked" in text(result) and "Traceback" not in text(result)
                    assert str(rhome.dir) not in text(result)
                refused = await api.vote(held["id"], "approve", "alice", "while locked")
                assert refused.status_code == 503 and "database is locked" in refused.json()["error"]
                listing = await api.pending()  # reads are not blocked by a writer in WAL mode
                assert [r["id"] for r in listing] == [held["id"]]
            finally:
                await anyio.to_thread.run_sync(release, locker)
            assert not (await client.call_tool("probe_run", {"tag": "allow-after"})).is_error
            await approve_and_wait(api, held["id"], results, "hold-before")
    assert not results["hold-before"].is_error
    assert [r["tag"] for r in rhome.runs()] == ["allow-after", "hold-before"]
    refusals = [e["payload"] for e in rhome.ledger_events(held["id"]) if e["kind"] == "vote.refused"]
    assert refusals == []  # a vote that could not be recorded is not a refusal either: it never happened
    rhome.stop_all()
    rhome.verify()
    assert sorted(rhome.assert_one_outcome_each().values()) == ["executed", "executed"]


def test_the_disk_helpers_fill_exactly(tmp_path: Path) -> None:
    """The fault is real: after `fill`, SQLite itself cannot commit on that filesystem."""
    with tiny_disk(tmp_path / "d") as disk:
        conn = sqlite3.connect(disk / "x.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t(x)")
        filler = fill(disk)
        with pytest.raises(sqlite3.OperationalError, match="full"):
            conn.execute("INSERT INTO t VALUES (randomblob(100000))")
        filler.unlink()
        conn.execute("INSERT INTO t VALUES (randomblob(100000))")
        conn.close()
    assert outcome_of  # (imported for the other tests)
