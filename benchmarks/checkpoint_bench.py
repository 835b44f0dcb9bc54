"""Signed checkpoints: what one costs (sign, and sign + keep + append to a witness file, fsynced), and
`audit verify` on a big chain with checkpoints and the calls table replayed, against the plain chain verify.

    python benchmarks/checkpoint_bench.py [EVENTS]      # default 1,000,000; prints name=value lines

The chain is ledger_bench's (call.received events, four per call) plus the calls rows that agree with it and a
signed checkpoint every 1,000 events, as a running keyturn would leave them.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from benchmarks.ledger_bench import PAYLOAD, build_chain  # noqa: E402
from benchmarks.stats import summary  # noqa: E402
from server.ledger import Ledger  # noqa: E402
from server.ledger.checkpoints import key_id, sign  # noqa: E402
from server.ledger.witnesses import Checkpointer, FileWitness  # noqa: E402

EVERY = 1000


def add_calls_and_checkpoints(path: Path, key: Ed25519PrivateKey) -> int:
    """The calls rows the chain implies, and a checkpoint every EVERY events (signed now). Returns how many."""
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "INSERT INTO calls(id, tool, principal, on_behalf_of, model, args_hash, arguments, state, created, updated)"
            " SELECT DISTINCT call_id, ?, ?, NULL, NULL, ?, '{}', 'received', 0, 0 FROM events",
            (PAYLOAD["tool"], PAYLOAD["principal"], PAYLOAD["args_hash"]))
        chain = conn.execute("SELECT hash FROM events WHERE seq = 1").fetchone()[0]
        rows = conn.execute("SELECT seq, hash FROM events WHERE seq % ? = 0", (EVERY,)).fetchall()
        for seq, h in rows:
            cp = sign(key, seq, h, chain)
            conn.execute("INSERT INTO checkpoints(seq, key_id, hash, chain, time, sig) VALUES (?,?,?,?,?,?)",
                         (cp.seq, cp.key_id, cp.hash, cp.chain, cp.time, cp.sig))
    return len(rows)


async def checkpoint_cost(path: Path, key: Ed25519PrivateKey, n: int = 200) -> dict[str, Any]:
    t = time.perf_counter()
    for i in range(n):
        sign(key, i + 1, "0" * 64, "1" * 64)
    sign_ms = (time.perf_counter() - t) / n * 1e3
    witness = path.with_name("witness.jsonl")
    latencies = []
    async with Ledger(path) as ledger:
        checkpointer = Checkpointer(ledger, key, [FileWitness(witness)])
        for i in range(n):
            await ledger.append("policy.loaded", None, {"i": i})
            t = time.perf_counter()
            await checkpointer.make()  # proves the new event extends the last checkpoint, signs, keeps, writes
            latencies.append(time.perf_counter() - t)
    return {"checkpoint_sign_ms": sign_ms, "checkpoint_make_ms": summary(latencies)}


async def verify_figures(path: Path, n: int, key: Ed25519PrivateKey) -> dict[str, Any]:
    build_s = build_chain(path, n)
    cps = add_calls_and_checkpoints(path, key)
    out: dict[str, Any] = {"verify_events": n, "build_s": build_s, "checkpoints": cps}
    async with Ledger(path) as ledger:
        t = time.perf_counter()
        assert (await ledger.verify()).ok
        out["verify_chain_s"] = time.perf_counter() - t

        t = time.perf_counter()
        result, _ = await ledger.audit((), key.public_key(), own_key_id=key_id(key.public_key()))
        out["verify_full_s"] = time.perf_counter() - t
        assert result.ok, result.message
    out["verify_full_events_per_s"] = n / out["verify_full_s"]
    return out


async def run(home: Path, *, verify_events: int) -> dict[str, Any]:
    await anyio.Path(home).mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    out = await checkpoint_cost(home / "cost.db", key)
    out.update(await verify_figures(home / "verify.db", verify_events, key))
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory(prefix="keyturn-cp-bench-") as work:
        out = anyio.run(lambda: run(Path(work), verify_events=n))
    make = out.pop("checkpoint_make_ms")
    for name, value in {**out, "checkpoint_make_median_ms": make["median_ms"],
                        "checkpoint_make_p99_ms": make.get("p99_ms")}.items():
        print(f"{name}={value:.3f}" if isinstance(value, float) else f"{name}={json.dumps(value)}")


if __name__ == "__main__":
    main()
