"""Reading a policy file: YAML with line numbers -> schema -> checks -> a CompiledPolicy.

Every problem is a PolicyError naming the file, the line, the rule id and the field, and all
problems in a file are reported at once (`PolicyErrors.problems`), so `keyturn policy check`
can list them. Checks beyond the schema: unique rule ids, CEL that compiles and names real
variables and facts, reason placeholders, approver groups and people that exist (when the
configuration is known), escalation chains without cycles that fire before the timeout.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from server.canonical import sha256_hex
from server.errors import PolicyError, problem_text
from server.models import ApproverGroup, Escalation, ReviewSpec
from server.policy import schema
from server.policy.conditions import ConditionError, Template, compile_condition
from server.policy.engine import CompiledPolicy, CompiledRule, GrantLimits

Loc = tuple[str | int, ...]
_MAX_NODES = 200_000
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: same nodes, 10x faster
_MERGE_TAG = "tag:yaml.org,2002:merge"
_ALL_FIELDS = sorted(
    {
        (f.alias or name)
        for model in (
            schema.PolicySpec,
            schema.RuleSpec,
            schema.ReviewBlock,
            schema.ApproverSpec,
            schema.EscalationStep,
            schema.GrantLimits,
        )
        for name, f in model.model_fields.items()
    }
)


@dataclass(frozen=True)
class Problem:
    message: str
    file: str | None = None
    line: int | None = None
    rule: str | None = None
    field: str | None = None

    def error(self) -> PolicyError:
        return PolicyError(self.message, file=self.file, line=self.line, rule=self.rule, field=self.field)


class PolicyErrors(PolicyError):
    """All the problems found in one policy file; the first one is the exception's own location."""

    def __init__(self, problems: list[Problem]) -> None:
        unique = list(dict.fromkeys(problems))
        first = unique[0]
        more = "".join(f"\n  also: {p.error()}" for p in unique[1:])
        super().__init__(first.message + more, file=first.file, line=first.line, rule=first.rule, field=first.field)
        self.problems = tuple(p.error() for p in unique)


def load_policy(
    path: Path, *, groups: Mapping[str, set[str]] | None = None, people: set[str] | None = None
) -> CompiledPolicy:
    """Read and compile a policy file. Raises PolicyError (PolicyErrors when there are several)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PolicyError(f"cannot read the policy file: {e.strerror or e}", file=str(path)) from e
    return _parse(data, source=str(path), path=Path(path), groups=groups, people=people)


def parse_policy(
    text: str,
    *,
    source: str = "<string>",
    groups: Mapping[str, set[str]] | None = None,
    people: set[str] | None = None,
) -> CompiledPolicy:
    return _parse(text.encode("utf-8"), source=source, path=None, groups=groups, people=people)


def _parse(
    data: bytes, *, source: str, path: Path | None, groups: Mapping[str, set[str]] | None, people: set[str] | None
) -> CompiledPolicy:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"not UTF-8 text (byte {e.start})", file=source) from e
    raw, lines = read_yaml(text, source)
    if not isinstance(raw, dict):
        raise PolicyError("expected a mapping at the top level (version: 1, rules: [...])", file=source, line=1)
    problems: list[Problem] = []

    def problem(message: str, loc: Loc) -> None:
        problems.append(_located(message, loc, raw, lines, source))

    try:
        spec = schema.PolicySpec.model_validate(raw)
    except ValidationError as e:
        for err in e.errors():
            loc = _clean_loc(tuple(err["loc"]), raw)
            problem(_message(err), loc)
        # The rules' own checks still run on what can be read, so one round of fixes meets every problem.
        _check_raw_rules(raw, problem)
        raise PolicyErrors(problems) from None
    builder = _Builder(spec, groups, people, problem, lines)
    rules = builder.rules()
    if problems:
        raise PolicyErrors(problems)
    return CompiledPolicy(
        rules=rules,
        default_outcome=spec.default,
        default_risk=spec.default_risk,
        default_review=builder.default_review,
        variables=spec.vars,
        grant_limits=grant_limits(spec.review.grants),
        digest=sha256_hex(data),
        path=path,
        source=source,
    )


def grant_limits(given: schema.GrantLimits | None) -> GrantLimits | None:
    """The policy's bounds on standing grants; None when it forbids them (`review: {grants: false}`)."""
    spec = given if given is not None else schema.GrantLimits.model_validate({})
    if not spec.enabled:
        return None
    return GrantLimits(max_for_s=spec.max_for, max_uses=spec.max_uses)


