"""The `proxy:` configuration and the command line: what is accepted, and refusals that say where and why."""

from __future__ import annotations

import pytest

from server.errors import ConfigError
from server.proxy import parse_header, parse_proxy_config
from server.proxy.config import substitute_env
from tests.proxy.conftest import ProxyHome


def test_a_full_section_parses_with_durations_and_cli_upstreams_appended() -> None:
    config = parse_proxy_config(
        {"call_timeout": "2m", "upstreams": [
            {"name": "db", "url": "https://mcp.example.com/mcp", "headers": {"Authorization": "Bearer ${TOKEN}"},
             "classifiers": {"read_query": {"query": "sql:postgres"}}, "call_timeout": 5}]},
        [{"name": "upstream", "command": "mcp-server-git", "args": ["-v"], "prefix": "git_"}],
        connect_timeout=7)
    assert config.call_timeout == 120 and config.connect_timeout == 7
    assert [(u.name, u.transport) for u in config.upstreams] == [("db", "http"), ("upstream", "stdio")]
    assert config.upstreams[0].call_timeout == 5 and config.upstreams[1].prefix == "git_"


@pytest.mark.parametrize(("upstream", "expected"), [
    ({"name": "x"}, "needs exactly one of command (stdio) or url"),
    ({"name": "x", "command": "a", "url": "http://h/mcp"}, "needs exactly one of command"),
    ({"name": "x", "url": "ftp://h"}, "url must start with http"),
    ({"name": "x", "url": "http://h/mcp", "args": ["-v"]}, "apply to a command"),
    ({"name": "x", "command": "a", "headers": {"A": "b"}}, "headers apply to a url"),
    ({"name": "bad name", "command": "a"}, "upstream name 'bad name'"),
    ({"name": "keyturn", "command": "a"}, "not starting with 'keyturn'"),
    ({"name": "x", "command": "a", "prefix": "keyturn_"}, "not starting with 'keyturn'"),
    ({"name": "x", "command": "a", "classifiers": {"t": {"q": "sequel"}}}, "unknown classifier kind 'sequel'"),
    ({"name": "x", "command": "a", "surprise": 1}, "proxy.upstreams.0.surprise"),
])
def test_mistakes_are_named(upstream: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match="proxy configuration is invalid") as e:
        parse_proxy_config({"upstreams": [upstream]})
    assert expected in str(e.value)


def test_names_must_be_unique_and_one_upstream_is_needed() -> None:
    with pytest.raises(ConfigError, match="unique: a"):
        parse_proxy_config({"upstreams": [{"name": "a", "command": "x"}, {"name": "a", "command": "y"}]})
    with pytest.raises(ConfigError, match="no upstream MCP server"):
        parse_proxy_config({})


def test_environment_references_and_headers() -> None:
    assert substitute_env("Bearer ${TOKEN}", {"TOKEN": "t0k"}, "here") == "Bearer t0k"
    with pytest.raises(ConfigError, match="upstream 'db', header Authorization: environment variable TOKEN"):
        substitute_env("Bearer ${TOKEN}", {}, "upstream 'db', header Authorization")
    assert parse_header("Authorization: Bearer a:b") == ("Authorization", "Bearer a:b")
    with pytest.raises(ConfigError) as e:
        parse_header("Bearer-sk-secret-value")
    assert "sk-secret" not in str(e.value)


def test_the_command_line_refuses_what_cannot_work(home: ProxyHome) -> None:
    home.configure([])
    out = home.keyturn("proxy", "--config", str(home.config), "--", "no-such-mcp-server-xyz", timeout=60)
    assert out.returncode == 2 and "upstream 'no-such-mcp-server-xyz' cannot start" in out.stderr
    assert "no-such-mcp-server-xyz" in out.stderr and "Traceback" not in out.stderr
    out = home.keyturn("proxy", "--config", str(home.config), timeout=60)
    assert out.returncode == 2 and "no upstream MCP server" in out.stderr
    out = home.keyturn("proxy", "--config", str(home.config), "--header", "A: b", "--", "x", timeout=60)
    assert out.returncode == 2 and "--header applies to --upstream-url" in out.stderr
    out = home.keyturn("proxy", "--config", str(home.config), "--upstream-url", "http://127.0.0.1:1/mcp",
                       "--", "x", timeout=60)
    assert out.returncode == 2 and "not both" in out.stderr
