"""The reviewer inbox and the audit explorer: server-rendered pages on keyturn's HTTP server.

/login, /logout            sign in with a reviewer token (the API's), sign out
/inbox                     pending requests, newest first, updated live (/inbox/events, /inbox/list)
/inbox/requests/<id>       one request's whole story, with its ledger hashes; vote (POST .../vote)
/audit                     search the ledger, export the view (/audit/export.csv|jsonl), chain verification

A channel never decides: votes go to `ApprovalBroker.decide` with the session's verified identity.
Every response carries a strict Content-Security-Policy; everything is served from here (no CDN).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.channels.inbox.audit import Audit
from server.channels.inbox.live import Live
from server.channels.inbox.pages import Pages
from server.channels.inbox.render import STATIC
from server.channels.inbox.sessions import SECURITY_HEADERS, Sessions
from server.channels.inbox.site import Site

if TYPE_CHECKING:
    from server.runtime import Keyturn

__all__ = ["build_site", "inbox_routes"]


class _StaticHeaders:
    """The security headers on the stylesheet and script too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                headers.append((b"cache-control", b"no-cache"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def build_site(kt: Keyturn) -> Site:
    trusted = [kt.settings.reviewer_api_url] if kt.settings.reviewer_api_url else []
    from server.channels.inbox.sso import sso_digests

    sso_reviewers = sso_digests(kt.settings.sso, [r.identity for r in kt.settings.reviewers])
    sessions = Sessions(kt.ledger, lambda: [*kt.credentials.reviewers.items(), *sso_reviewers],
                        trusted_origins=[_origin(u) for u in trusted])
    return Site(kt=kt, sessions=sessions)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def inbox_routes(kt: Keyturn) -> list[BaseRoute]:
    """The pages' routes, for `build_channels`."""
    site = build_site(kt)
    pages, audit, live = Pages(site), Audit(site), Live(site)
    sso_routes: list[BaseRoute] = []
    if kt.settings.sso is not None:
        from server.channels.inbox.sso import SSO_PATH, SingleSignOn

        sso = SingleSignOn(site, kt.settings.sso, pages.login_page)
        pages.provider_logout = sso.logout_url
        sso_routes = [Route(SSO_PATH, sso.start, methods=["GET"]),
                      Route(SSO_PATH + "/callback", sso.callback, methods=["GET"])]
    return [*sso_routes,
        Mount("/inbox/static", app=_StaticHeaders(StaticFiles(directory=STATIC)), name="inbox-static"),
        Route("/login", pages.login_form, methods=["GET"]),
        Route("/login", pages.login, methods=["POST"]),
        Route("/logout", site.signed_in(pages.logout), methods=["POST"]),
        Route("/inbox", site.signed_in(pages.inbox), methods=["GET"]),
        Route("/inbox/list", site.signed_in(pages.inbox_list, api=True), methods=["GET"]),
        Route("/inbox/events", site.signed_in(live.events, api=True), methods=["GET"]),
        Route("/inbox/requests/{request_id}", site.signed_in(pages.request_page), methods=["GET"]),
        Route("/inbox/requests/{request_id}/vote", site.signed_in(pages.vote), methods=["POST"]),
        Route("/inbox/grants", site.signed_in(pages.grants_page), methods=["GET"]),
        Route("/inbox/grants/{grant_id}/revoke", site.signed_in(pages.revoke_grant), methods=["POST"]),
        Route("/audit", site.signed_in(audit.page), methods=["GET"]),
        Route("/audit/export.{fmt}", site.signed_in(audit.export), methods=["GET"]),
    ]
