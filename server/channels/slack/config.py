"""The Slack channel's configuration: the `slack:` part of the config file, the tokens from the environment,
and the Web API client (with retries) built from them.

`SlackConfig` is a section of `server.config.Settings`, validated when the file is loaded; Slack's SDK is imported
only when a client is made, so reading the configuration does not load it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from server.errors import ConfigError

if TYPE_CHECKING:
    from slack_sdk.web.async_client import AsyncWebClient

ENV_BOT_TOKEN = "KEYTURN_SLACK_BOT_TOKEN"
ENV_SIGNING_SECRET = "KEYTURN_SLACK_SIGNING_SECRET"
ENV_APP_TOKEN = "KEYTURN_SLACK_APP_TOKEN"
ENV_API_URL = "KEYTURN_SLACK_API_URL"


class SlackConfig(BaseModel):
    """The `slack:` part of the config file. Tokens never live here: they come from the environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    default_channel: str | None = None  # "#ops-approvals" or "C0123...": where requests go when no rule names one
    dm_reviewers: bool = False  # also DM each eligible reviewer mapped to a Slack user
    mention_reviewers: bool = False  # @-mention the eligible Slack reviewers in the message
    map_email: bool = False  # unmapped Slack users: map their verified e-mail (users.info) to `people:`
    socket_mode: bool = False  # receive clicks over Socket Mode (needs KEYTURN_SLACK_APP_TOKEN)
    thread_replies: bool = True  # each vote and the outcome also as a reply in the message's thread
    post_timeout_s: float = Field(15.0, gt=0, le=300)  # bound on one Slack call, retries included
    request_timeout_s: int = Field(10, ge=1, le=120)  # one HTTP attempt
    retries: int = Field(2, ge=0, le=10)  # per failure kind: rate limit, 5xx, connection
    retry_backoff_s: float = Field(0.5, gt=0, le=60)
    update_interval_s: float = Field(1.0, gt=0, le=60)  # how often to look for changes made by other processes


@dataclass(frozen=True)
class SlackSecrets:
    bot_token: str
    signing_secret: str | None
    app_token: str | None
    api_url: str


def load_slack(section: SlackConfig | None, env: dict[str, str]) -> tuple[SlackConfig, SlackSecrets] | None:
    """The Slack channel's configuration (the file's `slack:` section, None when absent, and the tokens from `env`),
    or None when Slack is not enabled. Raises ConfigError when half set up."""
    config = section if section is not None else SlackConfig.model_validate({})
    bot, secret, app = (env.get(k) or None for k in (ENV_BOT_TOKEN, ENV_SIGNING_SECRET, ENV_APP_TOKEN))
    if section is None and not bot and not secret and not (app and config.socket_mode):
        return None
    need = {ENV_BOT_TOKEN: bot, **({ENV_APP_TOKEN: app} if config.socket_mode else {ENV_SIGNING_SECRET: secret})}
    missing = [name for name, value in need.items() if not value]
    if missing:
        raise ConfigError(
            f"Slack is {'configured (slack: in the config file)' if section is not None else 'partly set up'} but "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set in the environment; "
            "set them, or remove the slack: section")
    api_url = env.get(ENV_API_URL) or "https://slack.com/api/"
    if not api_url.startswith(("https://", "http://")):
        raise ConfigError(f"{ENV_API_URL} must be an http(s) URL, got {api_url!r}")
    assert bot is not None
    return config, SlackSecrets(bot, secret, app, api_url if api_url.endswith("/") else api_url + "/")


def make_client(config: SlackConfig, secrets: SlackSecrets) -> AsyncWebClient:
    """A Web API client that retries rate limits (honouring Retry-After), 5xx and connection failures."""
    from slack_sdk.http_retry.builtin_async_handlers import (
        AsyncConnectionErrorRetryHandler,
        AsyncRateLimitErrorRetryHandler,
        AsyncServerErrorRetryHandler,
    )
    from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
    from slack_sdk.web.async_client import AsyncWebClient

    backoff = BackoffRetryIntervalCalculator(backoff_factor=config.retry_backoff_s)
    return AsyncWebClient(
        token=secrets.bot_token, base_url=secrets.api_url, timeout=config.request_timeout_s,
        retry_handlers=[
            AsyncConnectionErrorRetryHandler(max_retry_count=config.retries, interval_calculator=backoff),
            AsyncRateLimitErrorRetryHandler(max_retry_count=config.retries),
            AsyncServerErrorRetryHandler(max_retry_count=config.retries, interval_calculator=backoff),
        ])


def describe(e: BaseException) -> str:
    from slack_sdk.errors import SlackApiError

    if isinstance(e, SlackApiError):
        return f"Slack API error: {e.response.get('error', e.response.status_code)}"
    if isinstance(e, TimeoutError):
        return "Slack did not answer in time"
    return f"{type(e).__name__}: {e}"
