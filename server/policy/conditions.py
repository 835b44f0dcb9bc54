"""Rule conditions (CEL) and reason templates: compiled and checked once, when the policy loads.

A condition sees these variables:

- `tool`, `principal`, `model` (`""` when unknown), `on_behalf_of`, `client`, `session` — strings
- `args` — the call's arguments; `facts` — the classifiers' facts (every family always present)
- `annotations` — the tool's annotations, normalised (`read_only`, `destructive`, ...)
- `time` — the call's time as a CEL timestamp (UTC); `vars` — the policy's `vars:` constants

and these functions besides CEL's own: `glob(s, pattern_or_list)`, `lower(s)`, `upper(s)`.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cel
from cel.stdlib import STDLIB_FUNCTIONS

from server.classify import empty_facts

VARIABLES = frozenset({"tool", "args", "facts", "principal", "model", "on_behalf_of", "client", "session",
                       "annotations", "time", "vars"})  # fmt: skip
_MACRO_BINDING = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_ANY_STRING = re.compile(
    r'''[rRbB]{0,2}(?:"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')'''
)
_FACT_REF = re.compile(r"(?<![\w.])facts\s*\.\s*([A-Za-z_]\w*)(?:\s*\.\s*([A-Za-z_]\w*))?")
_FACT_PATH = _FACT_REF
_HAS_FACT = re.compile(r"\bhas\s*\(\s*facts\s*\.\s*([A-Za-z_]\w*)(?:\s*\.\s*([A-Za-z_]\w*))?\s*\)")
_VAR_REF = re.compile(r"(?<![\w.])vars\s*\.\s*([A-Za-z_]\w*)")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w.]*)\}")
_CEL_POSITION = re.compile(r"<input>:(\d+):(\d+):\s*(.*)")
FACT_SHAPE: dict[str, Any] = empty_facts()


def _glob(value: Any, pattern: Any) -> bool:
    if not isinstance(value, str):
        return False
    patterns = pattern if isinstance(pattern, list) else [pattern]
    return any(isinstance(p, str) and fnmatch.fnmatchcase(value, p) for p in patterns)


def _lower(value: str) -> str:
    return value.lower()


def _upper(value: str) -> str:
    return value.upper()


FUNCTIONS: dict[str, Callable[..., Any]] = {"glob": _glob, "lower": _lower, "upper": _upper}
# cel-go's extension libraries (split, join, math.greatest, sets.contains ...), registered only where used
AVAILABLE: dict[str, Callable[..., Any]] = {**STDLIB_FUNCTIONS, **FUNCTIONS}
NATIVE_FUNCTIONS = frozenset({
    "size", "contains", "startsWith", "endsWith", "matches", "int", "uint", "double", "string", "bytes",
    "timestamp", "duration", "dyn", "type", "has", "all", "exists", "exists_one", "map", "filter",
    "getFullYear", "getMonth", "getDayOfYear", "getDayOfMonth", "getDate", "getDayOfWeek", "getHours",
    "getMinutes", "getSeconds", "getMilliseconds",
})  # fmt: skip


class ConditionError(ValueError):
    """A condition that does not compile or names something that does not exist. `line` is within the expression."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


Slot = tuple[str, tuple[str, ...]]  # (CEL variable name, path into the full activation)


@dataclass(frozen=True)
class Condition:
    """A compiled condition. `slots` are exactly the values it reads, so a call converts only those into CEL."""

    source: str  # as written in the policy
    compiled: str  # what was compiled: fact references flattened, `vars.x` inlined as literals
    program: Any  # cel.Program
    slots: tuple[Slot, ...]
    functions: tuple[tuple[str, Callable[..., Any]], ...] = ()  # Python functions it calls
    unknown_functions: tuple[str, ...] = ()  # neither CEL's nor ours: will fail (closed) at call time

    def evaluate(self, context: Any) -> Any:
        return self.program.execute(context)


def compile_condition(source: str, variables: Mapping[str, Any] | None = None) -> Condition:
    """Compile a CEL condition and check the names it uses. Raises ConditionError.

    Converting nested maps into CEL costs microseconds per entry, so `facts.sql.kinds` is compiled
    as a flat variable `facts__sql__kinds` and `vars.allowed_hosts` as the literal list. Every fact
    always exists, so `has(facts.sql.kinds)` is `true`.
    """
    try:
        program = cel.compile(source)
    except (ValueError, RuntimeError, TypeError) as e:
        raise _position_error(str(e)) from None
    names = set(program.variables())
    bound = set(_MACRO_BINDING.findall(source))
    unknown = sorted(names - VARIABLES - bound)
    if unknown:
        raise ConditionError(f"unknown variable {unknown[0]!r} (conditions see: {', '.join(sorted(VARIABLES))})")
    _check_facts(source)
    flat, slots = _flatten(source, variables or {})
    if flat != source and not (names & bound & {"facts", "vars"}):
        try:
            flat_program = cel.compile(flat)
        except (ValueError, RuntimeError, TypeError):
            pass  # an expression the rewrite does not understand: evaluate it as written
        else:
            rest = set(flat_program.variables()) & VARIABLES
            slots = (*slots, *((n, (n,)) for n in sorted(rest)))
            return Condition(source, flat, flat_program, slots, *_functions(flat_program))
    slots = tuple((n, (n,)) for n in sorted(names & VARIABLES))
    return Condition(source, source, program, slots, *_functions(program))


