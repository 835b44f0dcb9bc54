"""Fixtures for the reliability suite: a keyturn home with the probe tool pack and the reliability policy,
and the checks every fault test ends with (the chain verifies; each call has exactly one outcome)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest

from tests.conftest import Home
from tests.reliability.probe_tools import read_runs

HERE = Path(__file__).resolve().parent
POLICY = HERE / "policy.yaml"
PROBE = "tests.reliability.probe_tools"
TERMINAL = frozenset({"executed", "failed", "denied", "expired", "cancelled", "abandoned"})


class RelHome(Home):
    """A keyturn installation for fault tests: probe tools that witness every run, the reliability policy."""

    @property
    def runs_file(self) -> Path:
        return self.dir / "runs.log"

    @property
    def gates(self) -> Path:
        return self.dir / "gates"

    extra_env: dict[str, str]

    def env(self) -> dict[str, str]:
        return {**super().env(), **getattr(self, "extra_env", {})}

    def configure(self, *, tools: list[dict[str, Any]] | None = None, **extra: Any) -> None:
        probe = {"module": PROBE, "options": {"runs": str(self.runs_file), "gates": str(self.gates)}}
        sql = {"module": "tools.sql", "options": {"database": str(self.data_db), "export_dir": str(self.dir / "exports")}}
        self.write_config(policy=str(POLICY), tools=[probe, sql, *(tools or [])], **extra)

    def runs(self) -> list[dict[str, Any]]:
        return read_runs(self.runs_file)

    def open_gate(self, tag: str) -> None:
        self.gates.mkdir(exist_ok=True)
        (self.gates / tag).touch()

    def kill9(self, proc: subprocess.Popen[bytes]) -> None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def verify(self) -> str:
        """`keyturn audit verify` on the ledger file: it must pass. Returns its output."""
        out = self.keyturn("audit", "verify", "--config", str(self.config))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "chain intact" in out.stdout
        return out.stdout

    def calls(self) -> dict[str, str]:
        """Every call's id and state, from the ledger's `calls` table."""
        with sqlite3.connect(self.db) as conn:
            return dict(conn.execute("SELECT id, state FROM calls"))

    def terminal_events(self) -> dict[str, list[str]]:
        """For every call: the kinds of its terminal ledger events, in order."""
        out: dict[str, list[str]] = {call_id: [] for call_id in self.calls()}
        for e in self.ledger_events():
            if e["call_id"] is not None and e["kind"] in TERMINAL:
                out.setdefault(e["call_id"], []).append(e["kind"])
        return out

    def assert_one_outcome_each(self) -> dict[str, str]:
        """Every call has exactly one terminal event, and it agrees with the call's state. Returns id -> outcome."""
        terminal = self.terminal_events()
        states = self.calls()
        bad = {c: kinds for c, kinds in terminal.items() if len(kinds) != 1}
        assert not bad, f"calls without exactly one terminal event: {bad}"
        mismatched = {c: (states[c], kinds[0]) for c, kinds in terminal.items() if states[c] != kinds[0]}
        assert not mismatched, mismatched
        return {c: kinds[0] for c, kinds in terminal.items()}

    def event_snapshot(self) -> list[tuple[int, str, str]]:
        """(seq, kind, hash) of every event: what must still be there, unchanged, after a crash."""
        with sqlite3.connect(self.db) as conn:
            return list(conn.execute("SELECT seq, kind, hash FROM events ORDER BY seq"))

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("serve-*.log")))


@pytest.fixture
def rhome(home: Home) -> Iterator[RelHome]:
    h = RelHome(dir=home.dir, config=home.config, db=home.db, data_db=home.data_db)
    h.configure()
    yield h
    h.stop_all()


def text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))

