"""The configuration file: every section typed and checked when the file is loaded, naming the key, before
anything starts (the channels' and the proxy's sections too; their secrets still come from the environment)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from server.config import load_settings
from server.errors import ConfigError
from tests.conftest import Home, free_port

BAD_SECTIONS = [
    ("slack", {"default_chanel": "#ops"}, "slack.default_chanel: unknown field"),
    ("slack", {"post_timeout_s": 0}, "slack.post_timeout_s: Input should be greater than 0"),
    ("teams", {"webhook_url": "https://hooks.example/x", "retires": 3}, "teams.retires: unknown field"),
    ("teams", {"app_id": "a"}, "teams: a bot needs service_url, conversation_id as well"),
    ("teams", {"webhook_url": "http://hooks.example/x"}, "teams.webhook_url must be an https:// URL"),
    ("proxy", {"upstreams": [{"name": "git", "comand": "mcp-server-git"}]}, "proxy.upstreams.0.comand: unknown field"),
    ("proxy", {"call_timeout": "soon"}, "proxy.call_timeout"),
]


def write(path: Path, **sections: Any) -> Path:
    path.write_text(yaml.safe_dump(sections), encoding="utf-8")
    return path


@pytest.mark.parametrize(("section", "raw", "expected"), BAD_SECTIONS)
def test_a_bad_key_in_a_section_is_refused_when_the_file_is_loaded(tmp_path: Path, section: str,
                                                                   raw: dict[str, Any], expected: str) -> None:
    path = write(tmp_path / "keyturn.yaml", **{section: raw})
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    assert f"config file {path} is invalid" in str(e.value) and expected in str(e.value)


def test_the_sections_are_typed_once_loaded(tmp_path: Path) -> None:
    path = write(tmp_path / "keyturn.yaml", slack={"default_channel": "#ops"},
                 teams={"webhook_url": "https://hooks.example/x", "retries": 2},
                 proxy={"call_timeout": "2m", "upstreams": [{"name": "git", "command": "mcp-server-git"}]})
    settings = load_settings(path)
    assert settings.slack is not None and settings.slack.default_channel == "#ops" and settings.slack.retries == 2
    assert settings.teams is not None and settings.teams.retries == 2 and not settings.teams.bot_enabled
    assert settings.proxy.call_timeout == 120 and settings.proxy.upstreams[0].transport == "stdio"
    empty = load_settings(write(tmp_path / "empty.yaml", slack={}, teams={}))
    assert empty.slack is None and empty.teams is None and empty.proxy.upstreams == ()


def test_the_app_password_is_refused_in_the_file_without_showing_it(tmp_path: Path) -> None:
    path = write(tmp_path / "keyturn.yaml", teams={"webhook_url": "https://hooks.example/x", "app_password": "pw-42"})
    with pytest.raises(ConfigError, match="never from the config file") as e:
        load_settings(path)
    assert "pw-42" not in str(e.value)


@pytest.mark.parametrize(("section", "raw", "expected"), [BAD_SECTIONS[0], BAD_SECTIONS[2], BAD_SECTIONS[5]])
def test_keyturn_serve_refuses_a_bad_section_before_anything_starts(home: Home, section: str, raw: dict[str, Any],
                                                                    expected: str) -> None:
    home.write_config(**{section: raw})
    out = home.keyturn("serve", "--http", f"127.0.0.1:{free_port()}", "--config", str(home.config), timeout=60)
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr and "Traceback" not in out.stderr
    assert not home.db.exists()  # refused before the ledger was opened


def test_config_errors_name_their_line_and_suggest_the_field_meant(tmp_path: Path) -> None:
    """As policy errors do: each problem with its line, an unknown field with the closest known one, in file order."""
    config = tmp_path / "keyturn.yaml"
    config.write_text("db: x.db\npolcy: p.yaml\nproxy:\n  upstreams:\n    - name: a\n      comand: foo\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert str(raised.value).splitlines()[1:] == [
        "  line 2: polcy: unknown field (did you mean 'policy'?)",
        "  line 6: proxy.upstreams.0.comand: unknown field (did you mean 'command'?)",
    ]
