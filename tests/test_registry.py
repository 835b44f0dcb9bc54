"""The registration API: a typed function becomes a guarded tool whose schema, validation and run agree."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import mcp_types
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.errors import ClassifierError, ConfigError, InvalidArguments, ToolError
from server.guarded import SECRET_RESULT_META, GuardedTool, ToolRegistry, guarded_tool, load_pack


@guarded_tool(classifiers={"query": "sql"}, annotations={"readOnlyHint": True})
async def run_report(query: str, limit: int = 100, tags: list[str] | None = None) -> str:
    """Run a saved report.

    Longer text for humans."""
    return f"{query}|{limit}|{tags}"


def test_schema_comes_from_the_type_hints() -> None:
    schema = run_report.input_schema
    assert schema["type"] == "object"
    assert schema["required"] == ["query"]
    assert schema["properties"]["query"]["type"] == "string"
    assert schema["properties"]["limit"] == {"default": 100, "title": "Limit", "type": "integer"}
    assert schema["properties"]["tags"]["anyOf"][0] == {"items": {"type": "string"}, "type": "array"}
    assert schema["additionalProperties"] is False
    assert run_report.output_schema is not None and run_report.output_schema["properties"]["result"]["type"] == "string"
    assert run_report.description == "Run a saved report.\n\nLonger text for humans."
    assert run_report.classifiers == {"query": "sql"}
    assert run_report.annotations == {"readOnlyHint": True}


def test_to_mcp_is_what_tools_list_shows() -> None:
    tool = run_report.to_mcp()
    assert isinstance(tool, mcp_types.Tool)
    wire = tool.model_dump(by_alias=True, exclude_none=True)
    assert wire["name"] == "run_report"
    assert wire["inputSchema"] == run_report.input_schema
    assert wire["annotations"] == {"readOnlyHint": True}


def test_name_title_description_and_literal_enums() -> None:
    @guarded_tool(name="acme.deploy", title="Deploy", description="Ship it.")
    def deploy(env: Literal["staging", "prod"]) -> dict[str, str]:
        return {"env": env}

    assert (deploy.name, deploy.title, deploy.description) == ("acme.deploy", "Deploy", "Ship it.")
    assert deploy.input_schema["properties"]["env"]["enum"] == ["staging", "prod"]
    assert deploy.to_mcp().title == "Deploy"


def test_bare_decorator_and_no_annotations() -> None:
    @guarded_tool
    def ping() -> str:
        return "pong"

    assert isinstance(ping, GuardedTool)
    assert ping.annotations == {} and ping.classifiers == {}
    assert ping.to_mcp().annotations is None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"classifiers": {"nope": "sql"}}, "not an argument"),
        ({"classifiers": {"query": "sqll"}}, "unknown classifier kind"),
        ({"classifiers": {"query": "shell:bash"}}, "unknown classifier kind"),
        ({"classifiers": {"query": "sql:"}}, "unknown classifier kind"),
        ({"annotations": {"readonlyHint": True}}, "unknown annotation"),
        ({"name": "has space"}, "tool name"),
    ],
)
def test_declaration_mistakes_fail_at_registration(kwargs: dict[str, Any], needle: str) -> None:
    def q(query: str) -> str:
        return query

    with pytest.raises(ValueError, match=needle):
        guarded_tool(q, **kwargs)


def test_dialect_classifier_is_accepted() -> None:
    def q(query: str) -> str:
        return query

    assert guarded_tool(q, classifiers={"query": "sql:postgres"}).classifiers == {"query": "sql:postgres"}


def test_validate_normalises_and_fills_defaults() -> None:
    assert run_report.validate({"query": "x"}) == {"query": "x", "limit": 100, "tags": None}
    # Clients that send a list as a JSON string are tolerated, like the SDK does.
    out = run_report.validate({"query": "x", "limit": "5", "tags": '["a", "b"]'})
    assert out == {"query": "x", "limit": 5, "tags": ["a", "b"]}
    assert run_report.validate(out) == out


@pytest.mark.parametrize(
    ("arguments", "field", "needle"),
    [
        ({}, "query", "'query': is required"),
        ({"query": 5}, "query", "valid string"),
        ({"query": "x", "limit": "many"}, "limit", "valid integer"),
        ({"query": "x", "tags": [1, {}]}, "tags", "tags"),
        ({"query": "x", "extra": 1}, "extra", "unknown argument"),
    ],
)
def test_wrong_arguments_are_invalid_arguments_naming_the_field(
    arguments: dict[str, Any], field: str, needle: str
) -> None:
    with pytest.raises(InvalidArguments, match=needle) as info:
        run_report.validate(arguments)
    assert info.value.field == field
    assert info.value.tool == "run_report"


def test_the_error_never_echoes_the_value() -> None:
    with pytest.raises(InvalidArguments) as info:
        run_report.validate({"query": "x", "limit": "hunter2-password"})
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("arguments", [None, [], "query", 3, {1: "x"}])
def test_non_objects_are_invalid(arguments: Any) -> None:
    with pytest.raises(InvalidArguments, match="JSON object"):
        run_report.validate(arguments)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["query", "limit", "tags", "other"]) | st.text(max_size=5), json_values))
def test_hostile_input_is_invalid_arguments_or_valid_never_a_crash(arguments: dict[str, Any]) -> None:
    try:
        out = run_report.validate(arguments)
    except InvalidArguments:
        return
    assert run_report.validate(out) == out


async def test_run_calls_async_and_sync_functions() -> None:
    result = await run_report.run({"query": "q", "tags": ["t"]})
    assert result.structured_content == {"result": "q|100|['t']"}
    assert result.content[0].type == "text" and result.content[0].text == "q|100|['t']"
    assert not result.is_error

    @guarded_tool
    def add(a: int, b: int) -> int:
        return a + b

    assert (await add.run({"a": 2, "b": 3})).structured_content == {"result": 5}


async def test_run_refuses_invalid_arguments_without_calling() -> None:
    calls: list[int] = []

    @guarded_tool
    def touch(n: int) -> int:
        calls.append(n)
        return n

    with pytest.raises(InvalidArguments):
        await touch.run({"n": "x"})
    assert calls == []


async def test_a_tool_exception_is_wrapped_in_tool_error() -> None:
    @guarded_tool
    async def boom() -> str:
        raise RuntimeError("disk on fire")

    with pytest.raises(ToolError, match="boom failed: RuntimeError: disk on fire") as info:
        await boom.run({})
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_checks_refuse_or_rewrite_and_run_again_before_running() -> None:
    seen: list[str] = []

    @guarded_tool(classifiers={"path": "path"})
    def read(path: str) -> str:
        seen.append(path)
        return path

    state = {"allowed": True}

    @read.check
    def _inside(args: dict[str, Any]) -> dict[str, Any]:
        if not state["allowed"] or args["path"].startswith("/etc"):
            raise ValueError("outside the roots")
        return {**args, "path": "/srv/" + args["path"].lstrip("/")}

    assert read.validate({"path": "a.txt"}) == {"path": "/srv/a.txt"}
    with pytest.raises(InvalidArguments, match="read: outside the roots"):
        read.validate({"path": "/etc/passwd"})
    assert (await read.run({"path": "a.txt"})).structured_content == {"result": "/srv/a.txt"}
    state["allowed"] = False  # the world changed between approval and run: the run is refused
    with pytest.raises(InvalidArguments):
        await read.run({"path": "a.txt"})
    assert seen == ["/srv/a.txt"]


def test_facts_hint_is_empty_by_default_and_fails_closed() -> None:
    assert run_report.facts_hint({"query": "x"}) == {}

    @guarded_tool
    def sized(text: str) -> int:
        return len(text)

    @sized.hint
    def _size(args: dict[str, Any]) -> dict[str, Any]:
        return {"chars": len(args["text"])}

    assert sized.facts_hint({"text": "abc"}) == {"chars": 3}
    with pytest.raises(ClassifierError):
        sized.facts_hint({})


async def test_secret_results_are_marked() -> None:
    @guarded_tool(secret_result=True)
    def token() -> str:
        return "s3cret"

    result = await token.run({})
    assert result.meta == {SECRET_RESULT_META: True}
    assert token.secret_result and not run_report.secret_result


def test_registry_add_get_list_contains() -> None:
    reg = ToolRegistry()
    reg.add(run_report)
    assert "run_report" in reg and "other" not in reg
    assert reg.get("run_report") is run_report and reg.get("other") is None
    assert reg.list() == [run_report] and len(reg) == 1
    with pytest.raises(ValueError, match="already registered"):
        reg.add(run_report)


# -- load_pack -------------------------------------------------------------------------------------


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def make(source: str) -> str:
        name = f"kt_pack_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


def test_load_pack_with_register(make_module: Callable[[str], str]) -> None:
    mod = make_module(
        """
        from server.guarded import guarded_tool

        def register(registry, options):
            @guarded_tool(name=options["prefix"] + "_hello")
            def hello(who: str) -> str:
                return "hi " + who
            registry.add(hello)
        """
    )
    reg = ToolRegistry()
    load_pack(mod, reg, {"prefix": "acme"})
    assert [t.name for t in reg.list()] == ["acme_hello"]


def test_load_pack_collects_module_level_tools(make_module: Callable[[str], str]) -> None:
    mod = make_module(
        """
        from server.guarded import guarded_tool

        @guarded_tool(classifiers={"url": "url"})
        def fetch(url: str) -> str:
            return url

        @guarded_tool
        def ping() -> str:
            return "pong"
        """
    )
    reg = ToolRegistry()
    load_pack(mod, reg, {})
    assert sorted(t.name for t in reg.list()) == ["fetch", "ping"]
    with pytest.raises(ConfigError, match="takes no options"):
        load_pack(mod, ToolRegistry(), {"x": 1})


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("raise RuntimeError('broken at import')", "failed while importing: RuntimeError: broken at import"),
        ("def register(registry, options):\n    raise KeyError('database')", "registration failed: KeyError"),
        ("X = 1", "registered no tools"),
        ("import kt_missing_dependency_xyz", "needs a module that is not installed: 'kt_missing_dependency_xyz'"),
    ],
)
def test_load_pack_failures_are_config_errors(make_module: Callable[[str], str], source: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_pack(make_module(source), ToolRegistry(), {})


@pytest.mark.parametrize("module", ["", "tools/sql", "../etc", "1abc", "no_such_module_kt"])
def test_load_pack_bad_module_names(module: str) -> None:
    with pytest.raises(ConfigError, match="tool pack"):
        load_pack(module, ToolRegistry(), {})


def test_load_pack_is_all_or_nothing(make_module: Callable[[str], str]) -> None:
    mod = make_module(
        """
        from server.guarded import guarded_tool

        def register(registry, options):
            @guarded_tool
            def first() -> str:
                return "1"
            registry.add(first)
            raise ValueError("bad option 'colour'")
        """
    )
    reg = ToolRegistry()
    with pytest.raises(ConfigError, match="bad option 'colour'"):
        load_pack(mod, reg, {})
    assert reg.list() == []


def test_load_pack_refuses_a_name_already_served(make_module: Callable[[str], str]) -> None:
    source = "from server.guarded import guarded_tool\n\n@guarded_tool\ndef ping() -> str:\n    return 'pong'\n"
    reg = ToolRegistry()
    load_pack(make_module(source), reg, {})
    with pytest.raises(ConfigError, match="'ping' is already registered"):
        load_pack(make_module(source), reg, {})
    assert len(reg) == 1


def test_a_string_that_looks_like_json_stays_a_string() -> None:
    @guarded_tool
    def post(body: str | None = None, items: list[int] | None = None) -> str:
        return str(body)

    assert post.validate({"body": '{"a": 1}'}) == {"body": '{"a": 1}', "items": None}
    assert post.validate({"body": "[1]", "items": "[1, 2]"}) == {"body": "[1]", "items": [1, 2]}


def test_the_custom_tool_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "custom_tool"
    monkeypatch.syspath_prepend(str(example))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACME_FIONA_TOKEN", "fiona-token-0001")
    monkeypatch.setenv("ACME_FRANK_TOKEN", "frank-token-0002")
    from server.config import load_settings
    from server.policy.loader import load_policy

    settings = load_settings(example / "keyturn.yaml")
    reg = ToolRegistry()
    try:
        for pack in settings.tools:
            load_pack(pack.module, reg, pack.options)
    finally:
        sys.modules.pop("acme_tools", None)
    refund = reg.get("acme_refund")
    assert refund is not None and refund.classifiers == {"environment": "env"}
    with pytest.raises(InvalidArguments) as info:
        refund.validate({"order_id": "1234", "amount_cents": 5})
    assert info.value.field == "order_id"
    load_policy(settings.policy_path(), groups=settings.groups, people=set(settings.people))
