"""The proxy examples in examples/ stay valid: the desktop agent entries parse as `keyturn proxy` command lines,
the configs load, and their policy passes `keyturn policy check`."""

from __future__ import annotations

import json
from pathlib import Path

from server.cli import build_parser
from server.config import load_settings
from server.proxy import parse_proxy_config
from tests.conftest import ROOT, Home

EXAMPLES = ROOT / "examples"


def test_the_desktop_agent_entries_are_keyturn_proxy_command_lines() -> None:
    servers = json.loads((EXAMPLES / "claude_desktop_config.json").read_text())["mcpServers"]
    assert set(servers) == {"git", "filesystem"}
    for entry in servers.values():
        args = build_parser().parse_args(entry["args"])
        # An installed server's binary (uvx/npx download into the sandbox's empty HOME), its folder writable.
        assert args.upstream_command[0] == "--"
        assert Path(args.upstream_command[1]).name in {"mcp-server-git", "mcp-server-filesystem"}
        assert args.mount_rw and args.mount_rw[0] in args.upstream_command
        assert Path(args.config).name == "proxy-desktop.yaml"
    settings = load_settings(EXAMPLES / "proxy-desktop.yaml")
    config = parse_proxy_config(settings.proxy, [{"name": "git", "command": "uvx", "args": ["mcp-server-git"]}])
    assert config.call_timeout == 120 and settings.stdio.principal == "claude-desktop"


def test_the_http_deployment_config_loads() -> None:
    settings = load_settings(EXAMPLES / "proxy-http.yaml")
    config = parse_proxy_config(settings.proxy)
    assert [u.name for u in config.upstreams] == ["git", "files", "tickets", "warehouse"]
    assert [u.transport for u in config.upstreams] == ["stdio", "stdio", "http", "http"]
    assert config.upstreams[3].classifiers == {"query": {"sql": "sql:postgres"}}
    assert settings.agents and settings.policy_path().exists()


def test_the_example_policy_is_valid(home: Home) -> None:
    out = home.keyturn("policy", "check", str(EXAMPLES / "proxy-policy.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr
