"""Reviewer channels. Each delivers held requests to humans and reports their verified verdicts to the broker.

api.py     the reviewer HTTP API (JSON), and `submit_verdict`, which every channel reports a verdict through
bodies.py  reading request bodies before anyone is authenticated: bounded in size and in time
inbox/     the reviewer inbox and audit pages (server-rendered, with their templates and static files)
slack/     the Slack channel
teams/     the Microsoft Teams channel, and the signed decision links of its no-bot fallback
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute

if TYPE_CHECKING:  # the channels are importable without building a runtime (unit tests, docs)
    from server.runtime import Keyturn


async def build_channels(kt: Keyturn, env: dict[str, str]) -> list[BaseRoute]:
    """Attach the channels the environment and config enable; return the HTTP routes they serve."""
    from server.channels.inbox import inbox_routes
    from server.channels.slack.channel import attach_slack

    routes: list[BaseRoute] = []
    routes += inbox_routes(kt)  # the reviewer inbox and audit pages (/login, /inbox, /audit)
    routes += attach_slack(kt, env)
    if kt.settings.teams:  # the Teams SDK is the optional `teams` extra
        from server.channels.teams.channel import attach_teams

        routes += attach_teams(kt, env)
    return routes
