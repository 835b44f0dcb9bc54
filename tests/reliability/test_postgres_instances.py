"""Three `keyturn serve --http` instances on one PostgreSQL ledger: agents spread over them, a reviewer decides
through an instance other than the one holding the call, and a `kill -9` of the holding instance during a hold
loses nothing: the agent's retry through another instance rejoins the request, the approval reaches that instance
at once (LISTEN/NOTIFY), and the call runs exactly once, there. Then 1,000 calls over the three: no call runs twice,
every call has one outcome, and `keyturn audit verify` passes."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import anyio
import psycopg

from tests.conftest import ReviewerAPI, agent_client
from tests.helpers import eventually
from tests.pg import Cluster
from tests.reliability.conftest import TERMINAL, RelHome, text

CALLS = 1000
WORKERS_PER_INSTANCE = 4


def ledger_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql).fetchall())


async def test_three_instances_one_ledger_a_killed_holder_and_a_thousand_calls(rhome: RelHome,
                                                                              postgres: Cluster) -> None:
    url = postgres.create_database(f"k_{uuid.uuid4().hex[:16]}")
    rhome.configure(db=url)
    bases = [rhome.serve_http() for _ in range(3)]
    holder_proc, second, _ = rhome.procs
    api_third = ReviewerAPI(bases[2])

    # A held call on the first instance; the reviewer sees it through the third.
    first_try: dict[str, Any] = {}

    async def call_on(base: str, key: str) -> None:
        try:
            async with agent_client(base) as client:
                first_try[key] = await client.call_tool("probe_run", {"tag": "hold-story"})
        except Exception as e:  # the instance was killed under the call
            first_try[key] = e

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call_on, bases[0], "killed")
            request = await api_third.wait_pending("probe_run")
            rhome.kill9(holder_proc)  # the holding instance dies during the hold
            await eventually(lambda: "killed" in first_try)
        assert isinstance(first_try["killed"], Exception) or first_try["killed"].is_error
        assert ledger_rows(url, f"SELECT state FROM calls WHERE id = '{request['id']}'") == [("pending",)]

        # The agent retries the same call through the second instance: it rejoins the request (no new one).
        async with agent_client(bases[1]) as client:
            async with anyio.create_task_group() as tg:
                retried: dict[str, Any] = {}

                async def retry() -> None:
                    retried["result"] = await client.call_tool("probe_run", {"tag": "hold-story"})

                tg.start_soon(retry)
                await eventually(lambda: ledger_rows(
                    url, f"SELECT count(*) FROM events WHERE call_id = '{request['id']}' AND kind = 'call.rejoined'"
                ) == [(1,)])
                assert [r["tag"] for r in rhome.runs()].count("hold-story") == 0  # held: nothing ran
                vote = await api_third.vote(request["id"], "approve", "alice", "approved through the third")
                assert vote.status_code == 200 and vote.json()["state"] == "approved", vote.text
        assert not retried["result"].is_error, text(retried["result"])
    runs = [r for r in rhome.runs() if r["tag"] == "hold-story"]
    assert len(runs) == 1 and runs[0]["pid"] == second.pid  # once, on the instance the agent is connected to
    kinds = [k for (k,) in ledger_rows(url, f"SELECT kind FROM events WHERE call_id = '{request['id']}' ORDER BY seq")]
    assert kinds.count("execution.started") == 1 and [k for k in kinds if k in TERMINAL] == ["executed"]
    assert ledger_rows(url, "SELECT count(*) FROM calls") == [(1,)]  # the retry opened no second request

    # 1,000 calls over the three instances (the killed one replaced by a new one), several agents on each.
    bases[0] = rhome.serve_http()
    results: Counter[str] = Counter()

    async def worker(base: str, tags: list[str]) -> None:
        async with agent_client(base) as client:
            for tag in tags:
                result = await client.call_tool("probe_run", {"tag": tag})
                results["error" if result.is_error else "ok"] += 1

    tags = [f"allow-{i}" for i in range(CALLS)]
    workers = len(bases) * WORKERS_PER_INSTANCE
    with anyio.fail_after(900):
        async with anyio.create_task_group() as tg:
            for w in range(workers):
                tg.start_soon(worker, bases[w % len(bases)], tags[w::workers])
    assert results == Counter({"ok": CALLS})
    ran = Counter(r["tag"] for r in rhome.runs() if r["tag"].startswith("allow-"))
    assert len(ran) == CALLS and max(ran.values()) == 1  # every call ran, none twice
    assert len({r["pid"] for r in rhome.runs() if r["tag"].startswith("allow-")}) == 3  # spread over the three
    executed = ledger_rows(url, "SELECT count(*), count(DISTINCT call_id) FROM events WHERE kind = 'executed'")
    assert executed == [(CALLS + 1, CALLS + 1)]
    ends = ledger_rows(url, "SELECT call_id, count(*) FROM events WHERE kind IN "
                            "('executed','failed','denied','expired','cancelled','abandoned') GROUP BY call_id")
    assert len(ends) == CALLS + 1 and all(n == 1 for _, n in ends)
    rhome.stop_all()
    rhome.verify()


async def test_losing_the_database_fails_calls_closed_and_the_instance_reconnects(rhome: RelHome,
                                                                                 postgres: Cluster) -> None:
    """The database refuses connections and drops the instance's: a call fails closed with a clear error, nothing
    runs and nobody retries it; once the database is back the instance reconnects by itself (with backoff), the
    next call runs once, and the chain verifies with no event lost or written twice."""
    database = f"k_{uuid.uuid4().hex[:16]}"
    url = postgres.create_database(database)
    rhome.configure(db=url)
    base = rhome.serve_http()
    async with agent_client(base) as client:
        assert not (await client.call_tool("probe_run", {"tag": "allow-before"})).is_error
        before = ledger_rows(url, "SELECT seq, hash FROM events ORDER BY seq")
        postgres.psql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        postgres.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")
        down = await client.call_tool("probe_run", {"tag": "allow-while-down"})
        assert down.is_error and "did not run" in text(down), text(down)
        assert "ledger" in text(down)
        postgres.psql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')

        async def runs_again() -> bool:
            result = await client.call_tool("probe_run", {"tag": "allow-after"})
            return not result.is_error

        await eventually(runs_again, within=60, every=0.5)
    tags = Counter(r["tag"] for r in rhome.runs())
    assert tags == Counter({"allow-before": 1, "allow-after": 1})  # the refused call never ran, nor was retried
    after = ledger_rows(url, "SELECT seq, hash FROM events ORDER BY seq")
    assert after[:len(before)] == before
    received = [p for (p,) in ledger_rows(url, "SELECT payload FROM events WHERE kind = 'call.received'")]
    assert not any("allow-while-down" in p for p in received)
    rhome.stop_all()
    rhome.verify()
    assert "s3cret" not in rhome.log_text()
