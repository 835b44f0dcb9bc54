"""The decision page behind a signed link (see `decision_link`): GET shows, POST decides once.

Plain server-rendered HTML with no script, every value escaped, and headers that keep the link out
of referrers, caches and frames. The verdict goes to `ApprovalBroker.decide` with the `api:`
identity of the reviewer token typed into the form; the broker alone judges it.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from server.channels.api import submit_verdict
from server.channels.bodies import BodyRefused, read_body
from server.channels.teams.cards import MAX_REASON, arguments_text, outcome_text, request_facts
from server.channels.teams.decision_link import Link, LinkExpired, LinkSigner, consume, link_consumed, release
from server.errors import AuthError, LedgerError
from server.models import RequestView

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from server.runtime import Keyturn

MAX_FORM_BYTES = 16_384
HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
}
STYLE = ("body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem}"
         "pre{background:#f4f4f4;padding:.75rem;white-space:pre-wrap;overflow-wrap:anywhere}"
         "th{text-align:left;padding-right:1rem;vertical-align:top}td{overflow-wrap:anywhere}"
         ".notice{padding:.5rem .75rem;border-left:4px solid #c50;background:#fff6ee}"
         ".ok{border-color:#2a7;background:#effaf3}")


def render(status: int, view: RequestView | None, *, notice: str | None = None, ok: bool = False,
           nonce: str | None = None) -> HTMLResponse:
    esc = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='referrer' content='no-referrer'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>keyturn review</title>"
             f"<style>{STYLE}</style></head><body><h1>keyturn: review a held tool call</h1>"]
    if notice:
        parts.append(f"<p class='notice{' ok' if ok else ''}'>{esc(notice)}</p>")
    if view is not None:
        if (outcome := outcome_text(view)) is not None:
            parts.append(f"<p><strong>{esc(outcome)}</strong></p>")
        rows = "".join(f"<tr><th>{esc(label)}</th><td>{esc(value)}</td></tr>" for label, value in request_facts(view, True))
        parts.append(f"<table>{rows}</table><h2>Arguments (secrets masked)</h2><pre>{esc(arguments_text(view))}</pre>")
        if nonce is not None and view.state == "pending":
            parts.append(
                "<form method='post' autocomplete='off'>"
                f"<input type='hidden' name='nonce' value='{esc(nonce)}'>"
                "<p><label>Your keyturn reviewer token<br>"
                "<input type='password' name='token' required size='48' autocomplete='off'></label></p>"
                f"<p><label>Reason (required to deny)<br><textarea name='reason' rows='3' cols='60' "
                f"maxlength='{MAX_REASON}'></textarea></label></p>"
                "<p><button type='submit' name='verdict' value='approve'>Approve</button> "
                "<button type='submit' name='verdict' value='deny'>Deny</button></p></form>")
    parts.append("</body></html>")
    return HTMLResponse("".join(parts), status_code=status, headers=HEADERS)


FORM_FIELDS = frozenset({"nonce", "token", "verdict", "reason"})


class FormRefused(ValueError):
    """A form with a field keyturn does not know, or one given twice: refused, never ignored."""


async def read_form(request: Request) -> dict[str, str] | None:
    """The decision form's fields (None when it is not a form). Raises `FormRefused` for a field it does not know or
    one given twice, like every reviewer body."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return None
    body = await read_body(request, MAX_FORM_BYTES)  # BodyRefused beyond the limit or too slow
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True, max_num_fields=10, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return None
    if unknown := sorted(set(fields) - FORM_FIELDS):
        raise FormRefused(f"unknown field(s) {', '.join(repr(u[:64]) for u in unknown[:5])}")
    if twice := sorted(k for k, v in fields.items() if len(v) > 1):
        raise FormRefused(f"field(s) given more than once: {', '.join(repr(k) for k in twice)}")
    return {k: v[0] for k, v in fields.items()}


def decision_routes(kt: Keyturn, signer: LinkSigner) -> list[Route]:
    Handler = Callable[[Request, Link, RequestView], Awaitable[Response]]

    def with_link(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                link = signer.open(request.path_params["token"])
            except LinkExpired as e:
                return render(410, None, notice=f"{e}. Nothing was decided.")
            except AuthError as e:
                return render(404, None, notice=str(e))
            try:
                view = await kt.ledger.get_call(link.request_id)
                if view is None:
                    return render(404, None, notice=f"no request {link.request_id}")
                return await handler(request, link, view)
            except LedgerError as e:  # the cause, not where the ledger lives (the log has that)
                log.error("a decision link could not use the ledger: %s", e)
                return render(503, None, notice=f"nothing was decided: keyturn {e.public}")

        return endpoint

    async def show(request: Request, link: Link, view: RequestView) -> Response:
        if await link_consumed(kt.ledger, link):
            return render(409, view, notice="This link has already been used.")
        return render(200, view, nonce=signer.nonce(link))

    async def submit(request: Request, link: Link, view: RequestView) -> Response:
        try:
            form = await read_form(request)
        except BodyRefused as e:
            return e.response()
        except FormRefused as e:
            return render(400, view, notice=f"The form was refused: {e}. Nothing was decided.",
                          nonce=signer.nonce(link))
        if form is None:
            return render(400, view, notice="The form could not be read.", nonce=signer.nonce(link))

        def again(status: int, notice: str, current: RequestView = view) -> Response:
            return render(status, current, notice=notice, nonce=signer.nonce(link))

        try:
            nonce_id = signer.check_nonce(link, form.get("nonce", ""))
        except AuthError as e:
            return again(400, str(e))
        identity = kt.credentials.reviewer(form.get("token", "").strip())
        if identity is None:
            return again(401, "That reviewer token is not valid. Nothing was decided.")
        verdict, reason = form.get("verdict"), form.get("reason", "").strip() or None
        if verdict not in ("approve", "deny") or (reason is not None and len(reason) > MAX_REASON):
            return again(400, f"Choose Approve or Deny; a reason has at most {MAX_REASON} characters.")
        why = await consume(kt.ledger, link, nonce_id, identity)
        if why == "used":
            return render(409, view, notice="This link has already been used.")
        if why == "nonce_used":
            return again(400, "This form was already submitted once; submit the fresh one.")
        if why is not None:
            return render(404, None, notice=f"no request {link.request_id}")
        try:
            outcome = await submit_verdict(kt, link.request_id, identity, "approve" if verdict == "approve" else "deny",
                                           reason, channel="teams-link")
        except LedgerError:
            with suppress(LedgerError):
                await release(kt.ledger, link, "ledger_error")
            raise
        current = await kt.ledger.get_call(link.request_id) or view
        if not outcome.accepted:
            await release(kt.ledger, link, outcome.code)
            return again(outcome.status, f"Not counted: {outcome.message}", current)
        return render(200, current, notice=f"Recorded: {outcome.message}.", ok=True)

    return [Route("/teams/decide/{token}", with_link(show), methods=["GET"]),
            Route("/teams/decide/{token}", with_link(submit), methods=["POST"])]
