"""What every inbox and audit handler shares: the runtime, the sessions, the templates and the page helper."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import jinja2
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from server.channels.bodies import BodyRefused, read_body, replay
from server.channels.inbox.render import environment
from server.channels.inbox.sessions import FLASH_COOKIE, Session, Sessions, clear_cookie, harden, set_cookie
from server.errors import LedgerError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from server.runtime import Keyturn

Handler = Callable[[Request, Session], Awaitable[Response]]
SAFE_NEXT = ("/inbox", "/audit")
MAX_FORM_BYTES = 64 * 1024


async def read_form(request: Request) -> FormData:
    """A small url-encoded form, read within the body limits (`BodyRefused` beyond MAX_FORM_BYTES or too slow)."""
    body = await read_body(request, MAX_FORM_BYTES)
    return await replay(request, body).form(max_files=0, max_fields=10)


def safe_next(target: str | None) -> str:
    """Only our own pages are valid places to return to after signing in (no open redirect)."""
    if not target:
        return "/inbox"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith(SAFE_NEXT) or "\\" in target:
        return "/inbox"
    return target


@dataclass
class Site:
    kt: Keyturn
    sessions: Sessions
    templates: jinja2.Environment = field(default_factory=environment)

    def person(self, session: Session | None) -> str | None:
        return self.kt.broker.directory.person(session.identity) if session else None

    def render(self, name: str, **context: Any) -> str:
        return self.templates.get_template(name).render(**context)

    def page(self, request: Request, name: str, session: Session | None, *, status: int = 200,
             **context: Any) -> HTMLResponse:
        flash = self.sessions.read_flash(request, session) if session else None
        context.setdefault("error", None)
        context.setdefault("title", "keyturn")
        html = self.render(
            name, session=session, person=self.person(session), request=request,
            csrf=self.sessions.csrf_token(session) if session else "",
            flash=flash, path=request.url.path, **context)
        response = harden(HTMLResponse(html, status_code=status))
        if session is not None and FLASH_COOKIE in request.cookies:
            clear_cookie(response, request, FLASH_COOKIE)
        return response

    def redirect(self, request: Request, target: str, *, flash: str | None = None,
                 session: Session | None = None) -> RedirectResponse:
        response = RedirectResponse(target, status_code=303)
        if flash and session is not None:
            set_cookie(response, request, FLASH_COOKIE, self.sessions.flash(session, flash), 60)
        harden(response)
        return response

    def signed_in(self, handler: Handler, *, api: bool = False) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a handler: no session sends a page to sign-in (or a 401 for scripts); a ledger failure is a 503."""

        async def endpoint(request: Request) -> Response:
            try:
                session = await self.sessions.read(request)
            except LedgerError as e:  # the cause, not where the ledger lives (the log has that)
                log.error("the inbox could not read its sessions from the ledger: %s", e)
                return harden(Response(f"keyturn cannot serve this page now: {e.public}", status_code=503,
                                       media_type="text/plain"))
            if session is None:
                if api:
                    return harden(Response("sign in first", status_code=401, media_type="text/plain"))
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return harden(RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303))
            try:
                return await handler(request, session)
            except BodyRefused as e:
                return harden(e.response())
            except LedgerError as e:
                log.error("the inbox could not use the ledger: %s", e)
                return self.page(request, "error.html", session, status=503, title="Ledger unavailable",
                                 message=f"keyturn cannot serve this page now: {e.public}.")

        return endpoint
