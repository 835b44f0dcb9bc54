"""Argument classifiers: turn a tool call's arguments into facts the policy can reason about.

A tool declares which of its arguments are SQL, shell, paths, URLs ... (`classifiers`); some
checks run on every call whatever the tool declares: secret-looking values, the target
environment, and whether the call would act on keyturn itself. Every fact family is always
present with empty defaults, so a policy condition like `facts.sql.kinds` never fails on a
non-SQL tool. Hostile input never raises: what cannot be understood is a fact (`unparseable`,
`classifier_errors`). What the classifiers find about secrets makes the call's one `Redaction`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlglot

from server.classify import env, paths, secrets, selfref, shell, sql, urls
from server.classify.redaction import Redaction
from server.errors import ClassifierError

__all__ = ["KINDS", "REDACTED", "ClassifyContext", "Redaction", "empty_facts", "extract_facts", "normalise_annotations"]

KINDS = frozenset({"sql", "shell", "argv", "path", "url", "secret", "size", "env", "host"})
REDACTED = secrets.REDACTED

_ANNOTATION_KEYS = {
    "read_only": ("readOnlyHint", "read_only", "readOnly"),
    "destructive": ("destructiveHint", "destructive"),
    "idempotent": ("idempotentHint", "idempotent"),
    "open_world": ("openWorldHint", "open_world", "openWorld"),
}


@dataclass(frozen=True)
class ClassifyContext:
    """What the classifiers need to know about this keyturn process."""

    keyturn_paths: tuple[Path, ...] = ()  # ledger db, policy file(s), config file
    keyturn_urls: tuple[str, ...] = ()  # base URLs of keyturn's own HTTP/reviewer API
    roots: tuple[Path, ...] = ()  # configured file roots
    sql_dialect: str | None = None


def empty_facts() -> dict[str, Any]:
    """Every fact family with its defaults: the shape a policy can rely on."""
    return {
        "sql": sql.empty(),
        "shell": shell.empty(),
        "paths": paths.empty(),
        "urls": urls.empty(),
        "secrets": secrets.empty(),
        "env": env.empty(),
        "size": {"total_chars": 0, "max": 0, "by_arg": {}},
        "annotations": dict(_NO_ANNOTATIONS),
        "self_target": False,
        "self_target_reasons": [],
        "classifier_errors": [],
    }


def normalise_annotations(annotations: Mapping[str, Any]) -> dict[str, Any]:
    """MCP tool annotations (`readOnlyHint` ...) as `read_only`, `destructive`, `idempotent`, `open_world`."""
    try:
        key = tuple(annotations.items())
        cached = _normalised.get(key)
    except TypeError:  # an unhashable value: not cached
        key, cached = None, None
    if cached is None:
        cached = _normalise(annotations)
        if key is not None and len(_normalised) < 1024:
            _normalised[key] = cached
    return dict(cached)


_normalised: dict[tuple[tuple[str, Any], ...], dict[str, Any]] = {}
"""A tool's annotations are the same on every call: normalised once."""


