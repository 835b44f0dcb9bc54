"""The `teams:` config section: a half-configured Teams channel is a start-up error, never a silent default."""

from __future__ import annotations

from typing import Any

import pytest

from server.channels.teams.config import ENV_APP_PASSWORD, ENV_LINK_SECRET, TeamsConfig, load_teams
from server.config import load_settings
from server.errors import ConfigError

BOT = {"app_id": "a", "service_url": "https://smba.trafficmanager.net/emea/", "conversation_id": "19:x"}
ENV = {ENV_APP_PASSWORD: "pw"}


def section(raw: dict[str, Any]) -> TeamsConfig | None:
    """The `teams:` section as the config loader reads it (where a half-configured bot or webhook is refused)."""
    return load_settings(None, teams=raw).teams


def test_no_teams_section_means_no_teams_channel() -> None:
    assert load_teams(section({}), ENV) is None


def test_a_bot_gets_the_public_cloud_defaults_and_the_password_from_the_environment() -> None:
    loaded = load_teams(section({**BOT, "tenant_id": "t-1"}), ENV)
    assert loaded is not None
    config, secrets = loaded
    assert secrets.app_password == "pw" and secrets.link_secret is None
    assert config.resolved_token_url() == "https://login.microsoftonline.com/t-1/oauth2/v2.0/token"
    assert config.openid_metadata_url == "https://login.botframework.com/v1/.well-known/openidconfiguration"
    assert config.scope == "https://api.botframework.com/.default"


@pytest.mark.parametrize(("raw", "env", "message"), [
    ({"app_id": "a"}, ENV, "service_url, conversation_id"),
    (BOT, {}, ENV_APP_PASSWORD),
    ({**BOT, "app_password": "pw"}, ENV, "never from the config file"),
    ({**BOT, "app_idd": "typo"}, ENV, "teams.app_idd"),
    ({**BOT, "service_url": "http://smba.example/"}, ENV, "https"),
    ({**BOT, "openid_metadata_url": "http://login.example/openid"}, ENV, "https"),
    ({**BOT, "token_url": "http://login.example/token"}, ENV, "https"),
    ({"webhook_url": "http://hooks.example/x"}, {}, "https"),
    ({"public_url": "https://k.example"}, {}, "webhook_url"),
    ({"webhook_url": "https://hooks.example/x"}, {ENV_LINK_SECRET: "short"}, "16 characters"),
    ({**BOT, "retries": 0}, ENV, "teams.retries"),
])
def test_half_configured_teams_is_refused_with_a_clear_message(raw: dict[str, Any], env: dict[str, str],
                                                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_teams(section(raw), env)


def test_a_webhook_alone_needs_no_bot_password() -> None:
    loaded = load_teams(section({"webhook_url": "https://prod.workflows.example/hook", "public_url": "https://k.example"}), {})
    assert loaded is not None and not loaded[0].bot_enabled
