"""Bot Framework JWT validation: every check the Bot Connector spec asks for, against a fake key server."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from server.channels.teams.auth import BotFrameworkAuth, require_https
from server.errors import AuthError, ConfigError
from tests.channels.teams.conftest import APP_ID, FakeTeams, new_key


def auth_for(fake: FakeTeams, **kwargs: Any) -> BotFrameworkAuth:
    return BotFrameworkAuth(APP_ID, fake.base + "/openid", **kwargs)


def activity(fake: FakeTeams, **overrides: Any) -> dict[str, Any]:
    return {"type": "invoke", "channelId": "msteams", "serviceUrl": fake.service_url, **overrides}


async def test_a_token_signed_by_the_published_key_for_our_app_is_accepted(fake_teams: FakeTeams) -> None:
    claims = await auth_for(fake_teams).verify(f"Bearer {fake_teams.jwt()}", activity(fake_teams))
    assert claims["aud"] == APP_ID and claims["serviceurl"] == fake_teams.service_url


async def test_the_service_url_comparison_ignores_a_trailing_slash_and_case(fake_teams: FakeTeams) -> None:
    token = fake_teams.jwt(serviceurl=fake_teams.base.upper().replace("HTTP://", "http://"))
    await auth_for(fake_teams).verify(f"Bearer {token}", activity(fake_teams))


@pytest.mark.parametrize(("case", "claims", "message"), [
    ("wrong audience", {"aud": "someone-elses-bot"}, "Audience"),
    ("wrong issuer", {"iss": "https://evil.example"}, "issuer"),
    ("expired", {"exp": int(time.time()) - 3600}, "expired"),
    ("not yet valid", {"nbf": int(time.time()) + 3600}, "not yet valid"),
    ("no expiry", {"exp": None}, "exp"),
    ("wrong serviceurl", {"serviceurl": "https://attacker.example/"}, "serviceurl"),
    ("no serviceurl", {"serviceurl": None}, "serviceurl"),
])
async def test_tokens_that_fail_a_claim_check_are_refused(fake_teams: FakeTeams, case: str, claims: dict[str, Any],
                                                           message: str) -> None:
    with pytest.raises(AuthError, match=message):
        await auth_for(fake_teams).verify(f"Bearer {fake_teams.jwt(**claims)}", activity(fake_teams))


async def test_the_activity_must_carry_the_service_url_the_token_names(fake_teams: FakeTeams) -> None:
    with pytest.raises(AuthError, match="serviceurl"):
        await auth_for(fake_teams).verify(f"Bearer {fake_teams.jwt()}",
                                          activity(fake_teams, serviceUrl="https://attacker.example/"))


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic abc", "Bearer not-a-jwt"])
async def test_missing_or_malformed_tokens_are_refused(fake_teams: FakeTeams, header: str | None) -> None:
    with pytest.raises(AuthError):
        await auth_for(fake_teams).verify(header, activity(fake_teams))


async def test_a_token_signed_by_another_key_under_the_published_key_id_is_refused(fake_teams: FakeTeams) -> None:
    forged = fake_teams.jwt(key=new_key())
    with pytest.raises(AuthError, match="Signature verification failed"):
        await auth_for(fake_teams).verify(f"Bearer {forged}", activity(fake_teams))


async def test_an_unknown_key_id_is_refused(fake_teams: FakeTeams) -> None:
    with pytest.raises(AuthError, match="unknown key"):
        await auth_for(fake_teams).verify(f"Bearer {fake_teams.jwt(kid='other')}", activity(fake_teams))


async def test_symmetric_and_unsigned_tokens_are_refused(fake_teams: FakeTeams) -> None:
    claims = {"iss": "https://api.botframework.com", "aud": APP_ID, "serviceurl": fake_teams.service_url,
              "exp": int(time.time()) + 600}
    public_pem = fake_teams.jwk()["n"]  # an attacker's guess at an HMAC key: the public modulus
    hs256 = jwt.encode(claims, public_pem, algorithm="HS256", headers={"kid": fake_teams.kid})
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": fake_teams.kid})
    for token in (hs256, unsigned):
        with pytest.raises(AuthError):
            await auth_for(fake_teams).verify(f"Bearer {token}", activity(fake_teams))


async def test_a_key_not_endorsed_for_the_activitys_channel_is_refused(fake_teams: FakeTeams) -> None:
    with pytest.raises(AuthError, match="endorsed"):
        await auth_for(fake_teams).verify(f"Bearer {fake_teams.jwt()}", activity(fake_teams, channelId="webchat"))


async def test_keys_are_cached_and_refetched_when_a_new_key_id_appears(fake_teams: FakeTeams) -> None:
    auth = auth_for(fake_teams, refresh_floor_s=0.0)
    await auth.verify(f"Bearer {fake_teams.jwt()}", activity(fake_teams))
    fake_teams.key, fake_teams.kid = new_key(), "rotated-key"  # Microsoft rotates its keys
    await auth.verify(f"Bearer {fake_teams.jwt()}", activity(fake_teams))


async def test_unreachable_key_server_fails_closed() -> None:
    auth = BotFrameworkAuth(APP_ID, "http://127.0.0.1:9/openid", timeout_s=2)
    with pytest.raises(AuthError, match="cannot fetch"):
        await auth.verify("Bearer " + jwt.encode({"a": 1}, new_key(), algorithm="RS256", headers={"kid": "k"}),
                          {"serviceUrl": "x"})


def test_key_and_token_endpoints_must_be_https_except_on_loopback() -> None:
    assert require_https("https://login.botframework.com/x", "x")
    assert require_https("http://127.0.0.1:1234/x", "x")
    with pytest.raises(ConfigError):
        require_https("http://login.botframework.com/x", "openid_metadata_url")
    with pytest.raises(ConfigError):
        BotFrameworkAuth(APP_ID, "http://example.com/openid")
