"""An upstream server's tool as keyturn serves it: the upstream's name (or a prefixed one), description, input
schema and annotations, plus the classifiers configured for it, checked and forwarded through the gate."""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import mcp_types as types
from jsonschema import exceptions as schema_errors
from jsonschema import validators

from server.errors import InvalidArguments
from server.gate import tool_progress
from server.proxy.config import BUILTIN_CLASSIFIERS, UpstreamConfig

if TYPE_CHECKING:
    from server.proxy.upstream import Upstream


class UpstreamTool:
    """One tool of one upstream, under the name policies and agents see (`name`); a gate `Runnable`."""

    interruptible = True
    """The caller's cancel stops a forwarded call: the upstream is sent `notifications/cancelled`."""

    def __init__(self, upstream: Upstream, tool: types.Tool, name: str, classifiers: Mapping[str, str]) -> None:
        self.upstream = upstream
        self.tool = tool
        self.name = name
        self.upstream_name = tool.name
        self.annotations: dict[str, Any] = (
            tool.annotations.model_dump(by_alias=True, exclude_none=True) if tool.annotations else {})
        self.classifiers: Mapping[str, str] = dict(classifiers)
        self._validator: Any = None
        self._schema_error: str | None = None
        try:
            cls = validators.validator_for(tool.input_schema, default=validators.Draft202012Validator)
            cls.check_schema(tool.input_schema)
            self._validator = cls(tool.input_schema)
        except schema_errors.SchemaError as e:
            self._schema_error = e.message[:200]

    def __repr__(self) -> str:
        return f"UpstreamTool({self.name!r} -> {self.upstream.name}:{self.upstream_name})"

    def validate(self, arguments: Any) -> dict[str, Any]:
        """Check `arguments` against the upstream's input schema; `InvalidArguments` names what is wrong
        (never the value: it may be a secret). Returned unchanged: the upstream receives exactly them."""
        if not isinstance(arguments, dict):
            raise InvalidArguments(f"{self.name}: arguments must be a JSON object", tool=self.name)
        if self._schema_error is not None:
            raise InvalidArguments(f"{self.name}: the upstream's input schema is invalid ({self._schema_error}), "
                                   "so keyturn refuses its calls", tool=self.name)
        try:
            errors = list(self._validator.iter_errors(arguments))
        except (schema_errors.SchemaError, RecursionError, ValueError, TypeError) as e:
            raise InvalidArguments(f"{self.name}: arguments could not be checked: {type(e).__name__}",
                                   tool=self.name) from None
        if errors:
            errors.sort(key=schema_errors.relevance)
            parts = [_describe(e) for e in errors[:5]]
            first = next((str(e.absolute_path[0]) for e in errors if e.absolute_path), None)
            raise InvalidArguments(f"{self.name}: " + "; ".join(dict.fromkeys(parts)), tool=self.name, field=first)
        return arguments

    async def run(self, arguments: dict[str, Any]) -> types.CallToolResult:
        """Forward exactly `arguments`; the caller's progress channel (if any) receives the upstream's progress."""
        with self.upstream.relay.serving():
            return await self.upstream.call(self.upstream_name, arguments, tool_progress.get())

    def to_mcp(self) -> types.Tool:
        """The upstream's tool, as listed by the upstream, under the exposed name. Less `execution`: keyturn
        forwards plain calls only, never task-augmented ones, whatever the upstream supports."""
        return self.tool.model_copy(update={"name": self.name, "execution": None})


def classifiers_for(config: UpstreamConfig, server_name: str | None, tool: types.Tool) -> dict[str, str]:
    """Which arguments of `tool` to classify as what: the built-in defaults for a known server, then the
    configured ones (a glob key first, an exact tool name last, so the most specific wins)."""
    layers: list[Mapping[str, Mapping[str, str]]] = []
    if config.builtin_classifiers and server_name in BUILTIN_CLASSIFIERS:
        layers.append(BUILTIN_CLASSIFIERS[server_name])
    layers.append(config.classifiers)
    properties = tool.input_schema.get("properties")
    known = set(properties) if isinstance(properties, dict) else set()
    out: dict[str, str] = {}
    for layer in layers:
        for pattern in sorted(layer, key=lambda p: (p == tool.name, p)):
            if fnmatchcase(tool.name, pattern):
                out.update({arg: kind for arg, kind in layer[pattern].items() if not known or arg in known})
    return out


def _describe(e: schema_errors.ValidationError) -> str:
    where = ".".join(str(p) for p in e.absolute_path)
    subject = f"argument {where!r}" if where else "arguments"
    instance, kind, expected = e.instance, e.validator, e.validator_value
    if kind == "required" and isinstance(instance, dict) and isinstance(expected, list):
        missing = [str(r) for r in expected if r not in instance]
        prefix = f"{where}." if where else ""
        required = [f"argument {prefix + m!r} is required" for m in missing[:5]]
        return ", ".join(required) or "a required argument is missing"
    if kind == "additionalProperties" and isinstance(instance, dict):
        allowed = set(e.schema.get("properties", {})) if isinstance(e.schema, dict) else set()
        unknown = sorted(str(k)[:64] for k in instance if k not in allowed)
        return f"unknown argument(s) {', '.join(repr(u) for u in unknown[:5])}" + (f" in {where!r}" if where else "")
    if kind == "type":
        return f"{subject} must be of type {expected}"
    if kind in ("enum", "const"):
        return f"{subject} is not one of the allowed values"
    if isinstance(expected, (int, float, str)) and not isinstance(expected, bool) and len(str(expected)) <= 80:
        return f"{subject} does not satisfy {kind} {expected!r}"
    return f"{subject} does not satisfy the schema's {kind!r}"
