"""The PostgreSQL store against the SQLite store, and decisions travelling between instances.

    append latency       sequential `append` of a typical event: SQLite (WAL, synchronous=NORMAL) and PostgreSQL
                         (one advisory-locked transaction per append, on a local server)
    appends, 3 stores    three stores on one PostgreSQL database appending from 3 x 8 tasks (one chain)
    decision to resume   instance A holds a request (its broker waits on it); instance B records the approval;
                         the time from B's `decide` starting to A's waiter waking, on PostgreSQL (LISTEN/NOTIFY)
                         and, for comparison, on one SQLite file (the 0.25 s poll)
    instances            1, 2 and 3 `keyturn serve --http` processes on one PostgreSQL ledger, 4 MCP client
                         sessions each calling the allowed `echo` tool: calls per second over all of them

Run: `python benchmarks/postgres_bench.py [--quick] [--url postgresql://...]`. Without `--url`, a throwaway cluster
is started (tests/pg.py: PostgreSQL's server binaries must be installed). Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

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


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_instances(n: int, config: Path, tmp: Path, env: dict[str, str]) -> tuple[list[subprocess.Popen[bytes]],
                                                                                 list[str]]:
    procs, bases = [], []
    for _ in range(n):
        port = free_port()
        with open(tmp / f"serve-{port}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--http", f"127.0.0.1:{port}", "--config", str(config)],
                stdout=log, stderr=subprocess.STDOUT, cwd=tmp, env=env))
        bases.append(f"http://127.0.0.1:{port}")
    return procs, bases


async def instances_throughput(url_for: Callable[[], str], counts: tuple[int, ...], calls: int,
                               clients_each: int = 4) -> dict[str, Any]:
    """`counts` instances at a time on a fresh database each, `clients_each` sessions per instance."""
    out: dict[str, Any] = {}
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "keyturn.yaml"
            config.write_text(yaml.safe_dump({"db": url_for(), "policy": str(ROOT / "benchmarks" / "bench-policy.yaml"),
                                              "tools": [{"module": "benchmarks.bench_tools"}]}))
            env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
            procs, bases = start_instances(n, config, Path(tmp), env)
            try:
                async with httpx2.AsyncClient(timeout=1) as http:
                    for base in bases:
                        with anyio.fail_after(60):
                            while True:
                                try:
                                    await http.get(base + "/healthz")
                                    break
                                except httpx2.TransportError:
                                    await anyio.sleep(0.1)
                samples: list[float] = []
                sessions = n * clients_each

                async def client(base: str, count: int, samples: list[float] = samples) -> None:
                    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=300)) as http:
                        async with Client(streamable_http_client(f"{base}/mcp", http_client=http)) as c:
                            for i in range(count):
                                t = time.perf_counter()
                                result = await c.call_tool("echo", {"text": f"x{i}"})
                                samples.append(time.perf_counter() - t)
                                assert not result.is_error, result

                start = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for k in range(sessions):
                        tg.start_soon(client, bases[k % n], calls // sessions)
                out[f"{n}_instances"] = summary(samples, wall_s=time.perf_counter() - start)
            finally:
                for proc in procs:
                    proc.terminate()
                    proc.wait(30)
    return out


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
        report["instances_echo"] = await instances_throughput(new_url, (1, 2, 3), 240 if quick else 1200)
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
