"""Reviewer channels. Each delivers held requests to humans and reports their verified verdicts to the broker."""

from __future__ import annotations

from starlette.routing import BaseRoute

from server.app import Keyturn


async def build_channels(kt: Keyturn, env: dict[str, str]) -> list[BaseRoute]:
    """Attach the channels the environment and config enable; return the HTTP routes they serve."""
    routes: list[BaseRoute] = []
    return routes
