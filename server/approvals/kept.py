"""Results of held calls kept for a retry: an agent that gave up waiting and calls again gets the result of the run
its approval made, never a second run."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from server.canonical import sha256_hex
from server.ledger import Store

log = logging.getLogger(__name__)

KEPT_RESULTS_MAX_BYTES = 64 * 2**20
"""Results of held calls kept in memory for a retry, at most (see `KeptResults.keep`)."""


@dataclass(frozen=True)
class Delivery:
    """What a retry of a held call that already ran gets: the kept result (checked against the chain), or when it
    ran and how it ended."""

    request_id: str
    kind: str  # the terminal event: executed or failed
    ran_at: float
    result_json: str | None  # the kept CallToolResult's canonical JSON; None when not kept (secret, or gone)
    reason: str | None = None


@dataclass
class KeptResults:
    ledger: Store
    _kept: dict[str, tuple[str, str, float]] = field(default_factory=dict)  # request -> (result, digest, expires)
    _kept_bytes: int = 0

    async def keep(self, request_id: str, result_json: str, expires: float | None) -> None:
        """Keep a held call's result (its canonical JSON) for a retry, until the request's expiry.

        Kept in this process's memory, never in the ledger file: a result may carry what the agent asked for (a
        key it was approved to read), and the ledger holds only its digest. A retry that reaches another process,
        or comes after a restart, is told that the call ran and when, not given the result again. Bounded: past
        `KEPT_RESULTS_MAX_BYTES` the results closest to their expiry are forgotten first."""
        now = time.time()
        if expires is None or expires <= now or len(result_json) > KEPT_RESULTS_MAX_BYTES:
            return
        self.forget_expired(now)
        self._kept[request_id] = (result_json, sha256_hex(result_json), expires)
        self._kept_bytes += len(result_json)
        while self._kept_bytes > KEPT_RESULTS_MAX_BYTES:
            oldest = min(self._kept, key=lambda k: self._kept[k][2])
            self._kept_bytes -= len(self._kept.pop(oldest)[0])

    def forget_expired(self, now: float) -> None:
        """Forget the results whose requests have expired."""
        for request_id in [k for k, (_, _, expires) in self._kept.items() if expires <= now]:
            self._kept_bytes -= len(self._kept.pop(request_id)[0])

    async def deliver(self, request_id: str, principal: str) -> Delivery | None:
        """For a retry of a request that ran: how it ended, and its kept result when the result's digest matches
        the one the chain recorded. Recorded as `result.delivered`. None if the request has not ended that way."""
        ended = [e for e in await self.ledger.events(request_id) if e.kind in ("executed", "failed")]
        if not ended:
            return None
        end = ended[-1]
        chained = end.payload.get("result_digest")
        self.forget_expired(time.time())
        kept = self._kept.get(request_id)
        result_json = None
        if kept is not None and chained is not None:
            text, digest, _ = kept
            if digest == chained == sha256_hex(text):
                result_json = text
            else:
                log.error("the result kept for %s does not match the ledger's digest: not returned", request_id)
        reason = end.payload.get("error")
        await self.ledger.append("result.delivered", request_id, {
            "principal": principal, "outcome": end.kind, "kept": result_json is not None,
            "result_digest": chained, "ran_at": end.ts})
        return Delivery(request_id, end.kind, end.ts, result_json, reason if isinstance(reason, str) else None)
