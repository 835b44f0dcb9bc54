"""The Teams channel's configuration: the `teams:` part of the config file and the secrets from the environment.

`TeamsConfig` is a section of `server.config.Settings`: a bot or a webhook half set up, or a plain-http endpoint,
is refused when the file is loaded. It needs nothing of the optional `teams` extra.

Two ways in, either or both:
- a bot (`app_id`, `service_url`, `conversation_id`; the app password in `KEYTURN_TEAMS_APP_PASSWORD`):
  an Adaptive Card per held call with Approve / Deny, updated in place;
- an incoming webhook (`webhook_url`): a card with an "Open" link to a signed decision page, for
  organisations that cannot register a bot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.errors import ConfigError

ENV_APP_PASSWORD = "KEYTURN_TEAMS_APP_PASSWORD"
ENV_LINK_SECRET = "KEYTURN_LINK_SECRET"
BOT_SCOPE = "https://api.botframework.com/.default"
BOT_FRAMEWORK_OPENID = "https://login.botframework.com/v1/.well-known/openidconfiguration"
BOT_FRAMEWORK_ISSUER = "https://api.botframework.com"


def require_https(url: str, what: str) -> str:
    """Refuse plain-http endpoints for credentials and keys, except on loopback (the offline test fakes)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname in {"127.0.0.1", "localhost", "::1"}:
        return url
    raise ConfigError(f"teams.{what} must be an https:// URL (plain http only on loopback), got {url!r}")


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

    @model_validator(mode="before")
    @classmethod
    def _no_password(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("app_password" in data or "password" in data):
            raise ValueError(f"the app password is read from {ENV_APP_PASSWORD}, never from the config file")
        return data

    @model_validator(mode="after")
    def _complete(self) -> TeamsConfig:
        if self.bot_enabled:
            missing = [k for k in ("app_id", "service_url", "conversation_id") if not getattr(self, k)]
            if missing:
                raise ValueError(f"a bot needs {', '.join(missing)} as well")
        elif not self.webhook_url:
            raise ValueError("set app_id/service_url/conversation_id (a bot) or webhook_url")
        urls = {"service_url": self.service_url, "openid_metadata_url": self.openid_metadata_url,
                "token_url": self.resolved_token_url()} if self.bot_enabled else {}
        for what, url in {**urls, "webhook_url": self.webhook_url}.items():
            if url is not None:
                try:
                    require_https(url, what)
                except ConfigError as e:
                    raise ValueError(str(e)) from None
        return self

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


def load_teams(section: TeamsConfig | None, env: dict[str, str]) -> tuple[TeamsConfig, TeamsSecrets] | None:
    """The Teams configuration (the file's `teams:` section, None when absent, and the secrets from `env`), or None
    when Teams is not enabled. Raises ConfigError when a secret the section needs is missing."""
    if section is None:
        return None
    secrets = TeamsSecrets(app_password=env.get(ENV_APP_PASSWORD) or None, link_secret=env.get(ENV_LINK_SECRET) or None)
    if section.bot_enabled and not secrets.app_password:
        raise ConfigError(f"teams: the bot's app password (client secret) must be in {ENV_APP_PASSWORD}")
    if secrets.link_secret is not None and len(secrets.link_secret) < 16:
        raise ConfigError(f"{ENV_LINK_SECRET} must be at least 16 characters")
    return section, secrets
