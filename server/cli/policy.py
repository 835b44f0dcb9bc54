"""`keyturn policy ...`: check, explain, test (and replay). Plain functions: parsed values in, exit code out.

Exit codes: 0 success, 1 the policy is invalid or a test failed, 2 bad input (arguments not JSON).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from server.approvals.quorum import needs
from server.classify import ClassifyContext, empty_facts, extract_facts
from server.classify.impact import with_measured
from server.config import Settings
from server.errors import KeyturnError, PolicyError
from server.models import ReviewSpec
from server.policy.conditions import FACT_SHAPE
from server.policy.engine import CompiledPolicy
from server.policy.loader import PolicyErrors, load_policy
from server.policy.replay import replay, summarise
from server.policy.testing import KNOWN_TOOL_CLASSIFIERS, call_for, run_suite

__all__ = ["classify_context", "cmd_check", "cmd_explain", "cmd_test", "replay", "summarise"]


def cmd_check(path: Path, settings: Settings | None = None, *, out: TextIO | None = None) -> int:
    """Validate a policy file (against the configured people and groups when `settings` is given)."""
    try:
        policy = _load(path, settings)
    except PolicyError as e:
        _print_errors(e, out or sys.stderr)
        return 1
    out = out or sys.stdout
    for warning in policy.warnings:
        print(f"warning: {warning}", file=out)
    if settings is not None:
        from server.runtime import unreachable_rules  # (the runtime only when a config is given)

        for line in unreachable_rules(policy, settings):
            print(f"warning: {line}", file=out)
    checked = "checked against the configured people and groups" if settings else "people and groups not checked"
    print(f"ok: {len(policy.rules)} rules, digest {policy.digest} ({checked})", file=out)
    return 0


def cmd_explain(
    policy_path: Path,
    tool: str,
    args_json: str,
    principal: str,
    model: str | None,
    settings: Settings | None = None,
    classifiers: Mapping[str, str] | None = None,
    *,
    as_json: bool = False,
    out: TextIO | None = None,
    measured_json: str | None = None,
) -> int:
    """Decide one call under the policy and print the decision with the trace of every rule. `measured_json`: facts
    a tool measures when the call is made (`facts.sql.rows_affected` ...), merged over the classifiers'."""
    out = out or sys.stdout
    try:
        arguments = json.loads(args_json)
        measured = json.loads(measured_json) if measured_json else {}
    except json.JSONDecodeError as e:
        print(f"error: --args or --facts is not valid JSON: {e}", file=out)
        return 2
    if not isinstance(arguments, dict):
        print("error: --args must be a JSON object", file=out)
        return 2
    if not isinstance(measured, dict) or not all(isinstance(v, dict) and k in FACT_SHAPE for k, v in measured.items()):
        print(f"error: --facts must be a JSON object of fact families ({', '.join(FACT_SHAPE)}), each an object",
              file=out)
        return 2
    try:
        policy = _load(policy_path, settings)
    except PolicyError as e:
        _print_errors(e, out if out is not sys.stdout else sys.stderr)
        return 1
    kinds = dict(classifiers) if classifiers is not None else KNOWN_TOOL_CLASSIFIERS.get(tool, {})
    call = call_for(tool, arguments, principal, model)
    try:
        facts = extract_facts(tool, arguments, kinds, call.annotations, classify_context(settings, policy_path))
        facts = with_measured(facts, measured)
    except KeyturnError as e:
        print(f"error: {e}", file=out)
        return 2
    trace = policy.explain(call, facts)
    trace["classifiers"] = kinds
    if as_json:
        print(json.dumps(trace, indent=2, default=str), file=out)
    else:
        print(render_explain(trace), file=out)
    return 0


def cmd_test(path: Path, *, out: TextIO | None = None) -> int:
    """Run a policy test file; print PASS/FAIL per case. 1 if any case fails or nothing loads."""
    try:
        result = run_suite(path)
    except PolicyError as e:
        _print_errors(e, out or sys.stderr)
        return 1
    out = out or sys.stdout
    for r in result.results:
        where = f"{result.path.name}:{r.line}" if r.line else result.path.name
        if r.passed:
            print(f"PASS  {where}  {r.name}", file=out)
        else:
            print(f"FAIL  {where}  {r.name}", file=out)
            for failure in r.failures:
                print(f"        {failure}", file=out)
    failed = len(result.failed)
    passed = len(result.results) - failed
    print("-" * 60, file=out)
    print(f"{result.path}: {passed} passed, {failed} failed (policy {result.policy})", file=out)
    return 1 if failed else 0


