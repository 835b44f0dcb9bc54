"""Fixtures for the Slack channel: the fake Slack Web API, and a keyturn home whose serve processes talk to it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.canonical import sha256_hex
from tests.channels.slack.fake_slack import BOT_TOKEN, SIGNING_SECRET, TEAM, FakeSlack
from tests.conftest import TOKENS, Home

POLICY = Path(__file__).resolve().parent / "slack-policy.yaml"
SLACK_USERS = {"alice": "UALICE", "carol": "UCAROL", "dave": "UDAVE", "bob": "UBOB"}


@pytest.fixture
def fake_slack() -> Iterator[FakeSlack]:
    fake = FakeSlack(users={
        "UERIN": {"id": "UERIN", "team_id": TEAM, "deleted": False, "is_bot": False,
                  "profile": {"email": "Erin@Example.com"}},
        "UGUEST": {"id": "UGUEST", "team_id": TEAM, "is_restricted": True, "profile": {"email": "erin@example.com"}},
    }).start()
    yield fake
    fake.stop()


def slack_env(fake: FakeSlack) -> dict[str, str]:
    return {"KEYTURN_SLACK_BOT_TOKEN": BOT_TOKEN, "KEYTURN_SLACK_SIGNING_SECRET": SIGNING_SECRET,
            "KEYTURN_SLACK_API_URL": fake.url}


def slack_config(home: Home, **slack: Any) -> dict[str, Any]:
    people = {"alice": {"groups": ["dba"], "email": "alice@example.com"},
              "carol": {"groups": ["dba"], "email": "carol@example.com"},
              "erin": {"groups": ["dba"], "email": "erin@example.com"},
              "dave": {}, "bob": {"email": "bob@example.com"}}
    reviewers = [{"identity": f"api:{p}", "person": p, "token_sha256": sha256_hex(TOKENS[p])}
                 for p in ("alice", "carol", "dave", "bob")]
    reviewers += [{"identity": f"slack:{TEAM}/{user}", "person": p} for p, user in SLACK_USERS.items()]
    return {
        "policy": str(POLICY), "people": people, "reviewers": reviewers,
        "agents": [{"name": "agent-bob", "token_sha256": sha256_hex(TOKENS["agent-bob"]), "on_behalf_of": "bob"},
                   {"name": "agent-ci", "token_sha256": sha256_hex(TOKENS["agent-ci"])}],
        "slack": {"default_channel": "#ops-approvals", "map_email": True, "post_timeout_s": 10,
                  "retry_backoff_s": 0.05, "update_interval_s": 0.2, **slack},
    }


@pytest.fixture
def slack_home(home: Home, fake_slack: FakeSlack) -> Home:
    """The shared `home`, configured for Slack, whose processes get the Slack environment variables."""
    base_env = home.env

    def env() -> dict[str, str]:
        return {**base_env(), **slack_env(fake_slack)}

    home.env = env  # type: ignore[method-assign]
    home.write_config(**slack_config(home))
    return home
