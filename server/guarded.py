"""Guarded tools: the developer API for putting a tool behind keyturn, and the registry the server serves.

A guarded tool is an ordinary typed function plus two declarations keyturn needs before anything runs:
which arguments to classify and how (`classifiers`), and the MCP annotations the policy can read.

    @guarded_tool(classifiers={"query": "sql"}, annotations={"readOnlyHint": True})
    async def run_report(query: str, limit: int = 100) -> str: ...

The input schema comes from the type hints (the MCP SDK's own `func_metadata`), so what the agent sees in
`tools/list` is what `validate` enforces. `validate` is total: hostile input becomes `InvalidArguments`,
never a crash. Structural refusals that need no policy (a path outside the roots) are `check` functions; what
the tool itself will refuse when it runs (a write on a read-only connection) it declares with `refuses`, so such a
call is refused before the policy is asked, and before any reviewer is. What a call would touch (the rows a SQL
write matches) it measures with `impact`, also before the policy: the facts it returns are the policy's and the
reviewer's.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import anyio.to_thread
import mcp_types
from mcp.server.mcpserver.tools.base import Tool as _SdkTool
from pydantic import ValidationError

from server.errors import ClassifierError, ConfigError, InvalidArguments, KeyturnError, ToolError, dotted, problems
from server.execution import PackContext

__all__ = [
    "ANNOTATION_KEYS",
    "CLASSIFIER_KINDS",
    "SECRET_RESULT_META",
    "Check",
    "GuardedTool",
    "Hint",
    "Impact",
    "Refuses",
    "ToolRegistry",
    "guarded_tool",
    "load_pack",
    "pack_state_paths",
]

CLASSIFIER_KINDS: frozenset[str] = frozenset({"sql", "shell", "argv", "path", "url", "secret", "size", "env", "host"})
"""What an argument can be declared as; `sql` also takes a dialect: `sql:postgres`, `sql:sqlite` ..."""

ANNOTATION_KEYS: frozenset[str] = frozenset(
    {"title", "readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint"}
)

SECRET_RESULT_META = "keyturn/secret_result"
"""Set to true in a result's `_meta` when the result carries a secret: store only its digest, show it to nobody."""

_TOOL_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

Check = Callable[[dict[str, Any]], "dict[str, Any] | None"]
"""A structural check: gets the validated arguments; raises `InvalidArguments` to refuse, may return replacements."""
Refuses = Callable[[dict[str, Any]], "str | None"]
"""What the tool will refuse when it runs: gets the validated arguments; returns why it would refuse them, or None.
It may block (it runs on a worker thread) and must not act."""
Hint = Callable[[dict[str, Any]], dict[str, Any]]
"""Extra facts a tool computes cheaply from validated arguments before running (e.g. a file's size)."""
Impact = Callable[[dict[str, Any]], dict[str, Any]]
"""What the call would touch, measured before the policy decides: gets the validated arguments; returns facts by
family (`{"sql": {"rows_affected": 3, ...}}`), merged into the classifiers' families. It may block (it runs on a
worker thread) and must not act; what it cannot measure it reports as unknown, never as nothing."""


