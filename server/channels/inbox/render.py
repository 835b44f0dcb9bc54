"""Turning stored requests and ledger events into what the pages show.

Templates are Jinja2 with autoescaping on for every file: nothing from an agent, a reviewer or the
ledger reaches the page unescaped. The helpers here build plain view models; templates only lay out.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from pydantic import ValidationError

from server.approvals.edits import describe_diff
from server.approvals.quorum import needs
from server.models import Event, RequestView, ReviewSpec, state_label
from server.records import UNCLASSIFIED

TEMPLATES = Path(__file__).resolve().parent / "templates"
STATIC = Path(__file__).resolve().parent / "static"

SQL_NAMES = frozenset({"sql", "query", "statement", "statements"})
SHELL_NAMES = frozenset({"command", "cmd", "script", "shell", "argv"})
TERMINAL_TONE = {"executed": "good", "failed": "bad", "denied": "bad", "expired": "warn", "cancelled": "warn",
                 "abandoned": "warn"}


# -- formatting --------------------------------------------------------------------------------

def utc(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "—"


def iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else ""


def duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def ago(ts: float | None) -> str:
    if not ts:
        return "—"
    return "just now" if time.time() - ts < 10 else f"{duration(time.time() - ts)} ago"


def time_left(expires: float | None) -> str:
    if expires is None:
        return "no expiry"
    left = expires - time.time()
    return f"{duration(left)} left" if left > 0 else "expired"


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(utc=utc, iso=iso, ago=ago, time_left=time_left, pretty=pretty, state_label=state_label)
    return env


# -- a request, as a reviewer reads it -----------------------------------------------------------

@dataclass(frozen=True)
class Argument:
    name: str
    kind: str  # "sql", "shell", "json" or "text"
    text: str


def classify_argument(name: str, value: Any, declared: str | None) -> Argument:
    """Render SQL and shell as code, other values as text or JSON. Declared classifiers win over names."""
    kind = (declared or "").partition(":")[0]
    if kind in {"sql", "shell", "argv"} or (not kind and name.lower() in SQL_NAMES | SHELL_NAMES):
        family = "sql" if kind == "sql" or (not kind and name.lower() in SQL_NAMES) else "shell"
        if isinstance(value, str):
            return Argument(name, family, value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return Argument(name, "shell", shlex.join(value))
    if isinstance(value, str):
        return Argument(name, "text", value)
    return Argument(name, "json", pretty(value))


@dataclass(frozen=True)
class GroupProgress:
    name: str
    members: str
    have: int
    need: int


@dataclass(frozen=True)
class Card:
    """One request in the inbox or at the top of its page."""

    view: RequestView
    arguments: list[Argument]
    groups: list[GroupProgress]
    approvals: int
    needed: int
    my_vote: str | None  # the signed-in reviewer's verdict, if they voted
    version: str  # changes whenever what the status part shows changes
    needs: str = ""  # what the request needs, in words (`quorum.needs`)
    shared: bool = False  # the groups come from several rules: one person may count toward more than one
    arguments_kept: bool = True  # False: denied by keyturn as not valid for the tool, only refused arguments' hash
    origin: str | None = None  # a proxied tool's upstream server and its own name there ("git: git_commit")

    @property
    def percent(self) -> int:
        return min(100, int(100 * self.approvals / self.needed)) if self.needed else 0


def card(view: RequestView, classifiers: Mapping[str, str], person: str | None) -> Card:
    need = needs(view.review, view.votes)  # the numbers and words every channel shows
    groups = [GroupProgress(name=line.who, members=line.who, need=line.need, have=min(line.have, line.need))
              for line in need.lines]
    my_vote = next((v["verdict"] for v in view.votes if person is not None and v["person"] == person), None)
    kept = view.arguments != UNCLASSIFIED
    return Card(
        view=view,
        arguments=[] if not kept else [classify_argument(k, v, classifiers.get(k)) for k, v in view.arguments.items()],
        groups=groups, approvals=need.approvals, needed=need.needed or 1, my_vote=my_vote,
        version=f"{view.state}:{len(view.votes)}:{sum(v['verdict'] == 'deny' for v in view.votes)}",
        needs=need.requirement(), shared=need.shared, arguments_kept=kept,
    )


# -- the story of a request -------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One event on a request's timeline."""

    event: Event
    title: str
    lines: list[str] = field(default_factory=list)
    tone: str = "info"  # info | good | bad | warn
    rules: list[dict[str, Any]] = field(default_factory=list)
    digest: str | None = None  # a result digest or an arguments hash worth showing in full
    policy: str | None = None  # the digest of the policy that decided