def _normalise(annotations: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, names in _ANNOTATION_KEYS.items():
        value = next((annotations[n] for n in names if n in annotations), None)
        out[key] = value if isinstance(value, bool) else None
    title = annotations.get("title")
    out["title"] = title if isinstance(title, str) else None
    return out


def extract_facts(
    tool: str,
    arguments: dict[str, Any],
    classifiers: Mapping[str, str],
    annotations: Mapping[str, Any],
    ctx: ClassifyContext,
) -> dict[str, Any]:
    """Facts about one call. Raises ClassifierError only for an unknown classifier kind or SQL dialect."""
    by_kind = _group(classifiers, arguments)
    facts = empty_facts()
    facts["annotations"] = normalise_annotations(annotations)
    errors: list[str] = facts["classifier_errors"]

    def run(family: str, fn: Any, *args: Any) -> None:
        try:
            facts[family] = fn(*args)
        except Exception as e:  # a classifier bug must fail closed, not crash the gate
            errors.append(f"{family}: {type(e).__name__}: {e}"[:300])
            facts[family]["present"] = True
            facts[family]["unparseable"] = True

    if by_kind["sql"]:
        for dialect, texts in _sql_by_dialect(by_kind["sql"], ctx.sql_dialect, errors).items():
            before = facts["sql"]
            run("sql", sql.classify_sql, texts, dialect)
            facts["sql"] = _merge(before, facts["sql"]) if before["present"] else facts["sql"]
    shell_values: list[str | list[str]] = []
    for name, kind, value in by_kind["shell"]:
        if isinstance(value, str) or (isinstance(value, list) and kind in {"shell", "argv"}):
            shell_values.append(value if isinstance(value, str) else [str(v) for v in value])
        else:
            errors.append(f"shell: argument {name!r} is {type(value).__name__}, not a command")
            facts["shell"]["unparseable"] = True
    if shell_values:
        run("shell", shell.classify_shell, shell_values)
    if by_kind["path"]:
        run("paths", paths.classify_paths, [(n, v) for n, _, v in by_kind["path"]], ctx.roots)
    if by_kind["url"] or by_kind["host"]:
        run("urls", urls.classify_urls, [v for _, _, v in by_kind["url"]], [v for _, _, v in by_kind["host"]])
    declared_secret = [n for n, _, _ in by_kind["secret"]]
    run("secrets", secrets.classify_secrets, arguments, declared_secret)
    strings = [(secrets.pointer(p), s) for p, s in secrets.walk_strings(arguments)]
    declared_env = [v for _, _, v in by_kind["env"] if isinstance(v, str)]
    run("env", env.classify_env, (s for _, s in strings), declared_env)
    facts["size"] = _sizes(strings, by_kind["size"])
    _self_reference(facts, by_kind, strings, ctx)
    return facts


def _group(classifiers: Mapping[str, str], arguments: Mapping[str, Any]) -> dict[str, list[tuple[str, str, Any]]]:
    """(argument, kind, value) grouped by family; an unknown kind is a configuration error."""
    out: dict[str, list[tuple[str, str, Any]]] = {
        k: [] for k in ("sql", "shell", "path", "url", "host", "secret", "size", "env")
    }
    for name, spec in classifiers.items():
        kind, _, _dialect = spec.partition(":")
        if kind not in KINDS or (_dialect and kind != "sql"):
            raise ClassifierError(f"unknown classifier kind {spec!r} for argument {name!r} (known: {sorted(KINDS)})")
        if _dialect:
            _check_dialect(_dialect)
        value = arguments.get(name)
        if value is None:
            continue
        family = "shell" if kind == "argv" else kind
        out[family].append((name, spec, value))
    return out


@functools.lru_cache(maxsize=64)
def _check_dialect(dialect: str) -> None:
    try:
        sqlglot.Dialect.get_or_raise(dialect)
    except ValueError as e:
        raise ClassifierError(f"unknown SQL dialect {dialect!r}") from e


def _sql_by_dialect(
    items: list[tuple[str, str, Any]], default: str | None, errors: list[str]
) -> dict[str | None, list[str]]:
    out: dict[str | None, list[str]] = {}
    for name, spec, value in items:
        dialect = spec.partition(":")[2] or default
        if dialect:
            _check_dialect(dialect)
        if not isinstance(value, str):
            errors.append(f"sql: argument {name!r} is {type(value).__name__}, not SQL text")
            value = "\x00not sql"  # unparseable, fails closed
        out.setdefault(dialect, []).append(value)
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, bool):
            out[k] = bool(a.get(k)) or v
        elif isinstance(v, list):
            out[k] = list(dict.fromkeys([*a.get(k, []), *v])) if k != "errors" else [*a.get(k, []), *v]
        elif isinstance(v, int):
            out[k] = a.get(k, 0) + v
    out["read_only"] = a["read_only"] and b["read_only"]
    out["multiple_statements"] = out["statements"] > 1
    return out


def _sizes(strings: list[tuple[str, str]], declared: list[tuple[str, str, Any]]) -> dict[str, Any]:
    by_arg: dict[str, int] = {}
    for name, _, value in declared:
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            by_arg[name] = int(value)
        elif isinstance(value, (str, list, dict)):
            by_arg[name] = len(value)
    return {
        "total_chars": sum(len(s) for _, s in strings),
        "max": max(by_arg.values(), default=0),
        "by_arg": by_arg,
    }


@functools.lru_cache(maxsize=32)
def _targets(keyturn_paths: tuple[Path, ...], keyturn_urls: tuple[str, ...]) -> selfref.Targets:
    return selfref.Targets.build(keyturn_paths, keyturn_urls)


def _self_reference(
    facts: dict[str, Any],
    by_kind: dict[str, list[tuple[str, str, Any]]],
    strings: list[tuple[str, str]],
    ctx: ClassifyContext,
) -> None:
    targets = _targets(tuple(ctx.keyturn_paths), tuple(ctx.keyturn_urls))
    reasons: list[str] = []
    try:
        reasons += selfref.check_paths(targets, facts["paths"]["all"], facts["annotations"]["read_only"])
        reasons += selfref.check_urls(
            targets,
            [u for _, _, v in by_kind["url"] for u in (v if isinstance(v, list) else [v]) if isinstance(u, str)],
            [h for _, _, v in by_kind["host"] for h in (v if isinstance(v, list) else [v]) if isinstance(h, str)],
        )
        reasons += selfref.check_shell(targets, facts["shell"]["commands"], ctx.roots[0] if ctx.roots else None)
        # path arguments were judged above, knowing whether the tool only reads them
        path_args = {secrets.pointer((name,)) for name, _, _ in by_kind["path"]}
        rest = [(where, text) for where, text in strings if "/" + where.split("/")[1] not in path_args]
        reasons += selfref.scan_strings(targets, rest)
    except Exception as e:  # fail closed: if we cannot tell, assume it does
        facts["classifier_errors"].append(f"self_target: {type(e).__name__}: {e}"[:300])
        reasons.append("self-reference check failed")
    facts["self_target_reasons"] = list(dict.fromkeys(reasons))
    facts["self_target"] = bool(reasons)


_NO_ANNOTATIONS = _normalise({})