class GuardedTool:
    """One tool keyturn serves: the function, its schema, and what the gate needs to know about its arguments.

    `classifiers` maps argument names to classifier kinds (`CLASSIFIER_KINDS`). `roots` are the directories the
    tool confines its path arguments to, for the path classifier. `secret_result` marks results that carry a
    secret (see `SECRET_RESULT_META`).
    """

    name: str
    title: str | None
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    annotations: dict[str, Any]
    classifiers: Mapping[str, str]
    secret_result: bool
    roots: tuple[Path, ...]

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        title: str | None = None,
        description: str | None = None,
        classifiers: Mapping[str, str] | None = None,
        annotations: Mapping[str, Any] | None = None,
        secret_result: bool = False,
        roots: Sequence[str | Path] = (),
    ) -> None:
        tool_name: str = name or str(getattr(fn, "__name__", ""))
        if not _TOOL_NAME.match(tool_name) or tool_name == "<lambda>":
            raise ValueError(f"tool name {tool_name!r} must be 1-128 characters of A-Z a-z 0-9 _ - .")
        annotations = dict(annotations or {})
        if unknown := sorted(set(annotations) - ANNOTATION_KEYS):
            raise ValueError(f"tool {tool_name!r}: unknown annotation(s) {unknown}; known: {sorted(ANNOTATION_KEYS)}")
        sdk_annotations = mcp_types.ToolAnnotations.model_validate(annotations) if annotations else None
        doc = description if description is not None else inspect.cleandoc(fn.__doc__ or "")
        sdk = _SdkTool.from_function(fn, name=tool_name, title=title, description=doc, annotations=sdk_annotations)
        if sdk.context_kwarg is not None or sdk.resolved_params:
            raise ValueError(f"tool {tool_name!r}: guarded tools take plain arguments only (no Context or Resolve)")

        self.fn = fn
        self._sdk = sdk
        self._fields = {f.alias or n for n, f in sdk.fn_metadata.arg_model.model_fields.items()}
        self.name = tool_name
        self.title = title
        self.description = doc
        self.input_schema = {**sdk.parameters, "additionalProperties": False}
        self.output_schema = sdk.output_schema
        self.annotations = sdk_annotations.model_dump(by_alias=True, exclude_none=True) if sdk_annotations else {}
        self.classifiers = _check_classifiers(tool_name, dict(classifiers or {}), self._fields)
        self.secret_result = secret_result
        self.roots = tuple(Path(r) for r in roots)
        self._checks: builtins.list[Check] = []
        self._hints: builtins.list[Hint] = []
        self._refuses: builtins.list[Refuses] = []
        self._impacts: builtins.list[Impact] = []

    def __repr__(self) -> str:
        return f"GuardedTool({self.name!r}, classifiers={dict(self.classifiers)!r})"

    # -- declarations ---------------------------------------------------------------------------

    def check(self, fn: Check) -> Check:
        """Decorator: add a structural check run by `validate` (and again by `run`, just before the tool)."""
        self._checks.append(fn)
        return fn

    def refuses(self, fn: Refuses) -> Refuses:
        """Decorator: declare what the tool will refuse when it runs (see `refusal`)."""
        self._refuses.append(fn)
        return fn

    def impact(self, fn: Impact) -> Impact:
        """Decorator: declare how to measure what a call would touch (see `measure`)."""
        self._impacts.append(fn)
        return fn

    def hint(self, fn: Hint) -> Hint:
        """Decorator: add a function computing extra facts for the policy (see `facts_hint`)."""
        self._hints.append(fn)
        return fn

    # -- the gate's view ------------------------------------------------------------------------

    def validate(self, arguments: Any) -> dict[str, Any]:
        """Validate raw `tools/call` arguments; return them normalised (JSON values, defaults filled in).

        Normalising is idempotent: `validate(validate(a)) == validate(a)`, so what is approved is what runs.
        Raises `InvalidArguments` naming the field; nothing else, whatever the input.
        """
        normalised = self._validate_types(arguments)
        for check in self._checks:
            try:
                replaced = check(normalised)
            except KeyturnError:
                raise
            except Exception as e:
                raise InvalidArguments(f"{self.name}: {e}", tool=self.name) from e
            if replaced is not None:
                normalised = self._validate_types(replaced)
        return normalised

    def facts_hint(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Extra facts about validated `arguments` the tool knows cheaply ({} when it declares none).

        A failing hint raises `ClassifierError`, so the gate fails closed.
        """
        facts: dict[str, Any] = {}
        for hint in self._hints:
            try:
                facts.update(hint(arguments))
            except Exception as e:
                raise ClassifierError(f"{self.name}: computing facts failed: {e}") from e
        return facts

    async def refusal(self, arguments: dict[str, Any]) -> str | None:
        """Why the tool would refuse validated `arguments` when it runs, from its `refuses` declarations (None when
        none refuses them). A call that can never succeed is refused at once, nobody is asked to approve it. A
        declaration that fails raises (the gate then refuses the call)."""
        return (await self.assess(arguments))[0] if self._refuses else None

    async def measure(self, arguments: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """What validated `arguments` would touch, from the `impact` declarations: facts by family ({} when none
        measures them). A declaration that fails raises (the gate then refuses the call)."""
        return (await anyio.to_thread.run_sync(self._measured, arguments)) if self._impacts else {}

    async def assess(self, arguments: dict[str, Any]) -> tuple[str | None, dict[str, dict[str, Any]]]:
        """What the gate asks before the policy, in one trip to a worker thread (none for a tool that declares
        nothing): why the tool would refuse the call (`refuses`), else what it would touch (`impact`)."""
        if not self._refuses and not self._impacts:
            return None, {}
        return await anyio.to_thread.run_sync(self._assessed, arguments)

    def _assessed(self, arguments: dict[str, Any]) -> tuple[str | None, dict[str, dict[str, Any]]]:
        for refuses in self._refuses:
            if reason := refuses(arguments):
                return reason, {}
        return None, self._measured(arguments)

    def _measured(self, arguments: dict[str, Any]) -> dict[str, dict[str, Any]]:
        measured: dict[str, dict[str, Any]] = {}
        for impact in self._impacts:
            for family, values in impact(arguments).items():
                measured[family] = {**measured.get(family, {}), **values}
        return measured

    async def run(self, arguments: dict[str, Any]) -> mcp_types.CallToolResult:
        """Validate `arguments` again (checks included) and run the tool.

        Invalid arguments raise `InvalidArguments` (nothing ran); anything the tool raises becomes `ToolError`.
        """
        validated = self.validate(arguments)
        meta = self._sdk.fn_metadata
        kwargs = meta.arg_model.model_validate(validated).model_dump_one_level()
        try:
            value = await meta.call_fn(self.fn, self._sdk.is_async, kwargs)
            result = meta.convert_result(value)
        except Exception as e:
            raise ToolError(f"{self.name} failed: {_describe(e)}") from e
        if not isinstance(result, mcp_types.CallToolResult):
            raise ToolError(f"{self.name} returned {type(result).__name__}, which a guarded tool may not return")
        if self.secret_result:
            result = result.model_copy(update={"meta": {**(result.meta or {}), SECRET_RESULT_META: True}})
        return result

    def to_mcp(self) -> mcp_types.Tool:
        """The tool as `tools/list` shows it."""
        return mcp_types.Tool(
            name=self.name,
            title=self.title,
            description=self.description,
            input_schema=self.input_schema,
            output_schema=self.output_schema,
            annotations=mcp_types.ToolAnnotations.model_validate(self.annotations) if self.annotations else None,
        )

    def _validate_types(self, arguments: Any) -> dict[str, Any]:
        if not isinstance(arguments, dict) or not all(isinstance(k, str) for k in arguments):
            raise InvalidArguments(f"{self.name}: arguments must be a JSON object", tool=self.name)
        if unknown := sorted(set(arguments) - self._fields):
            names = ", ".join(repr(u[:64]) for u in unknown[:5])
            raise InvalidArguments(f"{self.name}: unknown argument(s) {names}", tool=self.name, field=unknown[0][:64])
        meta = self._sdk.fn_metadata
        try:
            try:
                model = meta.arg_model.model_validate(arguments)
            except ValidationError as first:
                # Some clients send lists and objects as JSON text; the SDK's pre-parse accepts that. It is applied
                # only to the arguments that failed as sent, so a string that looks like JSON (a body) stays a string.
                failed = {str(err["loc"][0]) for err in first.errors() if err["loc"]}
                retry = arguments | meta.pre_parse_json({k: v for k, v in arguments.items() if k in failed})
                model = meta.arg_model.model_validate(retry)
            dumped: dict[str, Any] = model.model_dump(mode="json", by_alias=True)
        except ValidationError as e:
            raise _invalid(self.name, e) from None
        except (ValueError, TypeError, RecursionError) as e:
            msg = f"{self.name}: arguments could not be validated: {_describe(e)}"
            raise InvalidArguments(msg, tool=self.name) from e
        return dumped


def _invalid(tool: str, e: ValidationError) -> InvalidArguments:
    """Name each bad field; never echo the input value (it may be a secret)."""
    found = problems(e)[:5]
    first = next((str(loc[0]) for loc, _ in found if loc), None)
    parts = [f"argument {dotted(loc) or '(arguments)'!r}: {text}" for loc, text in found]
    return InvalidArguments(f"{tool}: " + "; ".join(parts), tool=tool, field=first)


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_classifiers(tool: str, classifiers: dict[str, str], fields: set[str]) -> Mapping[str, str]:
    for arg, kind in classifiers.items():
        if arg not in fields:
            raise ValueError(f"tool {tool!r}: classifier declared for {arg!r}, which is not an argument")
        base, _, dialect = kind.partition(":")
        if base not in CLASSIFIER_KINDS or (dialect and base != "sql") or kind.endswith(":"):
            raise ValueError(f"tool {tool!r}: argument {arg!r} has unknown classifier kind {kind!r}")
    return dict(classifiers)


@overload
def guarded_tool(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    title: str | None = None,
    description: str | None = None,
    classifiers: Mapping[str, str] | None = None,
    annotations: Mapping[str, Any] | None = None,
    secret_result: bool = False,
    roots: Sequence[str | Path] = (),
) -> GuardedTool: ...
@overload
def guarded_tool(
    fn: None = None,
    *,
    name: str | None = None,
    title: str | None = None,
    description: str | None = None,
    classifiers: Mapping[str, str] | None = None,
    annotations: Mapping[str, Any] | None = None,
    secret_result: bool = False,
    roots: Sequence[str | Path] = (),
) -> Callable[[Callable[..., Any]], GuardedTool]: ...
def guarded_tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    title: str | None = None,
    description: str | None = None,
    classifiers: Mapping[str, str] | None = None,
    annotations: Mapping[str, Any] | None = None,
    secret_result: bool = False,
    roots: Sequence[str | Path] = (),
) -> GuardedTool | Callable[[Callable[..., Any]], GuardedTool]:
    """Decorator turning a typed function (sync or async) into a `GuardedTool`; usable bare or with options."""

    def wrap(f: Callable[..., Any]) -> GuardedTool:
        return GuardedTool(
            f,
            name=name,
            title=title,
            description=description,
            classifiers=classifiers,
            annotations=annotations,
            secret_result=secret_result,
            roots=roots,
        )

    return wrap(fn) if fn is not None else wrap


class ToolRegistry:
    """The guarded tools one keyturn process serves, by name."""

    def __init__(self) -> None:
        self._tools: dict[str, GuardedTool] = {}

    def add(self, tool: GuardedTool) -> None:
        if not isinstance(tool, GuardedTool):
            raise TypeError(f"expected a GuardedTool, got {type(tool).__name__}")
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    def get(self, name: str) -> GuardedTool | None:
        return self._tools.get(name)

    def list(self) -> builtins.list[GuardedTool]:
        return builtins.list(self._tools.values())

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[GuardedTool]:
        return iter(builtins.list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)


def _import_pack(module: str) -> Any:
    if not isinstance(module, str) or not _MODULE_NAME.match(module):
        raise ConfigError(f"tool pack {module!r} is not a module name like 'tools.sql' or 'acme_tools'")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and not module.startswith(e.name):
            raise ConfigError(f"tool pack {module!r} needs a module that is not installed: {e.name!r}") from e
        raise ConfigError(f"tool pack {module!r} could not be imported: {e} (is it on the Python path?)") from e
    except Exception as e:
        raise ConfigError(f"tool pack {module!r} failed while importing: {_describe(e)}") from e
    return mod


def pack_state_paths(module: str, options: Mapping[str, Any]) -> builtins.list[Path]:
    """The files a pack keeps that are keyturn's own state (the secret store), from its `state_paths(options)`.

    Asked of every pack before any registers, so each pack's load-time checks see the whole of keyturn's state.
    """
    mod = _import_pack(module)
    declare = getattr(mod, "state_paths", None)
    if not callable(declare):
        return []
    try:
        return [Path(p) for p in declare(dict(options))]
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"tool pack {module!r}: state_paths() failed: {_describe(e)}") from e


def load_pack(
    module: str, registry: ToolRegistry, options: Mapping[str, Any], context: PackContext | None = None
) -> None:
    """Import `module` and add its tools to `registry`, all or nothing.

    The module either defines `register(registry, options)` (or `register(registry, options, context)` to learn
    keyturn's state and record start-up events, see `PackContext`), or (a simple one-file module) holds
    module-level `GuardedTool` objects, which are all added. Any failure is a `ConfigError` naming the module.
    """
    mod = _import_pack(module)
    context = context if context is not None else PackContext()
    staged = ToolRegistry()
    register = getattr(mod, "register", None)
    try:
        if callable(register):
            if len(inspect.signature(register).parameters) >= 3:
                register(staged, dict(options), context)
            else:
                register(staged, dict(options))
        else:
            if options:
                raise ConfigError(f"tool pack {module!r} has no register() function, so it takes no options")
            for value in vars(mod).values():
                if isinstance(value, GuardedTool):
                    staged.add(value)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if module in msg else f"tool pack {module!r}: {msg}") from e
    except Exception as e:
        raise ConfigError(f"tool pack {module!r}: registration failed: {_describe(e)}") from e
    if not len(staged):
        raise ConfigError(f"tool pack {module!r} registered no tools (define register() or module-level guarded tools)")
    for tool in staged:
        if tool.name in registry:
            raise ConfigError(f"tool pack {module!r}: a tool named {tool.name!r} is already registered")
    for tool in staged:
        registry.add(tool)
