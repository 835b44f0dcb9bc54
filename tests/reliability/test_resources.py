"""What a held call leaves behind in the process once it is over, however it ended: nothing.

In-process (a real `running()` keyturn, its gate and broker): a wait that ends by expiry, by the client
giving up, or by a decision must not leave a waiter behind. Leftover waiters would grow without bound in a
long-running server, and the store poll that wakes them asks SQLite about every one of them each round.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from server.config import Person, Reviewer, Settings, ToolPack
from server.gate import Identity
from server.models import Verdict
from server.runtime import Keyturn, running
from tests.helpers import ledger_until
from tests.reliability.conftest import POLICY, PROBE, text

AGENT = Identity(principal="agent-ci")


@asynccontextmanager
async def keyturn(tmp_path: Path) -> AsyncIterator[Keyturn]:
    settings = Settings(
        db=tmp_path / "ledger.db", policy=POLICY,
        people={"alice": Person(groups=("dba",)), "carol": Person(groups=("dba",))},
        reviewers=(Reviewer(identity="api:alice", person="alice", token_sha256="0" * 64),),
        tools=(ToolPack(module=PROBE, options={"runs": str(tmp_path / "runs.log")}),),
        progress_interval_s=0.2, poll_interval_s=0.05)
    async with running(settings) as keyturn:
        yield keyturn


async def call(kt: Keyturn, tag: str) -> str:
    tool = kt.find_tool("probe_run")
    assert tool is not None
    return text(await kt.gate.call(tool, {"tag": tag}, AGENT))


async def pending_id(kt: Keyturn, tag: str) -> str:
    async def held() -> str | None:
        return next((v.id for v in await kt.ledger.list_calls(("pending",)) if v.arguments.get("tag") == tag), None)

    return await ledger_until(kt.ledger, held)


async def test_waits_that_end_by_expiry_by_giving_up_or_by_a_decision_leave_no_waiter_behind(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with keyturn(tmp_path) as kt:
            assert "expired" in await call(kt, "expire-1")  # waited through several progress rounds, then expired

            with anyio.move_on_after(0.7):  # the client gives up after a few progress rounds
                await call(kt, "hold-gives-up")

            async with anyio.create_task_group() as tg:
                tg.start_soon(call, kt, "hold-decided")
                request_id = await pending_id(kt, "hold-decided")
                await anyio.sleep(0.5)  # a few progress rounds first
                await kt.broker.decide(Verdict(request_id=request_id, reviewer="api:alice", verdict="deny",
                                               reason="no"))
            assert kt.broker._waiters == {}


async def test_many_expired_requests_do_not_accumulate_in_the_store_poll(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with keyturn(tmp_path) as kt:
            async with anyio.create_task_group() as tg:
                for i in range(40):
                    tg.start_soon(call, kt, f"expire-many-{i}")
            assert kt.broker._waiters == {}
