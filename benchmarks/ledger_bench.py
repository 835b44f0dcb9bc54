"""The ledger against the physical limit: events appended per second, and `audit verify` on a big chain.

Everything uses the durability keyturn ships (WAL, synchronous=NORMAL) on the same disk, in the same run:

    raw insert, 1 row/commit     plain sqlite3, keyturn's events table, BEGIN IMMEDIATE + INSERT + COMMIT per row
    raw insert, batched          the same rows with executemany in one transaction
    Ledger.append, sequential    one event per call (head read, hash, insert, head update, commit, announce)
    Ledger.append, 32 tasks      the same from 32 concurrent tasks
    verify                       Ledger.verify() over N events built with executemany of precomputed chained rows
    raw scan                     plain sqlite3 reading the same N rows (what verify costs before hashing)
    appends during verify        sequential Ledger.append latency while a verify of the N events runs, against
                                 the same appends on the same ledger with nothing else running
"""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from benchmarks.stats import summary
from server.canonical import canonical_json
from server.ledger import GENESIS, MIGRATIONS, Ledger, event_hash

PAYLOAD = {
    "tool": "sql_query", "args_hash": "9f" * 32, "principal": "agent-ci", "on_behalf_of": None,
    "model": "claude-sonnet", "client": "bench/1.0", "session": None,
    "arguments": {"query": "SELECT id, total FROM orders WHERE customer_id = 42 ORDER BY id DESC LIMIT 20"},
}
"""A typical event payload (a `call.received`), about 300 bytes of canonical JSON."""


def fresh(path: Path) -> sqlite3.Connection:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    for script in MIGRATIONS:
        for statement in filter(str.strip, script.split(";")):
            conn.execute(statement)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version(version) VALUES (?)", (len(MIGRATIONS),))
    return conn


def chained_rows(n: int, start_seq: int = 1, prev: str = GENESIS) -> list[tuple[Any, ...]]:
    payload = canonical_json(PAYLOAD)
    rows = []
    ts = time.time()
    for seq in range(start_seq, start_seq + n):
        kind, call_id = ("call.received", f"{seq // 4:032x}")
        h = event_hash(prev, seq, ts, kind, call_id, payload)
        rows.append((seq, ts, kind, call_id, payload, prev, h))
        prev = h
    return rows


INSERT = "INSERT INTO events(seq, ts, kind, call_id, payload, prev_hash, hash) VALUES (?,?,?,?,?,?,?)"


def raw_insert_rates(path: Path, n: int) -> dict[str, float]:
    rows = chained_rows(n)
    conn = fresh(path)
    t = time.perf_counter()
    for row in rows:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(INSERT, row)
        conn.execute("COMMIT")
    per_commit = n / (time.perf_counter() - t)
    conn.close()
    conn = fresh(path)
    t = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(INSERT, rows)
    conn.execute("COMMIT")
    batched = n / (time.perf_counter() - t)
    conn.close()
    return {"raw_insert_per_commit_per_s": per_commit, "raw_insert_batched_per_s": batched}


async def append_rates(path: Path, n: int) -> dict[str, float]:
    fresh(path).close()
    out: dict[str, float] = {}
    async with Ledger(path) as ledger:
        for _ in range(200):
            await ledger.append("bench", "warmup", PAYLOAD)
        t = time.perf_counter()
        for i in range(n):
            await ledger.append("bench", f"{i:032x}", PAYLOAD)
        out["ledger_append_sequential_per_s"] = n / (time.perf_counter() - t)

        async def worker(w: int, count: int) -> None:
            for i in range(count):
                await ledger.append("bench", f"{w:08x}{i:024x}", PAYLOAD)

        t = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for w in range(32):
                tg.start_soon(worker, w, n // 32)
        out["ledger_append_32_tasks_per_s"] = (n // 32 * 32) / (time.perf_counter() - t)
        check = await ledger.verify()
        assert check.ok, check.message
    return out


def build_chain(path: Path, n: int, batch: int = 100_000) -> float:
    """A valid ledger of n events, written fast: precomputed chained rows, executemany, one head update."""
    conn = fresh(path)
    t = time.perf_counter()
    prev, seq = GENESIS, 1
    while seq <= n:
        rows = chained_rows(min(batch, n - seq + 1), seq, prev)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT, rows)
        conn.execute("COMMIT")
        seq, prev = rows[-1][0] + 1, rows[-1][6]
    conn.execute("INSERT INTO chain_head(id, seq, hash) VALUES (1, ?, ?)", (n, prev))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - t


async def verify_rate(path: Path, n: int) -> dict[str, float]:
    build_s = build_chain(path, n)
    conn = sqlite3.connect(path)
    t = time.perf_counter()
    count = 0
    for _ in conn.execute("SELECT seq, ts, kind, call_id, payload, prev_hash, hash FROM events ORDER BY seq"):
        count += 1
    scan_s = time.perf_counter() - t
    conn.close()
    async with Ledger(path) as ledger:
        t = time.perf_counter()
        result = await ledger.verify()
        verify_s = time.perf_counter() - t
        assert result.ok and result.count == n, result.message
        during = await appends_during_verify(ledger)
    return {"verify_events": n, "build_s": build_s, "verify_s": verify_s, "verify_events_per_s": n / verify_s,
            "raw_scan_events_per_s": count / scan_s, **during}


async def appends_during_verify(ledger: Ledger) -> dict[str, Any]:
    """Writes while an auditor verifies the whole chain (a long read): sequential appends timed while a verify
    runs, against the same appends on the same ledger with nothing else running."""

    async def appends(count: int | None, until: anyio.Event | None = None) -> list[float]:
        latencies: list[float] = []
        while (count is not None and len(latencies) < count) or (until is not None and not until.is_set()):
            t = time.perf_counter()
            await ledger.append("process.started", None, {"bench": "during-verify"})
            latencies.append(time.perf_counter() - t)
            await anyio.lowlevel.checkpoint()  # let the verify's result in
        return latencies

    quiet = await appends(2000)
    done = anyio.Event()
    busy: list[float] = []
    results = []

    async def verify() -> None:
        results.append(await ledger.verify())
        done.set()

    async def write() -> None:
        busy.extend(await appends(None, done))

    async with anyio.create_task_group() as tg:
        tg.start_soon(verify)
        tg.start_soon(write)
    assert results[0].ok, results[0].message
    return {"appends_quiet": summary(quiet), "appends_during_verify": summary(busy),
            "appends_during_verify_max_ms": max(busy) * 1e3 if busy else math.nan}


async def run(home: Path, *, appends: int, verify_events: int) -> dict[str, Any]:
    await anyio.Path(home).mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"appends": appends}
    out.update(raw_insert_rates(home / "raw.db", appends))
    out.update(await append_rates(home / "append.db", appends))
    out.update(await verify_rate(home / "verify.db", verify_events))
    return out
