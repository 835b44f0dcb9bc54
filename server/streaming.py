"""The ledger's events as they are appended: to a terminal or a pipe (`keyturn audit follow`), or to an HTTP
collector (`audit_sink:` in the config, run by `keyturn serve` and `keyturn proxy`).

Both read the chain in order from a sequence number, so both resume: `follow` from `--from SEQ`, the sink from its
stored cursor. Appends commit in sequence order, so a reader that has seen `seq` N has seen every event before it.
Events are the ledger's own, as `keyturn audit tail --json` prints them (redacted arguments, hashes, no secrets).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from server.errors import ConfigError
from server.models import Event

if TYPE_CHECKING:
    from server.config import AuditSinkConfig
    from server.ledger.store import Store

log = logging.getLogger(__name__)


def event_json(event: Event) -> str:
    """One event as one line of JSON (the `jsonl` format of `audit follow` and the sink's body)."""
    return json.dumps(event.model_dump(mode="json"), separators=(",", ":"), sort_keys=True)


async def follow_events(ledger: Store, *, from_seq: int | None = None, poll_s: float = 0.25,
                        batch: int = 1000) -> AsyncIterator[list[Event]]:
    """Batches of events in chain order, from `from_seq` (inclusive; None: only what is appended from now), for
    ever. Appends by this process wake the follower at once; another process's are seen within `poll_s`."""
    sub = ledger.follow()
    try:
        if from_seq is not None:
            sub.last_seq = max(0, from_seq - 1)
        await sub.start()
        while True:
            events = await sub.read(limit=batch)
            if events:
                yield events
            else:
                await sub.wait(poll_s)
    finally:
        sub.close()


class SinkRefused(Exception):
    """The collector did not take a batch (an HTTP status other than 2xx, or no answer)."""


class AuditSink:
    """Posts every event to `config.url` in order, at least once, with a cursor stored in a file."""

    def __init__(self, ledger: Store, config: AuditSinkConfig, db: Path, environ: Mapping[str, str] | None = None,
                 *, poll_s: float = 0.25, max_backoff_s: float = 60.0) -> None:
        self.ledger = ledger
        self.config = config
        self.cursor_file = config.cursor_file or db.with_name(db.name + ".audit-sink-cursor")
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        env = os.environ if environ is None else environ
        self.headers = {"Content-Type": "application/x-ndjson"}
        if config.token_env:
            token = env.get(config.token_env)
            if not token:
                raise ConfigError(f"audit_sink.token_env names {config.token_env}, which is not set")
            self.headers["Authorization"] = f"Bearer {token}"
        self.delivered: int | None = None  # the last seq the collector took (None: nothing yet, and no cursor)

    def read_cursor(self) -> int | None:
        try:
            text = self.cursor_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        try:
            seq = int(text)
        except ValueError:
            raise ConfigError(f"the audit sink's cursor file {self.cursor_file} does not hold a sequence number; "
                              "remove it to start again from the sink's `start`") from None
        if seq < 0:
            raise ConfigError(f"the audit sink's cursor file {self.cursor_file} holds a negative sequence number")
        return seq

    def _write_cursor(self, seq: int) -> None:
        tmp = self.cursor_file.with_name(self.cursor_file.name + ".tmp")
        tmp.write_text(f"{seq}\n", encoding="utf-8")
        os.replace(tmp, self.cursor_file)  # never half written; at worst an older cursor, and a batch sent again

    async def start_seq(self) -> int | None:
        """The first sequence number to send: after the cursor, or where `start` says for a new sink."""
        cursor = self.read_cursor()
        if cursor is not None:
            self.delivered = cursor
            return cursor + 1
        return 1 if self.config.start == "first" else None

    async def run(self) -> None:
        import httpx2

        from_seq = await self.start_seq()
        backoff = 1.0
        async with httpx2.AsyncClient(timeout=self.config.timeout_s, follow_redirects=False) as http:
            async for events in follow_events(self.ledger, from_seq=from_seq, poll_s=self.poll_s,
                                              batch=self.config.batch):
                body = "".join(event_json(e) + "\n" for e in events).encode()
                failures = 0
                while True:
                    try:
                        await self._post(http, body, events)
                        break
                    except SinkRefused as e:
                        failures += 1
                        if failures == 1 or failures % 10 == 0:
                            log.warning("audit sink: events %d-%d not delivered (%s), retrying (try %d)",
                                        events[0].seq, events[-1].seq, e, failures)
                        await anyio.sleep(backoff)
                        backoff = min(self.max_backoff_s, backoff * 2)
                if failures:
                    log.warning("audit sink: delivering again from event %d", events[0].seq)
                backoff = 1.0
                self.delivered = events[-1].seq
                await anyio.to_thread.run_sync(self._write_cursor, events[-1].seq)

    async def _post(self, http: Any, body: bytes, events: list[Event]) -> None:
        headers = {**self.headers, "X-Keyturn-First-Seq": str(events[0].seq),
                   "X-Keyturn-Last-Seq": str(events[-1].seq)}
        try:
            r = await http.post(self.config.url, content=body, headers=headers)
        except Exception as e:  # no answer: connection refused, timeout, TLS ...
            raise SinkRefused(type(e).__name__) from None
        if not 200 <= r.status_code < 300:
            raise SinkRefused(f"HTTP {r.status_code}")
