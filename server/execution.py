"""What a tool may do when it runs: the limits the decision relied on, and keyturn's own state, out of reach.

Two things reach a tool from outside its arguments:

- `RunLimits`, for one run: set by the gate around `Runnable.run` from the facts the decision was made on.
  `read_only` is true when the classifiers judged the call read-only; a tool then runs it so that it cannot
  write (a read-only sandbox mount, a read-only transaction), and a misjudged call fails instead of writing.
  Read it with `current_limits()` inside a tool. A tool tells what it really did with `report_rows(n)` (the rows a
  SQL write changed), which the gate records beside the impact measured before the decision.
- `PackContext`, at load: keyturn's state (ledger, the secrets beside it, config, policy, secret store) that no
  tool may reach, the environment variables that hold keyturn's secrets, and a way to record a ledger event
  when keyturn starts (`sandbox.disabled`). A pack's `register(registry, options, context)` receives it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PackContext", "RunLimits", "RunReport", "current_limits", "limits_from_facts", "report_rows", "run_limits",
           "running_under"]


@dataclass(frozen=True)
class RunLimits:
    """What the decision for this run relied on, to be enforced by the tool that runs it."""

    read_only: bool = False


@dataclass
class RunReport:
    """What a run reports of itself while it runs (mutable: a tool's worker thread runs in a copy of the context)."""

    rows: int | None = None


_NO_LIMITS = RunLimits()
run_limits: ContextVar[RunLimits | None] = ContextVar("keyturn_run_limits", default=None)
_run_report: ContextVar[RunReport | None] = ContextVar("keyturn_run_report", default=None)


def current_limits() -> RunLimits:
    """The limits of the run in progress (outside a gated run: no limits)."""
    return run_limits.get() or _NO_LIMITS


def report_rows(rows: int) -> None:
    """Inside a run: the rows the tool really changed (outside a gated run: nothing to report to)."""
    report = _run_report.get()
    if report is not None:
        report.rows = int(rows)


@contextmanager
def running_under(limits: RunLimits) -> Iterator[RunReport]:
    """Run the block under `limits`, as the gate runs a tool (and as a tool's own tests can); yields what the run
    reports of itself (`report_rows`)."""
    report = RunReport()
    token, report_token = run_limits.set(limits), _run_report.set(report)
    try:
        yield report
    finally:
        _run_report.reset(report_token)
        run_limits.reset(token)


def limits_from_facts(facts: Mapping[str, Any]) -> RunLimits:
    """Read-only when every statement or command family the classifiers found judged the call read-only."""
    judged = [facts[family] for family in ("sql", "shell") if isinstance(facts.get(family), Mapping)
              and facts[family].get("present")]
    return RunLimits(read_only=bool(judged) and all(f.get("read_only") is True for f in judged))


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


@dataclass
class PackContext:
    """What keyturn tells a tool pack when it loads it.

    `state_paths`: keyturn's own files. A tool must not reach them: the shell sandbox hides them, and a root or
    database that contains one is refused at load. `secret_env`: names of environment variables that hold
    keyturn's secrets (never passed to a tool). `events`: ledger events to record once keyturn has started.
    """

    state_paths: tuple[Path, ...] = ()
    ledger_path: Path | None = None
    ledger_url: str | None = None  # a PostgreSQL ledger: no tool may connect to its database
    secret_env: frozenset[str] = frozenset()
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @classmethod
    def for_state(cls, paths: Iterable[str | os.PathLike[str]], *, ledger: str | os.PathLike[str] | None = None,
                  secret_env: Iterable[str] = (), ledger_url: str | None = None) -> PackContext:
        real = tuple(dict.fromkeys(_real(p) for p in paths))
        return cls(state_paths=real, ledger_path=_real(ledger) if ledger is not None else None,
                   secret_env=frozenset(secret_env), ledger_url=ledger_url)

    def record(self, kind: str, payload: dict[str, Any]) -> None:
        """Ask for a ledger event when keyturn starts (a pack loads before the ledger opens)."""
        self.events.append((kind, dict(payload)))

    def existing_state(self) -> list[Path]:
        """keyturn's state files as they are now: each path, the ledger's `-wal`/`-shm`/`-journal`, and every
        `<ledger>.*` secret beside it (some are made after start). Symlinks resolved."""
        found: dict[Path, None] = {}
        for path in self.state_paths:
            candidates = [path]
            if path == self.ledger_path:
                candidates += [Path(f"{path}{suffix}") for suffix in ("-wal", "-shm", "-journal")]
                candidates += [Path(p) for p in glob.glob(glob.escape(str(path)) + ".*")]
            for c in candidates:
                if os.path.lexists(c):
                    found[c] = None
                    found[_real(c)] = None
        return list(found)

    def reaches_state(self, root: str | os.PathLike[str]) -> list[Path]:
        """The state paths that lie inside `root` (or are `root`), and `/proc` (keyturn's process) if it does."""
        real = _real(root)
        inside = [p for p in (*self.state_paths, *self.existing_state())
                  if p == real or p.is_relative_to(real)]
        proc = Path("/proc")
        if real == proc or real.is_relative_to(proc) or proc.is_relative_to(real):
            inside.append(proc)
        return list(dict.fromkeys(inside))
