"""The Teams channel's configuration: the `teams:` part of the config file and the secrets from the environment.

Two ways in, either or both:
- a bot (`app_id`, `service_url`, `conversation_id`; the app password in `KEYTURN_TEAMS_APP_PASSWORD`):
  an Adaptive Card per held call with Approve / Deny, updated in place;
- an incoming webhook (`webhook_url`): a card with an "Open" link to a signed decision page, for
  organisations that cannot register a bot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.channels.teams.auth import BOT_FRAMEWORK_ISSUER, BOT_FRAMEWORK_OPENID, require_https
from server.errors import ConfigError

ENV_APP_PASSWORD = "KEYTURN_TEAMS_APP_PASSWORD"
ENV_LINK_SECRET = "KEYTURN_LINK_SECRET"
BOT_SCOPE = "https://api.botframework.com/.default"


class TeamsConfig(BaseModel):
    """The `teams:` part of the config file. The app password never lives here."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # the bot
    app_id: str | None = None  # the bot's Microsoft App ID (Entra app registration client id): the JWT audience
    tenant_id: str | None = None  # the bot's home tenant (single-tenant bots); picks the token endpoint
    service_url: str | None = None  # e.g. https://smba.trafficmanager.net/emea/ (from any activity the bot got)
    conversation_id: str | None = None  # the channel or chat the cards go to (19:...@thread.tacv2, or a chat id)
    token_url: str | None = None  # default: https://login.microsoftonline.com/<tenant_id|botframework.com>/...
    scope: str = BOT_SCOPE
    openid_metadata_url: str = BOT_FRAMEWORK_OPENID  # where the Bot Framework signing keys are announced
    issuer: str = BOT_FRAMEWORK_ISSUER
    clock_skew_s: float = Field(300.0, ge=0, le=600)
    # the no-bot fallback
    webhook_url: str | None = None  # a Teams incoming webhook (Workflows "post to a channel when a webhook ...")
    public_url: str | None = None  # keyturn's URL as reviewers' browsers reach it (for decision links)
    link_ttl_s: float = Field(24 * 3600.0, gt=0, le=7 * 24 * 3600.0)  # capped by the request's own expiry
    # outbound behaviour
    retries: int = Field(4, ge=1, le=10)  # attempts per call on 429 / 5xx / connection errors
    retry_backoff_s: float = Field(0.5, gt=0, le=60)
    request_timeout_s: float = Field(10.0, gt=0, le=120)
    update_interval_s: float = Field(2.0, gt=0, le=60)  # how often to look for changes made by other processes

    @property
    def bot_enabled(self) -> bool:
        return any((self.app_id, self.service_url, self.conversation_id))

    def resolved_token_url(self) -> str:
        return self.token_url or (
            f"https://login.microsoftonline.com/{self.tenant_id or 'botframework.com'}/oauth2/v2.0/token")


@dataclass(frozen=True)
class TeamsSecrets:
    app_password: str | None
    link_secret: str | None


def load_teams(raw: dict[str, Any], env: dict[str, str]) -> tuple[TeamsConfig, TeamsSecrets] | None:
    """The Teams configuration, or None when Teams is not enabled. Raises ConfigError when half set up."""
    if not raw:
        return None
    if "app_password" in raw or "password" in raw:
        raise ConfigError(f"config file: teams: the app password is read from {ENV_APP_PASSWORD}, "
                          "never from the config file")
    try:
        config = TeamsConfig.model_validate(raw)
    except ValidationError as e:
        details = "; ".join(f"teams.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"config file: {details}") from e
    secrets = TeamsSecrets(app_password=env.get(ENV_APP_PASSWORD) or None, link_secret=env.get(ENV_LINK_SECRET) or None)
    if config.bot_enabled:
        missing = [k for k in ("app_id", "service_url", "conversation_id") if not getattr(config, k)]
        if missing:
            raise ConfigError(f"config file: teams: a bot needs {', '.join(missing)} as well")
        if not secrets.app_password:
            raise ConfigError(f"teams: the bot's app password (client secret) must be in {ENV_APP_PASSWORD}")
        for what in ("service_url", "openid_metadata_url"):
            require_https(str(getattr(config, what)), what)
        require_https(config.resolved_token_url(), "token_url")
    elif not config.webhook_url:
        raise ConfigError("config file: teams: set app_id/service_url/conversation_id (a bot) or webhook_url")
    if config.webhook_url:
        require_https(config.webhook_url, "webhook_url")
    if secrets.link_secret is not None and len(secrets.link_secret) < 16:
        raise ConfigError(f"{ENV_LINK_SECRET} must be at least 16 characters")
    return config, secrets