def _check_raw_rules(raw: dict[str, Any], problem: Callable[[str, Loc], None]) -> None:
    """Duplicate ids, conditions and reason templates of rules in a file whose schema failed: the same checks as
    `_Builder.rules`, on the raw data (a field the schema refused is not judged again)."""
    rules = raw.get("rules")
    if not isinstance(rules, list):
        return
    variables = raw.get("vars") if isinstance(raw.get("vars"), dict) else {}
    seen: dict[Any, int] = {}
    for i, r in enumerate(rules):
        if not isinstance(r, dict):
            continue
        loc: Loc = ("rules", i)
        rule_id = r.get("id")
        if isinstance(rule_id, str):
            if rule_id in seen:
                problem(f"duplicate rule id (first used by rule #{seen[rule_id] + 1})", (*loc, "id"))
            seen.setdefault(rule_id, i)
        checks: list[tuple[str, Callable[[str], Any]]] = [
            ("when", lambda text: compile_condition(text, variables)), ("reason", Template.parse)]
        for field_name, check in checks:
            text = r.get(field_name)
            if not isinstance(text, str):
                continue
            try:
                check(text)
            except ConditionError as e:
                problem(str(e), (*loc, field_name))
            except Exception:  # (vars the schema refused may not compile: that problem is listed already)
                continue


