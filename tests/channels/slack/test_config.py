"""When Slack is on, and what a half-configured Slack says."""

from __future__ import annotations

from typing import Any

import pytest

from server.channels.slack.config import SlackConfig, load_slack, make_client
from server.config import load_settings
from server.errors import ConfigError

FULL = {"KEYTURN_SLACK_BOT_TOKEN": "xoxb-1", "KEYTURN_SLACK_SIGNING_SECRET": "s3cret"}


def section(raw: dict[str, Any]) -> SlackConfig | None:
    """The `slack:` section as the config loader reads it (where typos and bad values are refused)."""
    return load_settings(None, slack=raw).slack


def test_slack_is_off_without_config_or_tokens() -> None:
    assert load_slack(section({}), {}) is None
    assert load_slack(section({}), {"KEYTURN_SLACK_API_URL": "http://127.0.0.1:1/api"}) is None


def test_tokens_in_the_environment_turn_it_on_with_the_config_file_settings() -> None:
    loaded = load_slack(section({"default_channel": "#ops"}), {**FULL, "KEYTURN_SLACK_API_URL": "http://127.0.0.1:9/api"})
    assert loaded is not None
    config, secrets = loaded
    assert config.default_channel == "#ops" and not config.socket_mode
    assert secrets.bot_token == "xoxb-1" and secrets.signing_secret == "s3cret"
    assert secrets.api_url == "http://127.0.0.1:9/api/"  # slack_sdk needs the trailing slash
    assert load_slack(section({}), FULL) is not None
    client = make_client(config, secrets)
    assert client.base_url == "http://127.0.0.1:9/api/"
    kinds = {type(h).__name__ for h in client.retry_handlers}
    assert kinds == {"AsyncRateLimitErrorRetryHandler", "AsyncServerErrorRetryHandler",
                     "AsyncConnectionErrorRetryHandler"}


def test_a_slack_section_without_tokens_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="KEYTURN_SLACK_BOT_TOKEN and KEYTURN_SLACK_SIGNING_SECRET are not set"):
        load_slack(section({"default_channel": "#ops"}), {})
    with pytest.raises(ConfigError, match="KEYTURN_SLACK_SIGNING_SECRET is not set"):
        load_slack(section({}), {"KEYTURN_SLACK_BOT_TOKEN": "xoxb-1"})


def test_socket_mode_needs_the_app_token_not_the_signing_secret() -> None:
    with pytest.raises(ConfigError, match="KEYTURN_SLACK_APP_TOKEN is not set"):
        load_slack(section({"socket_mode": True}), {"KEYTURN_SLACK_BOT_TOKEN": "xoxb-1"})
    loaded = load_slack(section({"socket_mode": True}),
                        {"KEYTURN_SLACK_BOT_TOKEN": "xoxb-1", "KEYTURN_SLACK_APP_TOKEN": "xapp-1"})
    assert loaded is not None and loaded[1].signing_secret is None and loaded[1].app_token == "xapp-1"


def test_typos_and_bad_values_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"slack\.default_chanel"):
        load_slack(section({"default_chanel": "#ops"}), FULL)
    with pytest.raises(ConfigError, match=r"slack\.post_timeout_s"):
        load_slack(section({"post_timeout_s": 0}), FULL)
    with pytest.raises(ConfigError, match="KEYTURN_SLACK_API_URL must be an http"):
        load_slack(section({}), {**FULL, "KEYTURN_SLACK_API_URL": "file:///etc/passwd"})
