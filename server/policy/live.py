"""The policy in force, reloaded when its file changes; a bad edit keeps the last good policy.

`check_reload` looks at the file's mtime and size first (cheap), then its digest, so an edit
that changes nothing does not announce a reload. A rejected file is announced once per distinct
content, not on every poll.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from server.canonical import canonical_json, sha256_hex
from server.errors import PolicyError
from server.policy.engine import CompiledPolicy, CompiledRule
from server.policy.loader import load_policy

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, Any]], Awaitable[None]]


class LivePolicy:
    """Holds the policy in force; reloads when the file changes; keeps the last good one on failure."""

    def __init__(
        self,
        path: Path,
        *,
        groups: Mapping[str, set[str]] | None = None,
        people: set[str] | None = None,
        on_event: EventSink | None = None,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.groups, self.people = groups, people
        self.on_event = on_event
        self.poll_interval_s = poll_interval_s
        self._current: CompiledPolicy | None = None
        self._stat: tuple[int, int] | None = None
        self._rejected_digest: str | None = None

    def load(self) -> CompiledPolicy:
        """The initial load. Raises PolicyError when the file is invalid: refuse to start without a policy."""
        try:
            stat: tuple[int, int] | None = self._stat_file()  # before reading: a change after it is seen next time
        except OSError:
            stat = None  # the loader says what is wrong with the file
        policy = load_policy(self.path, groups=self.groups, people=self.people)
        self._current, self._stat = policy, stat
        return policy

    @property
    def current(self) -> CompiledPolicy:
        if self._current is None:
            raise PolicyError("no policy loaded yet", file=str(self.path))
        return self._current

    async def check_reload(self) -> None:
        """Reload if the file changed. Success -> "policy.loaded"; failure -> keep the last good, "policy.rejected"."""
        try:
            stat = await anyio.to_thread.run_sync(self._stat_file)
        except OSError as e:
            await self._reject(f"cannot read the policy file: {e.strerror or e}", digest=f"missing:{e.errno}")
            return
        if stat == self._stat:
            return
        try:
            data = await anyio.to_thread.run_sync(self.path.read_bytes)
        except OSError as e:
            await self._reject(f"cannot read the policy file: {e.strerror or e}", digest=f"missing:{e.errno}")
            return
        digest = sha256_hex(data)
        if self._current is not None and digest == self._current.digest:
            self._stat = stat
            self._rejected_digest = None
            return
        if digest == self._rejected_digest:
            self._stat = stat
            return
        try:
            policy = await anyio.to_thread.run_sync(self._load)
        except PolicyError as e:
            self._stat = stat
            await self._reject(str(e), digest=digest)
            return
        # The file may have changed again between our read and the loader's; the digest tells which one we hold.
        previous = self._current
        was_rejected = self._rejected_digest is not None
        self._current, self._stat, self._rejected_digest = policy, stat, None
        # After a rejected edit, on the console (as the rejection was); a routine reload at info.
        log.log(logging.WARNING if was_rejected else logging.INFO, "policy %s reloaded: %d rules (digest %s)",
                self.path, len(policy.rules), policy.digest[:12])
        await self._emit("policy.loaded", {"digest": policy.digest, "path": str(self.path), "rules": len(policy.rules),
                                           **changes(previous, policy), **self._owner()})

    async def watch(self) -> None:
        """Check for changes every `poll_interval_s`, forever (run it in a task group; cancel to stop)."""
        while True:
            await anyio.sleep(self.poll_interval_s)
            await self.check_reload()

    def _load(self) -> CompiledPolicy:
        return load_policy(self.path, groups=self.groups, people=self.people)

    def _owner(self) -> dict[str, Any]:
        """Who owns the file now and its mode: an auditor asks who could have written it."""
        try:
            st = os.stat(self.path)
        except OSError:
            return {}
        return {"file_uid": st.st_uid, "file_mode": f"{st.st_mode & 0o7777:04o}"}

    def _stat_file(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size

    async def _reject(self, error: str, *, digest: str) -> None:
        if digest == self._rejected_digest:
            return
        self._rejected_digest = digest
        # On the console too (the ledger has it): whoever edited the file learns at once that it did not apply.
        log.error("policy %s was not reloaded, the last good policy stays in force: %s", self.path, error)
        await self._emit("policy.rejected", {"path": str(self.path), "error": error})

    async def _emit(self, kind: str, payload: dict[str, Any]) -> None:
        if self.on_event is not None:
            await self.on_event(kind, payload)


def _rule_digest(rule: CompiledRule) -> str:
    return sha256_hex(canonical_json({
        "tools": rule.tools, "principals": rule.principals, "models": rule.models,
        "when": rule.condition.source if rule.condition is not None else None, "outcome": rule.outcome,
        "risk": rule.risk, "reason": rule.reason.source, "enabled": rule.enabled,
        "review": rule.review.model_dump(mode="json") if rule.review is not None else None,
    }))


def changes(before: CompiledPolicy | None, after: CompiledPolicy) -> dict[str, Any]:
    """What a reload changed: the digest before and after, and the rules added, removed and changed (by id)."""
    if before is None:
        return {"previous_digest": None}
    old = {r.id: _rule_digest(r) for r in before.rules}
    new = {r.id: _rule_digest(r) for r in after.rules}
    settings = ("default_outcome", "default_risk")
    return {
        "previous_digest": before.digest,
        "rules_added": sorted(new.keys() - old.keys()),
        "rules_removed": sorted(old.keys() - new.keys()),
        "rules_changed": sorted(k for k in new.keys() & old.keys() if new[k] != old[k]),
        "defaults_changed": [s for s in settings if getattr(before, s) != getattr(after, s)]
        + (["default_review"] if before.default_review != after.default_review else [])
        + (["vars"] if before.vars != after.vars else []),
    }
