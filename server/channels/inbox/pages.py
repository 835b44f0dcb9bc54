"""The reviewer's pages: sign-in and sign-out, the inbox of pending requests, one request's timeline, voting.

A vote is reported to the broker with the session's verified identity and channel "web"; the
broker alone judges it (eligibility, self-approval, quorum), exactly as for every other channel. A request's page
offers to edit the arguments, then approve (`server.approvals.edits`), and to approve with a standing grant for
calls like it (`server.approvals.grants`); the grants page lists the live grants, each with a revoke form.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from server.approvals.edits import has_masked
from server.approvals.grants import grant_json, proposal_for, revoke
from server.channels.api import MAX_REASON, submit_verdict
from server.channels.bodies import BodyRefused
from server.channels.inbox.render import Card, card, timeline
from server.channels.inbox.sessions import (
    LOGIN_COOKIE,
    LOGIN_TTL_S,
    SESSION_COOKIE,
    SESSION_TTL_S,
    Session,
    clear_cookie,
    harden,
    set_cookie,
)
from server.channels.inbox.site import Site, read_form, safe_next
from server.errors import LedgerError
from server.models import RequestView

log = logging.getLogger(__name__)

MAX_TOKEN = 512
VOTE_FIELDS = frozenset({"csrf", "back", "reason", "verdict", "arguments", "grant_for", "grant_uses", "grant_when"})
"""What a vote form may hold; anything else is refused, never ignored."""
REVOKE_FIELDS = frozenset({"csrf", "reason"})
INBOX_LIMIT = 200


class Pages:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.kt = site.kt
        self.provider_logout: Callable[[], Awaitable[str | None]] | None = None  # single sign-on's, when configured

    # -- sign-in -------------------------------------------------------------------------------

    def login_page(self, request: Request, *, status: int = 200, error: str | None = None,
                    next_url: str = "/inbox") -> Response:
        nonce, token = self.site.sessions.login_nonce()
        response = self.site.page(request, "login.html", None, status=status, title="Sign in", error=error,
                                  login_csrf=token, next_url=safe_next(next_url),
                                  local_token=self.kt.local_token is not None,
                                  sso_label=self.kt.settings.sso.label if self.kt.settings.sso else None)
        set_cookie(response, request, LOGIN_COOKIE, nonce, LOGIN_TTL_S, path="/login")
        return response

    def _unavailable(self, request: Request, e: LedgerError) -> Response:
        log.error("the inbox could not read or write the ledger: %s", e)  # where it lives is the operator's to read
        return self.site.page(request, "error.html", None, status=503, title="Ledger unavailable",
                              message=f"keyturn cannot serve this page now: {e.public}.")

    async def login_form(self, request: Request) -> Response:
        try:
            signed_in = await self.site.sessions.read(request) is not None
        except LedgerError as e:
            return self._unavailable(request, e)
        if signed_in:
            return self.site.redirect(request, safe_next(request.query_params.get("next")))
        return self.login_page(request, next_url=request.query_params.get("next") or "/inbox")

    async def login(self, request: Request) -> Response:
        try:
            form = await read_form(request)
        except BodyRefused as e:
            return harden(e.response())
        next_url = safe_next(str(form.get("next") or ""))
        if not self.site.sessions.check_login(request, form.get("csrf")):
            return self.login_page(request, status=403, next_url=next_url,
                                    error="This sign-in form expired or came from another site. Please try again.")
        token = form.get("token")
        token_text = token.strip() if isinstance(token, str) else ""
        identity = self.kt.credentials.reviewer(token_text) if 0 < len(token_text) <= MAX_TOKEN else None
        if identity is None:
            log.warning("web sign-in refused: not a reviewer token (from %s)", request.client)
            return self.login_page(request, status=401, next_url=next_url,
                                    error="That is not a reviewer token. Agent tokens cannot sign in.")
        try:
            _, cookie = await self.site.sessions.open(identity, token_text)
        except LedgerError as e:
            return self._unavailable(request, e)
        response = self.site.redirect(request, next_url)
        set_cookie(response, request, SESSION_COOKIE, cookie, int(SESSION_TTL_S))
        clear_cookie(response, request, LOGIN_COOKIE, path="/login")
        return response

    async def logout(self, request: Request, session: Session) -> Response:
        form = await read_form(request)
        if not self.site.sessions.check_csrf(request, session, form.get("csrf")):
            return self.site.page(request, "error.html", session, status=403, title="Refused",
                                  message="Sign-out refused: the form's security token is missing or wrong.")
        await self.site.sessions.revoke(session)
        provider_url, sso = None, self.kt.settings.sso
        if session.identity.startswith("oidc:") and self.provider_logout is not None:
            provider_url = await self.provider_logout()
        if provider_url is not None and sso is not None:
            # Then the provider's own session (RP-initiated logout), which sends the browser back to /login. A page
            # that moves on, not a redirect: the CSP's form-action 'self' stops a form's redirect to another origin.
            response: Response = self.site.page(request, "signed_out.html", None, title="Signed out",
                                                provider_url=provider_url, label=sso.label)
        else:
            response = self.site.redirect(request, "/login")
        clear_cookie(response, request, SESSION_COOKIE)
        return response

    # -- the inbox -----------------------------------------------------------------------------

    def _card(self, view: RequestView, session: Session) -> Card:
        tool = self.kt.find_tool(view.tool)  # a native or a proxied tool: its classifiers say what is SQL/shell
        shown = card(view, tool.classifiers if tool is not None else {}, self.site.person(session))
        upstream = getattr(tool, "upstream", None)
        if upstream is not None:  # a proxied tool: say which server the call goes to, under which name
            shown = replace(shown, origin=f"{upstream.name}: {getattr(tool, 'upstream_name', view.tool)}")
        return shown

    async def _cards(self, session: Session) -> list[Card]:
        views = await self.kt.ledger.list_calls(("pending",), limit=INBOX_LIMIT)
        return [self._card(v, session) for v in views]

    async def inbox(self, request: Request, session: Session) -> Response:
        return self.site.page(request, "inbox.html", session, title="Inbox", cards=await self._cards(session))

    async def inbox_list(self, request: Request, session: Session) -> Response:
        """The list alone, for the page's live updates (leaves any flash message to the next full page)."""
        html = self.site.render("_requests.html", cards=await self._cards(session),
                                csrf=self.site.sessions.csrf_token(session))
        return harden(HTMLResponse(html))

    # -- one request ---------------------------------------------------------------------------

    async def request_page(self, request: Request, session: Session, *, status: int = 200,
                           error: str | None = None, reason: str = "", arguments_text: str = "",
                           grant: dict[str, str] | None = None) -> Response:
        view = await self.kt.ledger.get_call(request.path_params["request_id"])
        if view is None:
            return self.site.page(request, "error.html", session, status=404, title="Not found",
                                  message="There is no request with that id.")
        events = await self.kt.ledger.events(view.id)
        edit = next((e.payload for e in events if e.kind == "arguments.edited"), None)
        # An edit is offered while nobody has voted, once, and only for arguments keyturn did not mask.
        editable = (view.state == "pending" and not view.votes and edit is None and not has_masked(view.arguments)
                    and self.kt.find_tool(view.tool) is not None)
        # A grant is offered while the request is pending and was not edited (the policy's word is the broker's).
        proposal = proposal_for(view, events) if view.state == "pending" else None
        return self.site.page(request, "request.html", session, status=status, title=f"Request {view.id[:12]}",
                              card=self._card(view, session), entries=timeline(events), error=error, reason=reason,
                              edit=edit, editable=editable, arguments_text=arguments_text, proposal=proposal,
                              grant=grant or {})

    async def vote(self, request: Request, session: Session) -> Response:
        request_id = request.path_params["request_id"]
        form = await read_form(request)
        reason = form.get("reason")
        text = reason.strip() if isinstance(reason, str) else ""
        if not self.site.sessions.check_csrf(request, session, form.get("csrf")):
            return harden(await self.request_page(
                request, session, status=403, reason=text,
                error="Refused: the form's security token is missing or wrong, or it came from another site. "
                      "Reload the page and try again."))
        if unknown := sorted(set(form.keys()) - VOTE_FIELDS):
            return await self.request_page(request, session, status=400, reason=text,
                                           error=f"Refused: the form has field(s) keyturn does not know: "
                                                 f"{', '.join(unknown)}.")
        verdict = form.get("verdict")
        if verdict not in ("approve", "deny"):
            return await self.request_page(request, session, status=400, reason=text,
                                           error="Choose Approve or Deny.")
        if len(text) > MAX_REASON:
            return await self.request_page(request, session, status=400, reason=text[:MAX_REASON],
                                           error=f"The reason can be at most {MAX_REASON} characters.")
        edited = form.get("arguments")
        edited_text = edited if isinstance(edited, str) else ""
        arguments = None
        if "arguments" in form:
            try:
                arguments = json.loads(edited_text)
            except json.JSONDecodeError as e:
                arguments = e
            if not isinstance(arguments, dict) or verdict != "approve":
                return await self.request_page(request, session, status=400, reason=text, arguments_text=edited_text,
                                               error="The edited arguments must be a JSON object (the whole "
                                                     "arguments, as they are to run).")
        grant_form = {k: v.strip() for k in ("grant_for", "grant_uses", "grant_when")
                      if isinstance(v := form.get(k), str)}
        grant: dict[str, object] | None = None
        if grant_form:
            uses = grant_form.get("grant_uses", "")
            if verdict != "approve" or not uses.isdigit() or len(uses) > 9 or not grant_form.get("grant_for"):
                return await self.request_page(request, session, status=400, reason=text, grant=grant_form,
                                               error="A standing grant needs how long it lasts (e.g. 1h) and how "
                                                     "many calls it covers (a whole number), with an approval.")
            grant = {"for": grant_form["grant_for"], "uses": int(uses)}
            if grant_form.get("grant_when"):
                grant["when"] = grant_form["grant_when"]
        outcome = await submit_verdict(self.kt, request_id, session.identity,
                                       "approve" if verdict == "approve" else "deny", text or None, channel="web",
                                       arguments=arguments, grant=grant)
        if not outcome.accepted:
            return await self.request_page(request, session, status=outcome.status, reason=text,
                                           arguments_text=edited_text, grant=grant_form,
                                           error=f"Your vote was not counted: {outcome.message}")
        back = f"/inbox/requests/{request_id}" if form.get("back") == "request" else "/inbox"
        verb = "approved" if verdict == "approve" else "denied"
        return self.site.redirect(request, back, flash=f"You {verb} request {request_id[:12]}: {outcome.message}.",
                                  session=session)

    # -- standing grants -----------------------------------------------------------------------

    async def grants_page(self, request: Request, session: Session, *, status: int = 200,
                          error: str | None = None) -> Response:
        grants = [grant_json(g) for g in await self.kt.ledger.grants(live_only=True)]
        return self.site.page(request, "grants.html", session, status=status, title="Standing grants", grants=grants,
                              error=error)

    async def revoke_grant(self, request: Request, session: Session) -> Response:
        grant_id = request.path_params["grant_id"]
        form = await read_form(request)
        if not self.site.sessions.check_csrf(request, session, form.get("csrf")):
            return harden(await self.grants_page(
                request, session, status=403,
                error="Refused: the form's security token is missing or wrong, or it came from another site."))
        if unknown := sorted(set(form.keys()) - REVOKE_FIELDS):
            return await self.grants_page(request, session, status=400, error=f"Refused: the form has field(s) "
                                                                              f"keyturn does not know: "
                                                                              f"{', '.join(unknown)}.")
        reason = form.get("reason")
        text = reason.strip() if isinstance(reason, str) else ""
        if not text or len(text) > MAX_REASON:
            return await self.grants_page(request, session, status=400,
                                          error=f"Write why you revoke the grant (at most {MAX_REASON} characters).")
        person = self.site.person(session)
        if person is None:
            return await self.grants_page(request, session, status=403,
                                          error=f"{session.identity} is not a configured reviewer.")
        refused = await revoke(self.kt.ledger, grant_id, person=person, reviewer=session.identity, reason=text,
                               channel="web")
        if refused is not None:
            return await self.grants_page(request, session, status=404 if refused.code == "unknown" else 409,
                                          error=f"Not revoked: {refused.message}")
        return self.site.redirect(request, "/inbox/grants", flash=f"You revoked grant {grant_id}.", session=session)