def _functions(program: Any) -> tuple[tuple[tuple[str, Callable[..., Any]], ...], tuple[str, ...]]:
    called = {f for f in program.functions() if not f.startswith(("_", "@", "!"))}
    needed = tuple((n, f) for n, f in AVAILABLE.items() if n.rsplit(".", 1)[-1] in called)
    provided = {n.rsplit(".", 1)[-1] for n, _ in needed}
    return needed, tuple(sorted(called - provided - NATIVE_FUNCTIONS))


def _flatten(source: str, variables: Mapping[str, Any]) -> tuple[str, tuple[Slot, ...]]:
    slots: dict[str, tuple[str, ...]] = {}

    def has_fact(m: re.Match[str]) -> str:
        family, fact = m.group(1), m.group(2)
        shape = FACT_SHAPE.get(family)
        known = shape is not None and (not fact or (isinstance(shape, dict) and fact in shape))
        return "true" if known else m.group(0)

    def fact(m: re.Match[str]) -> str:
        family, field_ = m.group(1), m.group(2)
        shape = FACT_SHAPE.get(family)
        path: tuple[str, ...]
        if field_ and isinstance(shape, dict) and field_ in shape:
            name, path = f"facts__{family}__{field_}", ("facts", family, field_)
        elif shape is not None:
            name, path = f"facts__{family}", ("facts", family)
            if field_:
                return f"{name}.{field_}"
        else:
            return m.group(0)
        slots[name] = path
        return name

    def var(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in variables:
            return m.group(0)
        try:
            return _cel_literal(variables[name])
        except ValueError:
            return m.group(0)

    out = []
    for is_string, text in _segments(source):
        if not is_string:
            text = _HAS_FACT.sub(has_fact, text)
            text = _FACT_PATH.sub(fact, text)
            text = _VAR_REF.sub(var, text)
        out.append(text)
    return "".join(out), tuple(slots.items())


def _segments(source: str) -> list[tuple[bool, str]]:
    """The expression split into (is a string literal, text) pieces."""
    out: list[tuple[bool, str]] = []
    pos = 0
    for m in _ANY_STRING.finditer(source):
        out.append((False, source[pos : m.start()]))
        out.append((True, m.group(0)))
        pos = m.end()
    out.append((False, source[pos:]))
    return out


def _cel_literal(value: Any) -> str:
    """A JSON-like constant as CEL source (JSON is CEL, apart from non-finite numbers)."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        raise ValueError("not representable")
    if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
        text = json.dumps(value)
        return f"double({text})" if isinstance(value, float) and "." not in text and "e" not in text else text
    if isinstance(value, list):
        return "[" + ", ".join(_cel_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_cel_literal(v)}" for k, v in value.items()) + "}"
    raise ValueError("not representable")


def _check_facts(source: str) -> None:
    code = "".join(text for is_string, text in _segments(source) if not is_string)
    for family, fact in _FACT_REF.findall(code):
        _check_fact(family, fact)


def _check_fact(family: str, fact: str) -> None:
    """A ConditionError naming the closest known fact when `facts.<family>[.<fact>]` does not exist."""
    if family not in FACT_SHAPE:
        raise ConditionError(f"unknown fact family 'facts.{family}'{_did_you_mean(family, FACT_SHAPE)} "
                             f"(known: {', '.join(FACT_SHAPE)})")
    shape = FACT_SHAPE[family]
    if fact and isinstance(shape, dict) and fact not in shape:
        raise ConditionError(f"unknown fact 'facts.{family}.{fact}'{_did_you_mean(fact, shape, f'facts.{family}.')} "
                             f"(known: {', '.join(shape)})")


def _did_you_mean(name: str, known: Iterable[str], prefix: str = "facts.") -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _position_error(message: str) -> ConditionError:
    m = _CEL_POSITION.search(message)
    if not m:
        return ConditionError(f"does not compile: {message.splitlines()[0] if message else 'syntax error'}")
    line, col, what = int(m.group(1)), int(m.group(2)), m.group(3).strip()
    return ConditionError(f"does not compile: {what} (at line {line}, column {col} of the condition)", line)


@dataclass(frozen=True)
class Template:
    """A reason like "DELETE without WHERE on {facts.sql.tables}": placeholders are dotted paths."""

    source: str
    paths: tuple[str, ...]

    @classmethod
    def parse(cls, source: str) -> Template:
        paths = tuple(_PLACEHOLDER.findall(source))
        for path in paths:
            root, *rest = path.split(".")
            if root not in VARIABLES:
                close = difflib.get_close_matches(root, sorted(VARIABLES), n=1)
                hint = f" (did you mean {{{'.'.join([close[0], *rest])}}}?)" if close else ""
                raise ConditionError(f"placeholder {{{path}}} must start with one of: {', '.join(sorted(VARIABLES))}"
                                     + hint)
            if root == "facts" and rest:
                # A fact that does not exist would read "?" in every reason: an error, like in a condition.
                try:
                    _check_fact(rest[0], rest[1] if len(rest) > 1 else "")
                except ConditionError as e:
                    raise ConditionError(f"placeholder {{{path}}}: {e}") from None
        return cls(source, paths)

    def render(self, activation: Mapping[str, Any], max_len: int = 200) -> str:
        if not self.paths:
            return self.source

        def value(m: re.Match[str]) -> str:
            node: Any = activation
            for part in m.group(1).split("."):
                if isinstance(node, Mapping) and part in node:
                    node = node[part]
                else:
                    return "?"
            if isinstance(node, (list, tuple)):
                text = ", ".join(str(v) for v in node) or "(none)"
            elif isinstance(node, bool):
                text = "true" if node else "false"
            elif node is None:
                text = "(none)"
            else:
                text = str(node)
            return text if len(text) <= max_len else text[: max_len - 1] + "…"

        return _PLACEHOLDER.sub(value, self.source)