def classify_context(settings: Settings | None, policy_path: Path | None = None) -> ClassifyContext:
    """What the classifiers know about this installation, from the configuration."""
    if settings is None:
        return ClassifyContext(keyturn_paths=(policy_path.resolve(),) if policy_path else ())
    paths = [settings.db, settings.policy_path(), settings.config_file, policy_path]
    roots: list[Path] = []
    for pack in settings.tools:
        value = pack.options.get("roots", pack.options.get("root"))
        for r in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
            roots.append(Path(r).expanduser())
    return ClassifyContext(
        keyturn_paths=tuple(dict.fromkeys(p.resolve() for p in paths if p is not None)),
        keyturn_urls=(settings.reviewer_api_url,) if settings.reviewer_api_url else (),
        roots=tuple(roots),
    )


def render_explain(trace: Mapping[str, Any]) -> str:
    """The explain trace as text a person reads top to bottom."""
    d = trace["decision"]
    call = trace["call"]
    lines = [
        f"policy    {trace['policy']['path']}  (digest {trace['policy']['digest'][:12]})",
        f"call      {call['tool']}  principal {call['principal']}  model {call['model'] or '-'}",
        f"arguments {json.dumps(call['arguments'], ensure_ascii=False)[:300]}",
        "",
        f"decision  {d['outcome'].upper()}  risk {d['risk']}",
        f"reason    {d['reason']}",
    ]
    review = d.get("review")
    if review:
        groups = ", ".join(
            f"{g['quorum']} from {'any reviewer' if not g['members'] else ' '.join(g['members'])}"
            for g in review["groups"]
        )
        extra = "; reason required" if review["require_reason"] else ""
        lines.append(f"review    {groups}; timeout {_duration(review['timeout_s'])}{extra}")
        lines.append(f"needs     {needs(ReviewSpec.model_validate(review)).requirement()}")
        if (timeout := trace.get("timeout")) is not None:
            lines.append(f"timeout   {_duration(timeout['timeout_s'])}: {timeout['why']}")
        for e in review["escalation"]:
            lines.append(f"          after {_duration(e['after_s'])}: notify {', '.join(e['notify']) or '-'}")
        if review.get("impact"):
            lines.append(f"impact    {review['impact']}")
    if trace.get("builtin_guard"):
        lines.append(f"guard     {trace['builtin_guard']}: keyturn's built-in guard refused this call before any rule "
                     "(no policy file can allow it)")
    lines += ["", "rules"]
    skipped = 0
    for rule in trace["rules"]:
        if not rule["considered"]:
            skipped += 1
            continue
        mark = "MATCH" if rule["matched"] else "  -  "
        line = f"line {rule['line']}" if rule.get("line") else ""
        lines.append(f"  {mark} {rule['id']:<28} {rule['outcome']:<6} {rule['risk']:<8} {line:<9} {rule['why']}")
        if rule.get("when"):
            lines.append(f"        when: {' '.join(rule['when'].split())[:160]}")
    if skipped:
        lines.append(f"  ({skipped} other rule(s) do not apply to tool {call['tool']!r})")
    if trace["facts"].get("condition_errors"):
        lines += ["", "condition errors"]
        lines += [f"  {e['rule']}: {e['error']}" for e in trace["facts"]["condition_errors"]]
    lines += ["", "facts (non-empty)"]
    lines += [f"  {k} = {json.dumps(v, ensure_ascii=False)[:200]}" for k, v in _interesting(trace["facts"])]
    return "\n".join(lines)


def _interesting(facts: Mapping[str, Any]) -> list[tuple[str, Any]]:
    defaults = empty_facts()
    out: list[tuple[str, Any]] = []
    for family, value in facts.items():
        if family == "condition_errors":
            continue
        if isinstance(value, Mapping):
            for key, v in value.items():
                if v not in (False, None, [], {}, 0, "") and v != defaults.get(family, {}).get(key):
                    out.append((f"{family}.{key}", v))
        elif value not in (False, None, [], {}, 0, ""):
            out.append((family, value))
    return out


def _duration(seconds: float) -> str:
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def _load(path: Path, settings: Settings | None) -> CompiledPolicy:
    if settings is None:
        return load_policy(path)
    return load_policy(path, groups=settings.groups, people=set(settings.people))


def _print_errors(e: PolicyError, out: TextIO) -> None:
    problems = e.problems if isinstance(e, PolicyErrors) else (e,)
    for p in problems:
        print(f"error: {p}", file=out)
    if len(problems) > 1:
        print(f"{len(problems)} problems", file=out)
