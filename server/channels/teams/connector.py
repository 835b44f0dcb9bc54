"""Outbound calls to Microsoft Teams: the Bot Connector (send and update an activity) and incoming webhooks.

The bot token comes from the client-credentials grant against a configurable token endpoint and is
cached until shortly before it expires. Every call retries 429 and 5xx answers (and transport
errors) with exponential backoff, honouring `Retry-After`; anything else, or running out of
attempts, raises `ChannelError`. A failure here only means a reviewer was not told: it never
approves anything (the broker records `notify.failed`).

The connector calls go through the Teams SDK's `ConversationActivityClient` and activity models.
The token endpoint is called directly: the SDK mints tokens with MSAL in `microsoft-teams-apps`
(authority discovery against the real cloud), which a configurable endpoint cannot stand in for.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import httpx
from microsoft_teams.api.activities.message import MessageActivityInput
from microsoft_teams.api.clients.conversation import ConversationActivityClient
from microsoft_teams.cards import AdaptiveCard
from microsoft_teams.common import Client, ClientOptions

from server.errors import ChannelError

T = TypeVar("T")
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None and (after := response.headers.get("retry-after")):
            try:
                return min(MAX_RETRY_AFTER_S, max(0.0, float(after)))
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        base = min(self.max_backoff_s, self.backoff_s * 2.0**attempt)
        return base / 2 + random.uniform(0, base / 2)


async def with_retries(what: str, policy: RetryPolicy, call: Callable[[], Awaitable[T]],
                       on_unauthorized: Callable[[], None] | None = None) -> T:
    """Run `call`, retrying transient failures. A 401 clears the cached token once and retries."""
    refreshed = False
    last: Exception | None = None
    for attempt in range(max(1, policy.attempts)):
        try:
            return await call()
        except httpx.HTTPStatusError as e:
            status, last = e.response.status_code, e
            if status == 401 and on_unauthorized is not None and not refreshed:
                on_unauthorized()
                refreshed = True
                continue
            if status not in RETRY_STATUS:
                raise ChannelError(f"{what}: HTTP {status}: {e.response.text[:300]}") from e
            if attempt + 1 < policy.attempts:
                await anyio.sleep(policy.delay(attempt, e.response))
        except httpx.TransportError as e:
            last = e
            if attempt + 1 < policy.attempts:
                await anyio.sleep(policy.delay(attempt, None))
    raise ChannelError(f"{what}: gave up after {policy.attempts} attempts: {last}") from last


@dataclass
class BotToken:
    """A client-credentials access token for the Bot Connector, cached until shortly before expiry."""

    token_url: str
    app_id: str
    app_password: str
    scope: str
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = 10.0
    _token: str | None = None
    _expires: float = 0.0
    _lock: anyio.Lock = field(default_factory=anyio.Lock)

    async def get(self) -> str:
        async with self._lock:
            if self._token is not None and time.monotonic() < self._expires:
                return self._token
            token, lifetime = await with_retries("bot token", self.retry, self._fetch)
            self._token = token
            self._expires = time.monotonic() + max(0.0, lifetime - min(300.0, lifetime / 2))
            return token

    def invalidate(self) -> None:
        self._token = None

    async def _fetch(self) -> tuple[str, float]:
        async with httpx.AsyncClient(timeout=self.timeout_s) as http:
            response = await http.post(self.token_url, data={
                "grant_type": "client_credentials", "client_id": self.app_id,
                "client_secret": self.app_password, "scope": self.scope})
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise ChannelError("the token endpoint returned no access_token")
        return token, float(body.get("expires_in") or 3600)


@dataclass
class BotConnector:
    """Sends and updates the bot's card messages in one configured conversation."""

    service_url: str
    token: BotToken
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        http = Client(ClientOptions(token=self.token.get, timeout=self.timeout_s))
        self._activities = ConversationActivityClient(self.service_url, http)

    async def send_card(self, conversation_id: str, card: AdaptiveCard) -> str:
        """Post a new message carrying `card`; returns the activity id."""
        sent = await with_retries(
            "send the Teams card", self.retry,
            lambda: self._activities.create(conversation_id, MessageActivityInput().add_card(card)),
            self.token.invalidate)
        return str(sent.id)

    async def update_card(self, conversation_id: str, activity_id: str, card: AdaptiveCard) -> None:
        """Replace the card of a message the bot sent earlier."""
        await with_retries(
            "update the Teams card", self.retry,
            lambda: self._activities.update(conversation_id, activity_id, MessageActivityInput().add_card(card)),
            self.token.invalidate)


async def post_webhook(url: str, card: AdaptiveCard, retry: RetryPolicy, timeout_s: float = 10.0) -> None:
    """Post `card` to a Teams incoming webhook (a Workflows or connector URL). Webhooks cannot update."""
    payload = {"type": "message", "attachments": [{
        "contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None,
        "content": card.model_dump(mode="json", by_alias=True, exclude_none=True)}]}

    async def post() -> None:
        async with httpx.AsyncClient(timeout=timeout_s) as http:
            response = await http.post(url, json=payload)
        response.raise_for_status()

    await with_retries("post to the Teams webhook", retry, post)
