"""A real `keyturn serve` signs checkpoints of its chain head while calls go through it and at shutdown, and sends
them to a witness file and a witness HTTP server; afterwards `keyturn audit verify` proves the ledger extends
them, names a truncated tail or a flipped state (exit 1), and an exported bundle verifies without the ledger."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from server.ledger.checkpoints import Checkpoint, parse_public_key, read_checkpoint_file
from tests.conftest import ReviewerAPI, agent_client
from tests.helpers import eventually, witness_endpoint
from tests.reliability.conftest import RelHome


@pytest.fixture
def witness_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    with witness_endpoint() as (url, received, _):
        yield url, received


async def test_a_served_ledger_is_witnessed_and_its_tampering_named(rhome: RelHome, witness_server: Any) -> None:
    url, received = witness_server
    witness = rhome.dir / "elsewhere" / "checkpoints.jsonl"
    rhome.configure(checkpoints={"witness_file": str(witness), "witness_url": url, "every_events": 5, "every_s": 60})
    base = rhome.serve_http()
    api = ReviewerAPI(base)
    with anyio.fail_after(60):
        async with agent_client(base) as client:
            for i in range(3):
                assert not (await client.call_tool("probe_run", {"tag": f"allow-{i}"})).is_error
            async with anyio.create_task_group() as tg:
                results: dict[str, Any] = {}

                async def held() -> None:
                    results["held"] = await client.call_tool("probe_run", {"tag": "hold-x"})

                tg.start_soon(held)
                request = await api.wait_pending("probe_run")
                assert (await api.vote(request["id"], "approve", "alice", "fine")).status_code == 200
            assert not results["held"].is_error
        # every 5 events, while serving: the file witness and the HTTP witness get each checkpoint
        await eventually(lambda: witness.exists() and len(read_checkpoint_file(witness)) >= 2 and len(received) >= 2)
    rhome.stop_all()  # SIGTERM: one more checkpoint, of the head, at shutdown
    head = rhome.event_snapshot()[-1][0]
    lines = read_checkpoint_file(witness)
    assert lines[-1].seq == head and Checkpoint.from_dict(received[-1]) == lines[-1]

    key = rhome.keyturn("audit", "key", "--config", str(rhome.config))
    public = key.stdout.split("public key (base64): ")[1].split()[0]
    assert all(c.signed_by(parse_public_key(public)) for c in lines)
    ok = rhome.keyturn("audit", "verify", "--config", str(rhome.config), "--checkpoint", str(witness),
                       "--public-key", public)
    assert ok.returncode == 0 and "chain intact" in ok.stdout and "calls and votes agree" in ok.stdout, ok.stdout

    bundle = rhome.dir / "bundle.json"
    exported = rhome.keyturn("audit", "export", "--config", str(rhome.config), "--from", "2", "--to", str(head - 2),
                             str(bundle))
    assert exported.returncode == 0, exported.stderr
    pristine = rhome.dir / "pristine.db"
    shutil.copyfile(rhome.db, pristine)

    # The tail goes, with the head row and the ledger's own checkpoint copies: the witnesses still know.
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(rhome.db)) as conn, conn:
        conn.execute("DELETE FROM events WHERE seq > ?", (head - 3,))
        conn.execute("DELETE FROM chain_head")
        conn.execute("DELETE FROM checkpoints")
    cut = rhome.keyturn("audit", "verify", "--config", str(rhome.config), "--checkpoint", str(witness),
                        "--public-key", public)
    assert cut.returncode == 1 and "tail truncated" in cut.stdout, cut.stdout + cut.stderr

    shutil.copyfile(pristine, rhome.db)
    with closing(sqlite3.connect(rhome.db)) as conn, conn:
        conn.execute("UPDATE calls SET state = 'approved' WHERE id = ?", (request["id"],))
    flipped = rhome.keyturn("audit", "verify", "--config", str(rhome.config))
    assert flipped.returncode == 1 and "says state 'approved'" in flipped.stdout, flipped.stdout

    rhome.db.unlink()
    offline = rhome.keyturn("audit", "verify", "--bundle", str(bundle), "--public-key", public)
    assert offline.returncode == 0 and "bundle of events 2.." in offline.stdout, offline.stdout + offline.stderr
