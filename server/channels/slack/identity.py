"""Who clicked: the Slack identity `slack:<team>/<user>` from a signed payload, mapped to a person.

Only the payload's user id and team id are used (Slack signed them). An identity not listed in
`reviewers:` may be mapped by e-mail when `map_email` is on: the address comes from Slack's own
`users.info`, and counts only for full members (not guests, bots or deactivated users) whose address
belongs to exactly one person in `people:`. The mapping goes into the broker's directory, where
`ApprovalBroker.decide` looks reviewers up; configured identities are never changed.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import anyio
from slack_sdk.web.async_client import AsyncWebClient

from server.approvals import ApprovalBroker
from server.channels.slack.config import describe
from server.config import Settings

log = logging.getLogger(__name__)


class SlackIdentities:
    """Resolves the clicking user of a Bolt payload to the reviewer identity the broker will judge."""

    def __init__(self, *, client: AsyncWebClient, broker: ApprovalBroker, settings: Settings, map_email: bool,
                 timeout_s: float) -> None:
        self.client, self.broker, self.settings = client, broker, settings
        self.map_email, self.timeout_s = map_email, timeout_s
        self._configured = frozenset(r.identity for r in settings.reviewers)

    async def identify(self, body: dict[str, Any]) -> tuple[str, str]:
        """(Slack user id, reviewer identity) from the signed payload's user and team ids, nothing else."""
        user_obj = body.get("user") or {}
        user = str(user_obj.get("id") or "")
        teams = [str(t) for t in ((body.get("team") or {}).get("id"), user_obj.get("team_id")) if t]
        candidates = list(dict.fromkeys(f"slack:{t}/{user}" for t in teams)) or [f"slack:unknown/{user}"]
        for identity in candidates:
            if identity in self._configured:
                return user, identity
        if self.map_email and user:
            self._learn(candidates[0], await self._person_by_email(user))
        return user, candidates[0]

    async def _person_by_email(self, user: str) -> str | None:
        try:
            with anyio.fail_after(self.timeout_s):
                info = (await self.client.users_info(user=user))["user"]
        except Exception as e:
            log.warning("slack: users.info failed for %s: %s", user, describe(e))
            return None
        if (info.get("id") != user or info.get("deleted") or info.get("is_bot") or info.get("is_restricted")
                or info.get("is_ultra_restricted")):
            return None
        email = str((info.get("profile") or {}).get("email") or "").strip().lower()
        people = [name for name, p in self.settings.people.items() if email and (p.email or "").lower() == email]
        return people[0] if len(people) == 1 else None

    def _learn(self, identity: str, person: str | None) -> None:
        """Map (or unmap) an e-mail-matched identity in the broker's directory; configured ones never change."""
        directory = self.broker.directory
        identities = dict(directory.identities)
        if identities.get(identity) == person or identity in self._configured:
            return
        if person is None:
            identities.pop(identity, None)
        else:
            identities[identity] = person
        self.broker.directory = replace(directory, identities=identities)
