"""Policy test cases: a YAML file beside the policy that pins what it decides for real calls.

```yaml
policy: default.yaml                  # relative to this file
context:                              # optional: what the classifiers know about keyturn
  roots: [/srv/agent]
  keyturn_paths: [/var/lib/keyturn/keyturn.db]
  keyturn_urls: ["http://127.0.0.1:8765"]
now: 2025-03-12T10:00:00Z             # optional: the time the calls are made (per case too)
cases:
  - name: a plain SELECT runs without asking
    tool: sql_query
    args: {query: "SELECT * FROM orders WHERE id = 1"}
    expect: {outcome: allow, risk: low, rules: [sql-read]}   # rules: ids that must be among the matches
```
Facts are extracted with the classifiers of the shipped tools (`KNOWN_TOOL_CLASSIFIERS`) unless a
case gives its own `classifiers:`. What a tool measures when the call is made (the rows a SQL write would touch)
a case gives as `facts:`, merged over the classifiers' family by family:

```yaml
  - name: a delete of 1,204 of 50,311 rows needs two people
    tool: sql_execute
    args: {statement: "DELETE FROM orders WHERE status = 'stale'"}
    facts: {sql: {impact: measured, impact_known: true, rows_affected: 1204, table_rows: 50311}}
    expect: {outcome: review, quorum: 2}
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.canonical import args_hash
from server.classify import ClassifyContext, extract_facts
from server.classify.impact import with_measured
from server.errors import ClassifierError, PolicyError, dotted, problems
from server.models import Decision, Outcome, RiskLevel, ToolCall
from server.policy.conditions import FACT_SHAPE
from server.policy.engine import CompiledPolicy
from server.policy.engine import approvals_needed as engine_approvals_needed
from server.policy.loader import load_policy, read_yaml

# What the shipped tool packs (tools/*.py) declare, so tests and `policy explain` need not load them.
KNOWN_TOOL_CLASSIFIERS: dict[str, dict[str, str]] = {
    "sql_query": {"query": "sql"},
    "sql_execute": {"statement": "sql"},
    "sql_export": {"query": "sql", "path": "path"},
    "shell_run": {"command": "shell", "argv": "argv", "cwd": "path"},
    "files_read": {"path": "path"},
    "files_write": {"path": "path", "content": "size"},
    "files_move": {"source": "path", "destination": "path"},
    "files_delete": {"path": "path"},
    "http_request": {"url": "url", "headers": "secret", "body": "size"},
    "secrets_rotate": {},
    "secrets_metadata": {},
    "secrets_read": {},
    "keyturn_status": {},
    "keyturn_cancel": {},
}
_READ = {"readOnlyHint": True, "openWorldHint": False}
_CHANGE = {"readOnlyHint": False, "destructiveHint": True, "openWorldHint": False}
KNOWN_TOOL_ANNOTATIONS: dict[str, dict[str, Any]] = {
    "sql_query": _READ,
    "sql_execute": {"destructiveHint": True, "openWorldHint": False},
    "sql_export": {"readOnlyHint": False, "destructiveHint": False, "openWorldHint": False},
    "shell_run": {**_CHANGE, "openWorldHint": True},
    "files_read": _READ,
    "files_write": _CHANGE,
    "files_move": _CHANGE,
    "files_delete": _CHANGE,
    "http_request": {**_CHANGE, "openWorldHint": True},
    "secrets_rotate": _CHANGE,
    "secrets_metadata": _READ,
    "secrets_read": _READ,
    "keyturn_status": _READ,
    "keyturn_cancel": {"readOnlyHint": False, "destructiveHint": False, "openWorldHint": False},
}


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Expect(_Strict):
    outcome: Outcome
    risk: RiskLevel | None = None
    rules: tuple[str, ...] | None = None  # must all be among the matched rules
    not_rules: tuple[str, ...] = ()  # must not match
    quorum: int | None = None  # distinct approvals needed (review only): the largest requirement's total
    require_reason: bool | None = None
    reason_contains: str | None = None


class Case(_Strict):
    name: str
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)
    principal: str = "agent"
    model: str | None = None
    classifiers: dict[str, str] | None = None
    annotations: dict[str, Any] | None = None
    facts: dict[str, dict[str, Any]] | None = None  # measured facts, merged over the classifiers' (see above)
    now: datetime | None = None  # the call's time (UTC when no zone is given); default: the suite's, else now
    expect: Expect


class SuiteContext(_Strict):
    roots: tuple[str, ...] = ()
    keyturn_paths: tuple[str, ...] = ()
    keyturn_urls: tuple[str, ...] = ()
    sql_dialect: str | None = None


class Suite(_Strict):
    policy: str
    context: SuiteContext = SuiteContext()
    now: datetime | None = None
    cases: tuple[Case, ...]


@dataclass
class CaseResult:
    name: str
    line: int | None
    passed: bool
    failures: list[str] = field(default_factory=list)
    decision: Decision | None = None


@dataclass
class SuiteResult:
    path: Path
    policy: Path
    results: list[CaseResult]

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]


def call_for(tool: str, args: dict[str, Any], principal: str = "agent", model: str | None = None,
             annotations: Mapping[str, Any] | None = None) -> ToolCall:  # fmt: skip
    """A ToolCall as the gate would build it, for tests and `policy explain`."""
    return ToolCall(
        call_id="policy-test",
        tool=tool,
        arguments=args,
        args_hash=args_hash(args),
        principal=principal,
        model=model,
        annotations=dict(annotations if annotations is not None else KNOWN_TOOL_ANNOTATIONS.get(tool, {})),
    )


def run_case(policy: CompiledPolicy, case: Case, ctx: ClassifyContext, *, now: datetime | None = None) -> CaseResult:
    classifiers = case.classifiers if case.classifiers is not None else KNOWN_TOOL_CLASSIFIERS.get(case.tool, {})
    call = call_for(case.tool, case.args, case.principal, case.model, case.annotations)
    if unknown := sorted(set(case.facts or {}) - set(FACT_SHAPE)):
        return CaseResult(case.name, None, False, [f"facts: unknown fact family {unknown[0]!r} (known: "
                                                   f"{', '.join(FACT_SHAPE)})"])
    try:
        facts = with_measured(extract_facts(call.tool, call.arguments, classifiers, call.annotations, ctx),
                              case.facts or {})
    except ClassifierError as e:
        return CaseResult(case.name, None, False, [f"classifier error: {e}"])
    decision = policy.decide(call, facts, now=case.now or now)
    return CaseResult(case.name, None, not (failures := check(decision, case.expect)), failures, decision)


def check(decision: Decision, expect: Expect) -> list[str]:
    failures = []
    matched = [r.id for r in decision.rules]
    if decision.outcome != expect.outcome:
        failures.append(f"expected outcome {expect.outcome}, got {decision.outcome} ({decision.reason})")
    if expect.risk is not None and decision.risk != expect.risk:
        failures.append(f"expected risk {expect.risk}, got {decision.risk}")
    for rule in expect.rules or ():
        if rule not in matched:
            failures.append(f"expected rule {rule!r} to match; matched: {matched or 'none'}")
    for rule in expect.not_rules:
        if rule in matched:
            failures.append(f"expected rule {rule!r} not to match")
    if expect.quorum is not None:
        total = approvals_needed(decision)
        if total != expect.quorum:
            failures.append(f"expected quorum {expect.quorum}, got {total}")
    if expect.require_reason is not None:
        got = bool(decision.review and decision.review.require_reason)
        if got != expect.require_reason:
            failures.append(f"expected require_reason {expect.require_reason}, got {got}")
    if expect.reason_contains is not None and expect.reason_contains not in decision.reason:
        failures.append(f"expected the reason to contain {expect.reason_contains!r}: {decision.reason!r}")
    return failures


def approvals_needed(decision: Decision) -> int:
    """Distinct approvals a review needs at least: groups of one requirement add up; requirements overlap."""
    return 0 if decision.review is None else engine_approvals_needed(decision.review)


def load_suite(path: Path) -> tuple[Suite, dict[tuple[str | int, ...], int]]:
    """Parse a test file. Raises PolicyError naming the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError(f"cannot read the test file: {e.strerror or e}", file=str(path)) from e
    raw, lines = read_yaml(text, str(path))
    try:
        return Suite.model_validate(raw), lines
    except ValidationError as e:
        loc, text = problems(e)[0]
        line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
        raise PolicyError(f"{dotted(loc)}: {text}", file=str(path), line=line) from None


def run_suite(path: Path, *, now: datetime | None = None) -> SuiteResult:
    """Load the suite and its policy, run every case. Raises PolicyError if either does not load."""
    suite, lines = load_suite(path)
    base = Path(path).resolve().parent
    policy_path = (base / suite.policy).resolve()
    policy = load_policy(policy_path)
    ctx = ClassifyContext(
        keyturn_paths=tuple(_path(base, p) for p in suite.context.keyturn_paths),
        keyturn_urls=suite.context.keyturn_urls,
        roots=tuple(_path(base, p) for p in suite.context.roots),
        sql_dialect=suite.context.sql_dialect,
    )
    results = []
    for i, case in enumerate(suite.cases):
        result = run_case(policy, case, ctx, now=now or suite.now)
        result.line = lines.get(("cases", i))
        results.append(result)
    return SuiteResult(Path(path), policy_path, results)


def _path(base: Path, p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else base / path
