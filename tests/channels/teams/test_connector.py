"""Outbound to Teams: the bot token, send and update activity through the SDK client, webhooks, and retries."""

from __future__ import annotations

import httpx
import pytest
from microsoft_teams.cards import AdaptiveCard, TextBlock

from server.channels.teams.connector import BotConnector, BotToken, RetryPolicy, post_webhook
from server.errors import ChannelError
from tests.channels.teams.conftest import APP_ID, APP_PASSWORD, CONVERSATION, FakeTeams

FAST = RetryPolicy(attempts=3, backoff_s=0.01)


def connector(fake: FakeTeams, password: str = APP_PASSWORD, retry: RetryPolicy = FAST) -> BotConnector:
    token = BotToken(fake.base + "/token", APP_ID, password, "https://api.botframework.com/.default", retry=retry)
    return BotConnector(fake.service_url, token, retry=retry)


def card(text: str = "hello") -> AdaptiveCard:
    return AdaptiveCard(body=[TextBlock(text=text)])


async def test_a_card_is_sent_with_a_client_credentials_token_and_updated_in_place(fake_teams: FakeTeams) -> None:
    bot = connector(fake_teams)
    activity_id = await bot.send_card(CONVERSATION, card("first"))
    await bot.update_card(CONVERSATION, activity_id, card("second"))
    assert fake_teams.token_requests == [{"grant_type": "client_credentials", "client_id": APP_ID,
                                          "client_secret": APP_PASSWORD,
                                          "scope": "https://api.botframework.com/.default"}]
    sent = fake_teams.sent[0]
    assert sent["conversation_id"] == CONVERSATION and sent["activity"]["type"] == "message"
    attachment = sent["activity"]["attachments"][0]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert attachment["content"]["body"][0]["text"] == "first"
    assert fake_teams.updated[0]["activity_id"] == activity_id
    assert fake_teams.updated[0]["activity"]["attachments"][0]["content"]["body"][0]["text"] == "second"


async def test_throttling_and_server_errors_are_retried_with_backoff(fake_teams: FakeTeams) -> None:
    fake_teams.failures.extend([429, 503])
    await connector(fake_teams).send_card(CONVERSATION, card())
    assert len(fake_teams.sent) == 1 and not fake_teams.failures


async def test_the_connector_gives_up_after_its_attempts(fake_teams: FakeTeams) -> None:
    fake_teams.failures.extend([503] * 5)
    with pytest.raises(ChannelError, match="gave up after 3 attempts"):
        await connector(fake_teams).send_card(CONVERSATION, card())
    assert len(fake_teams.failures) == 2 and not fake_teams.sent


async def test_a_client_error_is_not_retried(fake_teams: FakeTeams) -> None:
    fake_teams.failures.extend([400, 400])
    with pytest.raises(ChannelError, match="HTTP 400"):
        await connector(fake_teams).send_card(CONVERSATION, card())
    assert len(fake_teams.failures) == 1


async def test_the_token_is_cached_and_minted_again_when_the_connector_refuses_it(fake_teams: FakeTeams) -> None:
    bot = connector(fake_teams)
    await bot.send_card(CONVERSATION, card())
    await bot.send_card(CONVERSATION, card())
    assert len(fake_teams.token_requests) == 1
    fake_teams.tokens.clear()  # revoked
    await bot.send_card(CONVERSATION, card())
    assert len(fake_teams.token_requests) == 2 and len(fake_teams.sent) == 3


async def test_a_wrong_app_password_is_a_channel_error(fake_teams: FakeTeams) -> None:
    with pytest.raises(ChannelError, match="HTTP 401"):
        await connector(fake_teams, password="wrong").send_card(CONVERSATION, card())
    assert not fake_teams.sent


async def test_an_unreachable_connector_is_a_channel_error() -> None:
    token = BotToken("http://127.0.0.1:9/token", APP_ID, APP_PASSWORD, "s", retry=FAST, timeout_s=1)
    with pytest.raises(ChannelError, match="bot token"):
        await BotConnector("http://127.0.0.1:9/", token, retry=FAST).send_card(CONVERSATION, card())


async def test_a_webhook_gets_the_card_as_an_adaptive_card_attachment(fake_teams: FakeTeams) -> None:
    fake_teams.failures.append(502)
    await post_webhook(fake_teams.base + "/webhook", card("via webhook"), FAST)
    (post,) = fake_teams.webhook_posts
    assert post["type"] == "message"
    assert post["attachments"][0]["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert post["attachments"][0]["content"]["body"][0]["text"] == "via webhook"


def test_retry_after_is_honoured_and_bounded() -> None:
    policy = RetryPolicy(backoff_s=1.0)
    request = httpx.Request("POST", "http://x")
    assert policy.delay(0, httpx.Response(429, headers={"Retry-After": "2"}, request=request)) == 2.0
    assert policy.delay(0, httpx.Response(429, headers={"Retry-After": "9999"}, request=request)) == 30.0
    assert 0.5 <= policy.delay(0, None) <= 1.0
    assert 4.0 <= policy.delay(3, None) <= 8.0
