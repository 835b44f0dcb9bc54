"""Making checkpoints in the running process, and the witnesses that keep copies out of the ledger file's reach.

`Checkpointer.run` is one background task: a checkpoint every `every_events` events appended (counted as this
process commits them) or every `every_s` seconds when anything was appended (by any process sharing the ledger),
and one at shutdown. Before signing a new head it proves the chain from the last checkpoint it trusts to that
head is intact, so it never signs over a change made behind its back. Each witness gets every checkpoint; a
witness that fails is logged and tried again with the next one (a later checkpoint covers the earlier); none of
this runs on the gate's path.

Witnesses: `FileWitness` (append-only JSON lines), `HttpWitness` (a POST of the JSON, with timeout and retries),
and `Daily` around a reviewer channel's `CheckpointNotifier` (a quiet message at most once a day).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio
import anyio.to_thread
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.config import Settings
from server.errors import LedgerError
from server.ledger.checkpoints import Checkpoint, CheckpointError, key_id, public_key_text, sign
from server.ledger.store import Store
from server.models import Event

log = logging.getLogger(__name__)

TAIL_BYTES = 65536
"""How much of a witness file's end is read to find its last checkpoint (at start)."""


class Witness(Protocol):
    @property
    def name(self) -> str: ...

    async def witness(self, checkpoint: Checkpoint) -> None: ...


class CheckpointNotifier(Protocol):
    """A reviewer channel's hook for the daily checkpoint message (e.g. Slack or Teams: a line with the checkpoint's
    seq, hash, time and key id in the reviewers' channel, where a later rewrite of the ledger cannot reach it)."""

    name: str

    async def checkpoint_digest(self, checkpoint: Checkpoint, public_key: str) -> None: ...


@dataclass
class FileWitness:
    """Appends each checkpoint as one JSON line (O_APPEND, fsynced) to a file: put it where the ledger's writers
    cannot rewrite it (another disk or host, an append-only mount, a synced folder with history)."""

    path: Path
    name: str = "file"

    async def witness(self, checkpoint: Checkpoint) -> None:
        await anyio.to_thread.run_sync(append_line, self.path, checkpoint.to_json())


def append_line(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class HttpWitness:
    """POSTs each checkpoint's JSON to `url`: `retries` tries, each bounded by `timeout_s`, backing off between."""

    url: str
    timeout_s: float = 5.0
    retries: int = 3
    name: str = "http"

    async def witness(self, checkpoint: Checkpoint) -> None:
        body = checkpoint.to_json().encode("utf-8")
        delay = 0.5
        for attempt in range(1, self.retries + 1):
            try:
                with anyio.fail_after(self.timeout_s + 1):
                    await anyio.to_thread.run_sync(self._post, body, abandon_on_cancel=True)
                return
            except (OSError, TimeoutError) as e:
                if attempt == self.retries:
                    raise CheckpointError(f"witness {self.url} did not take the checkpoint: {e}") from e
            await anyio.sleep(delay)
            delay *= 2

    def _post(self, body: bytes) -> None:
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "keyturn"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                resp.read(65536)
                status = resp.status
        except urllib.error.HTTPError as e:
            e.close()  # (it holds the connection)
            raise OSError(f"HTTP {e.code}") from None
        if not 200 <= status < 300:
            raise OSError(f"HTTP {status}")


@dataclass
class Daily:
    """Passes a checkpoint to a reviewer channel at most once per `period_s` (a quiet daily message)."""

    notifier: CheckpointNotifier
    public_key: str
    period_s: float = 86400.0
    _last: float | None = None

    @property
    def name(self) -> str:
        return f"daily:{self.notifier.name}"

    async def witness(self, checkpoint: Checkpoint) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.period_s:
            return
        await self.notifier.checkpoint_digest(checkpoint, self.public_key)
        self._last = now


def configured_witnesses(settings: Settings) -> list[Witness]:
    cfg = settings.checkpoints
    out: list[Witness] = []
    if cfg.witness_file is not None:
        out.append(FileWitness(cfg.witness_file))
    if cfg.witness_url is not None:
        out.append(HttpWitness(cfg.witness_url, cfg.witness_timeout_s, cfg.witness_retries))
    return out


def last_in_file(path: Path) -> Checkpoint | None:
    """The last well-formed checkpoint line at the end of a witness file, if any."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL_BYTES))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return Checkpoint.from_dict(json.loads(line))
        except (json.JSONDecodeError, CheckpointError):
            continue
    return None


@dataclass
class Checkpointer:
    ledger: Store
    key: Ed25519PrivateKey
    witnesses: list[Witness] = field(default_factory=list)
    every_events: int = 1000
    every_s: float = 60.0
    anchors: Sequence[Path] = ()  # witness files whose last checkpoint may serve as the trusted start
    _appended: int = 0
    _wake: anyio.Event = field(default_factory=anyio.Event)
    _trusted: tuple[int, str] | None = None  # the last (seq, hash) this process signed or found signed

    def __post_init__(self) -> None:
        self.ledger.follow(on_local=self._on_events)

    @property
    def public_key(self) -> str:
        return public_key_text(self.key.public_key())

    def add_notifier(self, notifier: CheckpointNotifier, period_s: float = 86400.0) -> None:
        """Send a reviewer channel a quiet checkpoint message, at most once per `period_s`."""
        self.witnesses.append(Daily(notifier, self.public_key, period_s))

    def _on_events(self, events: Sequence[Event]) -> None:
        self._appended += len(events)
        if self._appended >= self.every_events:
            self._wake.set()

    async def run(self) -> None:
        while True:
            with anyio.move_on_after(self.every_s):
                await self._wake.wait()
            self._wake, self._appended = anyio.Event(), 0
            try:
                await self.make()
            except (LedgerError, CheckpointError) as e:
                log.error("no checkpoint made: %s", e)

    async def make(self, *, force: bool = False) -> Checkpoint | None:
        """Sign the chain's head, keep it and send it to every witness. None when the head is already checkpointed
        (unless `force`). Raises CheckpointError when the chain does not extend the last trusted checkpoint."""
        mine = key_id(self.key.public_key())
        candidates = [c for c in (last_in_file(p) for p in self.anchors) if c is not None]

        def anchor_of(kept: list[Checkpoint]) -> tuple[int, str]:
            trusted = [(c.seq, c.hash) for c in [*candidates, *kept] if c.signed_by(self.key.public_key())]
            if self._trusted is not None:
                trusted.append(self._trusted)
            return max(trusted, default=(0, ""))

        found = await self.ledger.extension(mine, anchor_of, force=force)
        if found is None:
            return None
        if isinstance(found, str):
            raise CheckpointError(f"the ledger does not extend its last checkpoint, so it is not signed: {found}")
        seq, head_hash, chain = found
        checkpoint = sign(self.key, seq, head_hash, chain)
        await self.ledger.store_checkpoint(checkpoint)
        self._trusted = (seq, head_hash)
        await self.deliver(checkpoint)
        return checkpoint

    async def deliver(self, checkpoint: Checkpoint) -> list[str]:
        """Send `checkpoint` to every witness; returns the failures (each logged, none raised)."""
        failures = []
        for witness in self.witnesses:
            try:
                await witness.witness(checkpoint)
            except Exception as e:  # a witness's failure never stops the others, nor keyturn
                log.warning("checkpoint witness %s failed: %s", witness.name, e)
                failures.append(f"{witness.name}: {e}")
        return failures