class _Builder:
    """Turns the validated spec into compiled rules, reporting problems with their locations."""

    def __init__(
        self,
        spec: schema.PolicySpec,
        groups: Mapping[str, set[str]] | None,
        people: set[str] | None,
        problem: Callable[[str, Loc], None],
        lines: dict[Loc, int],
    ) -> None:
        self.spec, self.groups, self.people, self.problem, self.lines = spec, groups, people, problem, lines
        self.chains: dict[str, tuple[Escalation, ...]] = {}
        for name in spec.escalations:
            self.chains[name] = self._chain(name, (), ("escalations", name))
        self._defaults: ReviewSpec | None = None
        self._defaults = self.default_review = self._review(None, ("review",))

    def rules(self) -> tuple[CompiledRule, ...]:
        out: list[CompiledRule] = []
        seen: dict[str, int] = {}
        for i, r in enumerate(self.spec.rules):
            loc: Loc = ("rules", i)
            if r.id in seen:
                self.problem(f"duplicate rule id (first used by rule #{seen[r.id] + 1})", (*loc, "id"))
            seen.setdefault(r.id, i)
            condition = None
            if r.when is not None:
                try:
                    condition = compile_condition(r.when, self.spec.vars)
                except ConditionError as e:
                    self.problem(str(e), (*loc, "when"))
            reason = self._template(r.reason or f"rule {r.id}", (*loc, "reason"))
            review = self._review(r.review, (*loc, "review")) if r.outcome == "review" else None
            out.append(
                CompiledRule(
                    index=i,
                    id=r.id,
                    line=self.lines.get(loc),
                    tools=r.tool,
                    principals=r.principal,
                    models=r.model,
                    condition=condition,
                    outcome=r.outcome,
                    risk=r.risk or self.spec.default_risk,
                    reason=reason,
                    review=review,
                    enabled=r.enabled,
                    grants=(r.grants if r.grants is not None else (r.risk or self.spec.default_risk) != "critical")
                    if r.outcome == "review" else False,
                )
            )
        return tuple(out)

    def _template(self, text: str, loc: Loc) -> Template:
        try:
            return Template.parse(text)
        except ConditionError as e:
            self.problem(str(e), loc)
            return Template(text, ())

    def _review(self, block: schema.ReviewBlock | None, loc: Loc) -> ReviewSpec:
        """The policy's review defaults overridden field by field by a rule's `review:` block."""
        base = self.spec.review
        defaults = self._defaults  # None while the policy's own defaults are being built
        if block is None and defaults is not None:
            return defaults
        block = block or schema.ReviewBlock()
        if block.approvers is not None or defaults is None:
            approvers = block.approvers or base.approvers or (schema.ApproverSpec(any=True, quorum=1),)
            approvers_loc = (*loc, "approvers")
            groups = tuple(self._approver(a, (*approvers_loc, j)) for j, a in enumerate(approvers))
            names = [g.name for g in groups]
            for j, name in enumerate(names):
                if name in names[:j]:
                    self.problem(
                        f"approver entry {name!r} is listed twice (raise its quorum instead)", (*approvers_loc, j)
                    )
        else:
            groups = defaults.groups
        timeout = block.timeout or base.timeout or 900.0
        steps: tuple[Escalation, ...]
        if block.escalation is None and defaults is not None:
            steps, escalation_loc = defaults.escalation, (*loc, "timeout")
        else:
            escalation = block.escalation if block.escalation is not None else base.escalation
            escalation_loc = (*loc, "escalation")
            steps = ()
            if isinstance(escalation, str):
                if escalation not in self.spec.escalations:
                    known = sorted(self.spec.escalations)
                    self.problem(f"unknown escalation {escalation!r} (defined: {known or 'none'})", escalation_loc)
                steps = self.chains.get(escalation, ())
            elif escalation:
                steps = self._steps(escalation, 0.0, (), escalation_loc)
        for e in steps:
            if e.after_s >= timeout:
                self.problem(
                    f"escalation after {e.after_s:g}s never fires: the review times out after {timeout:g}s",
                    escalation_loc,
                )
                break
        return ReviewSpec(
            groups=groups,
            timeout_s=timeout,
            require_reason=bool(block.require_reason if block.require_reason is not None else base.require_reason),
            channels=tuple(block.channels if block.channels is not None else base.channels or ()),
            escalation=steps,
        )

    def _approver(self, a: schema.ApproverSpec, loc: Loc) -> ApproverGroup:
        if a.group is not None:
            if self.groups is not None:
                if a.group not in self.groups:
                    known = sorted(self.groups)
                    self.problem(
                        f"unknown approver group {a.group!r} (configured groups: {known or 'none'})", (*loc, "group")
                    )
                elif a.quorum > len(self.groups[a.group]):
                    self.problem(
                        f"quorum {a.quorum} but group {a.group!r} has {len(self.groups[a.group])} member(s)",
                        (*loc, "quorum"),
                    )
            return ApproverGroup(name=a.group, members=(f"group:{a.group}",), quorum=a.quorum)
        if a.people is not None:
            if self.people is not None:
                for k, person in enumerate(a.people):
                    if person not in self.people:
                        self.problem(
                            f"unknown person {person!r} (configured people: {sorted(self.people)})", (*loc, "people", k)
                        )
            return ApproverGroup(name="people:" + "+".join(a.people), members=a.people, quorum=a.quorum)
        return ApproverGroup(name="any", members=(), quorum=a.quorum)

    def _chain(self, name: str, stack: tuple[str, ...], loc: Loc) -> tuple[Escalation, ...]:
        if name in stack:
            cycle = " -> ".join((*stack[stack.index(name) :], name))
            self.problem(f"escalation cycle: {cycle}", loc)
            return ()
        return self._steps(self.spec.escalations[name], 0.0, (*stack, name), ("escalations", name))

    def _steps(
        self, steps: tuple[schema.EscalationStep, ...], offset: float, stack: tuple[str, ...], loc: Loc
    ) -> tuple[Escalation, ...]:
        out: list[Escalation] = []
        for k, step in enumerate(steps):
            at = offset + step.after
            for n, target in enumerate(step.notify):
                if not self._known_target(target):
                    self.problem(f"unknown group or person {target!r} to notify", (*loc, k, "notify", n))
            if step.notify or step.channels:
                out.append(Escalation(after_s=at, notify=step.notify, channels=step.channels))
            if step.then is not None:
                if step.then not in self.spec.escalations:
                    self.problem(
                        f"unknown escalation {step.then!r} (defined: {sorted(self.spec.escalations)})",
                        (*loc, k, "then"),
                    )
                elif step.then in stack:
                    cycle = " -> ".join((*stack[stack.index(step.then) :], step.then))
                    self.problem(f"escalation cycle: {cycle}", (*loc, k, "then"))
                else:
                    nested = self._steps(
                        self.spec.escalations[step.then], at, (*stack, step.then), ("escalations", step.then)
                    )
                    out.extend(nested)
        return tuple(sorted(out, key=lambda e: e.after_s))

    def _known_target(self, name: str) -> bool:
        if self.groups is None and self.people is None:
            return True
        return name in (self.groups or {}) or name in (self.people or set())


# -- YAML with line numbers ---------------------------------------------------------------------