def _who(p: Mapping[str, Any]) -> str:
    return str(p.get("person") or p.get("reviewer") or p.get("by") or "someone")


def describe(event: Event) -> Entry:
    p, kind = event.payload, event.kind
    if kind == "call.received":
        asked = f"{p.get('tool')} asked by {p.get('principal')}"
        if p.get("on_behalf_of"):
            asked += f" on behalf of {p['on_behalf_of']}"
        lines = [asked] + [f"{k}: {p[k]}" for k in ("model", "client", "session") if p.get(k)]
        return Entry(event, "Received", lines, digest=p.get("args_hash"))
    if kind == "call.rejoined":
        return Entry(event, "Asked again", [f"the same call from {p.get('principal')} joined this request"])
    if kind == "decision":
        tone = {"allow": "good", "deny": "bad"}.get(str(p.get("outcome")), "warn")
        lines = [f"outcome {p.get('outcome')}, risk {p.get('risk')}: {p.get('reason')}"]
        return Entry(event, "Policy decision", lines, tone, rules=list(p.get("rules") or []),
                     policy=p.get("policy_digest"))
    if kind == "approval.requested":
        try:
            wanted = needs(ReviewSpec.model_validate(p.get("review") or {})).requirement()
        except ValidationError:
            wanted = "(the review recorded here cannot be read)"
        return Entry(event, "Held for review", [f"needs {wanted}", f"expires {utc(p.get('expires'))}"], "warn")
    if kind == "notified":
        return Entry(event, "Reviewers notified", [f"via {p.get('channel')}"])
    if kind == "notify.failed":
        return Entry(event, "Notification failed", [f"via {p.get('channel')}: {p.get('error')}"], "warn")
    if kind == "vote":
        verb = "approved" if p.get("verdict") == "approve" else "denied"
        if p.get("changed_from"):
            verb = f"changed their vote from {p['changed_from']} to {p.get('verdict')}"
        lines = [f"via {p.get('channel')} as {p.get('reviewer')}", f"reason: {p.get('reason') or '—'}"]
        return Entry(event, f"{_who(p)} {verb}", lines, "good" if p.get("verdict") == "approve" else "bad")
    if kind == "vote.refused":
        return Entry(event, f"Vote refused ({p.get('code')})",
                     [f"{p.get('verdict')} by {_who(p)} via {p.get('channel')}: {p.get('message')}"], "warn")
    if kind == "arguments.edited":
        lines = [f"via {p.get('channel')} as {p.get('reviewer')}", f"reason: {p.get('reason') or '—'}",
                 *(describe_diff(p.get("diff") or []).splitlines())]
        return Entry(event, f"{_who(p)} edited the arguments", lines, "warn", digest=p.get("args_hash"))
    if kind == "approval.granted":
        lines = [f"approvers: {', '.join(p.get('approvers') or [])}", f"bound to tool {p.get('tool')}, "
                 f"policy {p.get('policy_digest')}, until {utc(p.get('expires'))}"]
        return Entry(event, "Approved: quorum reached", lines, "good", digest=p.get("args_hash"))
    if kind == "execution.started":
        return Entry(event, "Running", [f"claimed by {p.get('holder')}"], digest=p.get("args_hash"))
    if kind in ("executed", "failed"):
        lines = [str(p["error"])] if p.get("error") else []
        return Entry(event, "Executed" if kind == "executed" else "Failed", lines, TERMINAL_TONE[kind],
                     digest=p.get("result_digest"))
    if kind in TERMINAL_TONE:
        by = f" by {_who(p)}" if p.get("by") or p.get("person") else ""
        return Entry(event, f"{kind.capitalize()}{by}", [str(p.get("reason") or "")], TERMINAL_TONE[kind])
    return Entry(event, kind, [])


def timeline(events: Sequence[Event]) -> list[Entry]:
    return [describe(e) for e in events]
