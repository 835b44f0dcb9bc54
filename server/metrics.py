"""Prometheus metrics of one keyturn process, at `/metrics` (prometheus-client's text format).

What they answer: are reviewers keeping up (`keyturn_held_calls`, `keyturn_pending_requests`,
`keyturn_time_to_decision_seconds`, `keyturn_votes_total` by channel), is keyturn slowing agents
(`keyturn_ledger_write_seconds`, `keyturn_calls_total` by outcome), how often standing grants spare a
reviewer (`keyturn_grant_uses_total` by tool), is the ledger's evidence fresh
(`keyturn_checkpoint_age_seconds`), are the upstreams up (`keyturn_upstream_up`, proxy mode).

Counters count what this process recorded (its ledger commits): with several processes on one ledger, sum them
across instances. `keyturn_pending_requests` and the checkpoint age are read from the ledger, so every instance
reports the same value (take one, not the sum). Labels are tool names, outcomes, rule ids, channels and verdicts:
never arguments, principals or people.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from server.errors import LedgerError
from server.models import Event
from server.outcomes import OUTCOMES

if TYPE_CHECKING:
    from server.ledger.store import Store

log = logging.getLogger(__name__)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

TERMINAL = frozenset(o.kind for o in OUTCOMES.values())
DECIDED = frozenset({"approval.granted", "denied", "expired"})
TRACKED_MAX = 100_000
"""Calls remembered between their receipt and their end (tool, rule, request time): a bound on the memory a call
that never ends in this process can hold."""

PENDING_COUNTED_MAX = 10_000
"""`keyturn_pending_requests` counts up to this many (a scrape must stay cheap; more than this is its own alarm)."""
DECISION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 86400)
WRITE_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class Metrics:
    """The metrics of one running keyturn: fed by the ledger's commits in this process, and read at scrape time."""

    def __init__(self, ledger: Store, *, held_now: Callable[[], int],
                 upstreams: Callable[[], Iterable[tuple[str, bool]]] | None = None) -> None:
        self.ledger = ledger
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter("keyturn_calls", "Calls that ended, by tool, outcome (the terminal ledger event) and the "
                             "first rule that matched", ["tool", "outcome", "rule"], registry=r)
        self.votes = Counter("keyturn_votes", "Reviewers' votes, by channel and verdict", ["channel", "verdict"],
                             registry=r)
        self.grant_uses = Counter("keyturn_grant_uses", "Calls that ran under a standing grant without waiting for a "
                                  "reviewer (grant.used), by tool", ["tool"], registry=r)
        self.decisions = Counter("keyturn_decisions", "Held calls decided, by how (approved, denied, expired)",
                                 ["decision"], registry=r)
        self.time_to_decision = Histogram(
            "keyturn_time_to_decision_seconds", "From a call's approval request to its decision (approved, denied "
            "or expired), for requests made by this process", ["decision"], buckets=DECISION_BUCKETS, registry=r)
        self.ledger_writes = Histogram(
            "keyturn_ledger_write_seconds", "A ledger write, from asking to its commit (waiting for the writer "
            "included)", buckets=WRITE_BUCKETS, registry=r)
        held = Gauge("keyturn_held_calls", "Calls this process is holding for review now (an agent waits)",
                     registry=r)
        held.set_function(lambda: float(held_now()))
        self.pending = Gauge("keyturn_pending_requests", "Requests pending review in the ledger (all processes)",
                             registry=r)
        self._checkpoint_time: float | None = None
        self._checkpoint_seq = 0
        age = Gauge("keyturn_checkpoint_age_seconds", "Seconds since the ledger's latest signed checkpoint (NaN: "
                    "none yet)", registry=r)
        age.set_function(lambda: time.time() - self._checkpoint_time if self._checkpoint_time else float("nan"))
        self.upstream_up = Gauge("keyturn_upstream_up", "1 when the upstream server is up (proxy mode)", ["upstream"],
                                 registry=r)
        self._upstreams = upstreams
        self._tracked: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._unsubscribe = ledger.subscribe(self.on_events)
        ledger.write_timers.append(self.ledger_writes.observe)

    def close(self) -> None:
        self._unsubscribe()
        if self.ledger_writes.observe in self.ledger.write_timers:
            self.ledger.write_timers.remove(self.ledger_writes.observe)

    # -- fed by the ledger's commits ------------------------------------------------------------------

    def _track(self, call_id: str) -> dict[str, Any]:
        entry = self._tracked.get(call_id)
        if entry is None:
            entry = self._tracked[call_id] = {}
            while len(self._tracked) > TRACKED_MAX:
                self._tracked.popitem(last=False)
        return entry

    def on_events(self, events: Sequence[Event]) -> None:
        for e in events:
            try:
                self._count(e)
            except Exception:  # metrics never fail a commit's listeners
                log.exception("metrics could not count event %s", e.seq)

    def _count(self, e: Event) -> None:
        p, call_id = e.payload, e.call_id
        if e.kind == "vote":
            self.votes.labels(str(p.get("channel") or "unknown"), str(p.get("verdict") or "unknown")).inc()
        elif e.kind == "grant.used":
            self.grant_uses.labels(str(p.get("tool") or "unknown")).inc()
            return
        if call_id is None:
            return
        if e.kind == "call.received":
            self._track(call_id)["tool"] = str(p.get("tool") or "unknown")
        elif e.kind == "decision":
            rules = p.get("rules") or []
            first = rules[0] if rules else None
            rule = first.get("id") if isinstance(first, dict) else first
            self._track(call_id)["rule"] = str(rule or "default")
        elif e.kind == "approval.requested":
            self._track(call_id)["requested"] = e.ts
        if e.kind in DECIDED and p.get("by") not in ("policy", "keyturn"):  # a held call's decision
            how = {"approval.granted": "approved"}.get(e.kind, e.kind)
            self.decisions.labels(how).inc()
            requested = self._tracked.get(call_id, {}).get("requested")
            if requested is not None:
                self.time_to_decision.labels(how).observe(max(0.0, e.ts - requested))
        if e.kind in TERMINAL:
            entry = self._tracked.pop(call_id, {})
            self.calls.labels(entry.get("tool", "unknown"), e.kind, entry.get("rule", "none")).inc()

    # -- read from the ledger now and then --------------------------------------------------------------

    async def refresh(self) -> None:
        """What only the ledger knows: requests pending in every process, the latest checkpoint."""
        self.pending.set(await self.ledger.count_calls(("pending",), limit=PENDING_COUNTED_MAX))
        for cp in await self.ledger.stored_checkpoints(after_seq=self._checkpoint_seq):
            if cp.seq >= self._checkpoint_seq:
                self._checkpoint_seq, self._checkpoint_time = cp.seq, cp.time
        if self._upstreams is not None:
            for name, up in self._upstreams():
                self.upstream_up.labels(name).set(1.0 if up else 0.0)

    async def run(self, every_s: float = 5.0) -> None:
        while True:
            try:
                await self.refresh()
            except LedgerError as e:
                log.warning("metrics could not read the ledger: %s", e)
            await anyio.sleep(every_s)

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))
