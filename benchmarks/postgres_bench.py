"""The PostgreSQL store against the SQLite store, and decisions travelling between instances.

    append latency       sequential `append` of a typical event: SQLite (WAL, synchronous=NORMAL) and PostgreSQL
                         (one advisory-locked transaction per append, on a local server)
    appends, 3 stores    three stores on one PostgreSQL database appending from 3 x 8 tasks (one chain)
    decision to resume   instance A holds a request (its broker waits on it); instance B records the approval;
                         the time from B's `decide` starting to A's waiter waking, on PostgreSQL (LISTEN/NOTIFY)
                         and, for comparison, on one SQLite file (the 0.25 s poll)

Run: `python benchmarks/postgres_bench.py [--quick] [--url postgresql://...]`. Without `--url`, a throwaway cluster
is started (tests/pg.py: PostgreSQL's server binaries must be installed). Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stats import summary
from server.approvals import ApprovalBroker, directory_from
from server.ledger.postgres import PostgresStore
from server.ledger.sqlite import SqliteStore
from server.ledger.store import Store
from server.models import ReviewSpec, Verdict

PAYLOAD = {
    "tool": "sql_query", "args_hash": "9f" * 32, "principal": "agent-ci", "on_behalf_of": None,
    "model": "claude-sonnet", "client": "bench/1.0", "session": None,
    "arguments": {"query": "SELECT id, total FROM orders WHERE customer_id = 42 ORDER BY id DESC LIMIT 20"},
}


async def append_latency(store: Store, n: int) -> dict[str, Any]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        await store.append("call.received", None, PAYLOAD)
        samples.append(time.perf_counter() - t)
    return summary(samples)


async def concurrent_appends(stores: list[Store], tasks_each: int, n_each: int) -> dict[str, Any]:
    samples: list[float] = []

    async def writer(store: Store) -> None:
        for _ in range(n_each):
            t = time.perf_counter()
            await store.append("call.received", None, PAYLOAD)
            samples.append(time.perf_counter() - t)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for store in stores:
            for _ in range(tasks_each):
                tg.start_soon(writer, store)
    result = summary(samples, wall_s=time.perf_counter() - start)
    result["chain_verifies"] = (await stores[0].verify()).ok
    return result


async def decision_to_resume(holder_store: Store, decider_store: Store, rounds: int,
                             poll_interval_s: float) -> dict[str, Any]:
    directory = directory_from([("api:alice", "alice")], {"alice": []})
    holder = ApprovalBroker(ledger=holder_store, directory=directory, poll_interval_s=poll_interval_s)
    decider = ApprovalBroker(ledger=decider_store, directory=directory, poll_interval_s=poll_interval_s)
    samples: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder.poll_store)
        for i in range(rounds):
            call_id = uuid.uuid4().hex
            await holder_store.open_call(
                call_id=call_id, tool="held_echo", principal="agent", on_behalf_of=None, model=None,
                args_hash=f"h{i}", redacted_arguments={"i": i}, state="pending", holder=holder.instance_id,
                events=[("call.received", {}), ("approval.requested", {})], review=ReviewSpec(),
                expires=time.time() + 3600)
            woke = anyio.Event()
            resumed_at = 0.0

            async def wait(call_id: str = call_id, woke: anyio.Event = woke) -> None:
                nonlocal resumed_at
                with holder.watching(call_id):
                    while (await holder_store.call_states([call_id]))[call_id] == "pending":
                        await holder.wait_for_change(call_id, 60)
                resumed_at = time.perf_counter()
                woke.set()

            tg.start_soon(wait)
            await anyio.sleep(0.05)  # the waiter is waiting
            started = time.perf_counter()
            result = await decider.decide(Verdict(request_id=call_id, reviewer="api:alice", verdict="approve"))
            assert result.accepted, result
            with anyio.fail_after(30):
                await woke.wait()
            samples.append(resumed_at - started)
        tg.cancel_scope.cancel()
    return summary(samples)


async def main(url: str | None, quick: bool) -> dict[str, Any]:
    cluster = None
    if url is None:
        from tests.pg import find_bindir, start_cluster

        bindir = find_bindir()
        if bindir is None:
            raise SystemExit("PostgreSQL's server binaries are not installed: pass --url")
        cluster = start_cluster(bindir)
    n, rounds = (200, 20) if quick else (2000, 200)
    report: dict[str, Any] = {}
    try:
        def new_url() -> str:
            if cluster is not None:
                return cluster.create_database(f"bench_{uuid.uuid4().hex[:12]}")
            assert url is not None
            return url

        with tempfile.TemporaryDirectory() as tmp:
            async with SqliteStore(Path(tmp) / "bench.db") as sqlite_store:
                report["append_sqlite"] = await append_latency(sqlite_store, n)
            pg_url = new_url()
            async with PostgresStore(pg_url) as pg_store:
                report["append_postgres"] = await append_latency(pg_store, n)
            stores = [PostgresStore(pg_url) for _ in range(3)]
            for s in stores:
                await s.open()
            try:
                report["appends_postgres_3_stores_24_tasks"] = await concurrent_appends(stores, 8, max(1, n // 24))
            finally:
                for s in stores:
                    await s.close()
            resume_url = new_url()
            async with PostgresStore(resume_url) as a, PostgresStore(resume_url) as b:
                report["decision_to_resume_postgres_notify"] = await decision_to_resume(a, b, rounds, 0.25)
            async with SqliteStore(Path(tmp) / "resume.db") as a, SqliteStore(Path(tmp) / "resume.db") as b:
                report["decision_to_resume_sqlite_poll_0.25s"] = await decision_to_resume(a, b, rounds, 0.25)
    finally:
        if cluster is not None:
            cluster.stop()
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a postgresql:// URL of an empty database (default: a throwaway cluster)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(anyio.run(main, args.url, args.quick), indent=2, default=str))