def read_yaml(text: str, source: str) -> tuple[Any, dict[Loc, int]]:
    """Parse YAML into plain data plus a map from each path (("rules", 0, "when")) to its line number."""
    try:
        node = yaml.compose(text, Loader=_YAML_LOADER)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise PolicyError(
            f"not valid YAML: {e.problem or e}", file=source, line=mark.line + 1 if mark else None
        ) from None
    except yaml.YAMLError as e:
        raise PolicyError(f"not valid YAML: {e}", file=source) from None
    if node is None:
        raise PolicyError("the policy file is empty", file=source)
    lines: dict[Loc, int] = {}
    builder = _YamlBuilder(source, lines)
    return builder.build(node, ()), lines


class _YamlBuilder:
    def __init__(self, source: str, lines: dict[Loc, int]) -> None:
        self.source, self.lines, self.count = source, lines, 0
        self.constructor = SafeConstructor()
        self.active: set[int] = set()

    def build(self, node: Node, loc: Loc) -> Any:
        self.count += 1
        if self.count > _MAX_NODES:
            raise PolicyError(
                "the policy file is too large (aliases expanding?)", file=self.source, line=node.start_mark.line + 1
            )
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if id(node) in self.active:
            raise PolicyError("recursive YAML alias", file=self.source, line=node.start_mark.line + 1)
        if isinstance(node, ScalarNode):
            try:
                return self.constructor.construct_object(node, deep=True)
            except ConstructorError as e:
                raise PolicyError(
                    f"not valid here: {e.problem}", file=self.source, line=node.start_mark.line + 1
                ) from None
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                return [self.build(child, (*loc, i)) for i, child in enumerate(node.value)]
            if isinstance(node, MappingNode):
                return self._mapping(node, loc)
        finally:
            self.active.discard(id(node))
        raise PolicyError(f"unsupported YAML node {node.tag}", file=self.source, line=node.start_mark.line + 1)

    def _mapping(self, node: MappingNode, loc: Loc) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        merged: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                value = self.build(value_node, loc)
                for m in value if isinstance(value, list) else [value]:
                    if isinstance(m, dict):
                        merged.update({k: v for k, v in m.items() if k not in merged})
                continue
            key = self.build(key_node, (*loc, "<key>"))
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise PolicyError(
                    "mapping keys must be plain scalars", file=self.source, line=key_node.start_mark.line + 1
                )
            if key in out:
                raise PolicyError(f"duplicate key {key!r}", file=self.source, line=key_node.start_mark.line + 1)
            part = key if isinstance(key, (str, int)) else str(key)
            self.lines[(*loc, part)] = key_node.start_mark.line + 1
            out[key] = self.build(value_node, (*loc, part))
        for k, v in merged.items():
            out.setdefault(k, v)
        return out


# -- error locations ----------------------------------------------------------------------------


def _clean_loc(loc: Loc, data: Any) -> Loc:
    """Drop the union-member tags pydantic adds to a location, keeping the path through the data."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        elif (
            isinstance(node, dict)
            and isinstance(part, str)
            and not part.startswith(("tuple[", "list[", "str", "function-"))
        ):
            out.append(part)  # a missing or unknown field: name it
            node = None
    return tuple(out)


def _located(message: str, loc: Loc, data: dict[str, Any], lines: dict[Loc, int], source: str) -> Problem:
    line = None
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            line = lines[loc[:n]]
            break
    rule = None
    field_loc = loc
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        rules = data.get("rules")
        entry = rules[loc[1]] if isinstance(rules, list) and loc[1] < len(rules) else None
        rule = str(entry["id"]) if isinstance(entry, dict) and "id" in entry else f"#{loc[1] + 1}"
        field_loc = loc[2:]
    return Problem(message, file=source, line=line, rule=rule, field=_dotted(field_loc) or None)


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: Any) -> str:
    kind, loc = err.get("type", ""), err.get("loc", ())
    if kind == "extra_forbidden" and loc:
        name = str(loc[-1])
        close = difflib.get_close_matches(name, _ALL_FIELDS, n=1)
        return f"unknown field {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
    if kind == "missing" and loc:
        return f"missing required field {str(loc[-1])!r}"
    if kind == "string_type" and isinstance(err.get("input"), bool):
        return "expected text, got a boolean (YAML reads yes/no/on/off as true/false: quote it)"
    if kind == "literal_error" and loc and loc[-1] == "version":
        return "unsupported policy version (this keyturn reads version: 1)"
    return problem_text(err)  # the policy's own hints above, then what every pydantic error says
