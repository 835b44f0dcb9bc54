"""Upstream tools as keyturn serves them: exposed names, classifiers, annotations and schema validation."""

from __future__ import annotations

from typing import Any

import anyio
import mcp_types as types
import pytest

from server.classify import ClassifyContext, extract_facts
from server.errors import InvalidArguments
from server.proxy import Proxy, UpstreamConfig, classifiers_for, parse_proxy_config


def tool(name: str, properties: dict[str, Any] | None = None, **extra: Any) -> types.Tool:
    schema = {"type": "object", "properties": properties or {}, **extra.pop("schema", {})}
    return types.Tool(name=name, input_schema=schema, **extra)


def proxy_with(*upstreams: tuple[dict[str, Any], list[types.Tool]], reserved: set[str] | None = None,
               server_name: str | None = None) -> Proxy:
    config = parse_proxy_config({"upstreams": [{"command": "x", **u} for u, _ in upstreams]})
    proxy = Proxy(config, {}, reserved=lambda: set(reserved or ()))
    for upstream, (_, tools) in zip(proxy.upstreams, upstreams, strict=True):
        upstream.tools = {t.name: t for t in tools}
        upstream.server_name = server_name
    anyio.run(proxy._upstream_changed)
    return proxy


def test_names_are_kept_unless_they_clash() -> None:
    proxy = proxy_with(({"name": "git"}, [tool("status"), tool("log")]),
                       ({"name": "hg"}, [tool("status"), tool("keyturn_approve")]),
                       ({"name": "fs", "prefix": "fs_"}, [tool("status"), tool("read")]),
                       ({"name": "mine"}, [tool("sql_query")]), reserved={"sql_query"})
    assert [t.name for t in proxy.list()] == [
        "git__status", "log", "hg__status", "hg__keyturn_approve", "fs_status", "fs_read", "mine__sql_query"]
    assert proxy.get("log") is not None and proxy.get("log").upstream_name == "log"  # type: ignore[union-attr]
    assert proxy.get("status") is None


def test_a_taken_name_is_not_served() -> None:
    proxy = proxy_with(({"name": "a", "prefix": "x_"}, [tool("y")]), ({"name": "b"}, [tool("x_y")]))
    assert [(t.name, t.upstream.name) for t in proxy.list()] == [("x_y", "a")]


def test_the_tool_is_re_exposed_unchanged_under_its_name() -> None:
    original = tool("write_file", {"path": {"type": "string"}}, description="Write a file.", title="Write",
                    annotations=types.ToolAnnotations(destructive_hint=True, read_only_hint=False),
                    output_schema={"type": "object"}, schema={"required": ["path"]})
    served = proxy_with(({"name": "fs", "prefix": "fs."}, [original])).list()[0]
    assert served.to_mcp() == original.model_copy(update={"name": "fs.write_file"})
    assert served.annotations == {"destructiveHint": True, "readOnlyHint": False}


def test_classifiers_come_from_the_built_in_defaults_and_the_configuration() -> None:
    git = tool("git_add", {"repo_path": {}, "files": {}})
    assert classifiers_for(UpstreamConfig(name="g", command="x"), "mcp-git", git) == {"repo_path": "path"}
    fs = tool("move_file", {"source": {}, "destination": {}})
    defaults = classifiers_for(UpstreamConfig(name="f", command="x"), "secure-filesystem-server", fs)
    assert defaults == {"source": "path", "destination": "path"}
    configured = UpstreamConfig(name="f", command="x", classifiers={
        "*": {"source": "url", "nope": "path"}, "move_*": {"source": "secret"}, "move_file": {"source": "shell"}})
    assert classifiers_for(configured, "secure-filesystem-server", fs) == {"source": "shell", "destination": "path"}
    off = UpstreamConfig(name="f", command="x", builtin_classifiers=False)
    assert classifiers_for(off, "secure-filesystem-server", fs) == {}


def test_configured_classifiers_give_the_policy_facts_about_unknown_tools() -> None:
    served = proxy_with(({"name": "db", "classifiers": {"read_query": {"query": "sql"}}},
                         [tool("read_query", {"query": {"type": "string"}})])).list()[0]
    facts = extract_facts(served.name, {"query": "DELETE FROM users"}, served.classifiers, served.annotations,
                          ClassifyContext())
    assert facts["sql"]["present"] and facts["sql"]["writes"] and facts["sql"]["delete_without_where"]


@pytest.mark.parametrize(("arguments", "expected"), [
    ({}, "argument 'path' is required"),
    ({"path": 3}, "argument 'path' must be of type string"),
    ({"path": "a", "mode": "x"}, "argument 'mode' is not one of the allowed values"),
    ({"path": "a", "lines": 0}, "argument 'lines' does not satisfy minimum 1"),
    ({"path": "a", "token": "sk-live-0123456789abcdef"}, "unknown argument(s) 'token'"),
    ({"path": "a", "opts": {"deep": "sk-live-0123456789abcdef"}}, "argument 'opts.deep' must be of type integer"),
    ([1, 2], "arguments must be a JSON object"),
])
def test_arguments_are_checked_against_the_upstream_schema_without_echoing_values(
        arguments: Any, expected: str) -> None:
    served = proxy_with(({"name": "fs"}, [tool(
        "read", {"path": {"type": "string"}, "mode": {"enum": ["text", "bytes"]}, "lines": {"minimum": 1},
                 "opts": {"type": "object", "properties": {"deep": {"type": "integer"}}}},
        schema={"required": ["path"], "additionalProperties": False})])).list()[0]
    with pytest.raises(InvalidArguments) as e:
        served.validate(arguments)
    assert expected in str(e.value) and "sk-live" not in str(e.value)
    assert served.validate({"path": "a", "lines": 2}) == {"path": "a", "lines": 2}


def test_an_invalid_upstream_schema_refuses_every_call() -> None:
    served = proxy_with(({"name": "x"}, [tool("t", schema={"type": "no-such-type"})])).list()[0]
    with pytest.raises(InvalidArguments, match="the upstream's input schema is invalid"):
        served.validate({})
