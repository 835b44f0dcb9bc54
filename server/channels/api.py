"""The reviewer HTTP API (JSON): list, show, approve (as sent, or with edited arguments), deny, and the audit
reads. The CLI uses it. Every body is strict: a field keyturn does not know is a 400 naming it.

Reviewers authenticate with bearer tokens that the config maps to `api:` identities. The API
only reports verdicts with that verified identity; `ApprovalBroker.decide` judges them.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from server.approvals.edits import EditRefused, ProposedEdit
from server.approvals.grants import (
    GrantRefused,
    ProposedGrant,
    grant_json,
    offer,
    parse_spec,
    prepare_grant,
    revoke,
)
from server.approvals.quorum import needs
from server.channels.bodies import BodyRefused, read_body
from server.errors import LedgerError
from server.models import RequestView, Verdict, VerdictKind, VoteResult, state_label

if TYPE_CHECKING:
    from server.runtime import Keyturn

log = logging.getLogger(__name__)

MAX_REASON = 2000
MAX_BODY_BYTES = 64 * 1024


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status)


def view_json(view: RequestView) -> dict[str, Any]:
    """The request as JSON, with `status`: its state as a person reads it (see `server.models.state_label`), and
    `needs`: what it needs and where it stands (`server.approvals.quorum.needs`, as every channel says it), and
    `impact`: what it would touch, as every card says it ("would delete 1,204 of 50,311 rows in orders")."""
    return {**view.model_dump(mode="json"), "status": state_label(view.state),
            "needs": needs(view.review, view.votes).as_json(),
            "impact": view.review.impact if view.review is not None else None}


async def submit_verdict(
    kt: Keyturn, request_id: str, identity: str, verdict: VerdictKind, reason: object, *, channel: str,
    arguments: object = None, grant: object = None,
) -> VoteResult:
    """Report a verified reviewer's verdict to the broker, which alone judges it (`VoteResult.status` is the HTTP
    status to answer with). `arguments` (an approval only): the reviewer's edit of the call's arguments, judged by
    the gate as a call of its own before the broker records it (`server.approvals.edits`)."""
    text = reason if isinstance(reason, str) else None
    if (reason is not None and text is None) or len(text or "") > MAX_REASON:
        return VoteResult(request_id, False, "", f"reason must be a string of at most {MAX_REASON} characters",
                          "bad_request")
    edit: ProposedEdit | EditRefused | None = None
    if arguments is not None:
        if not isinstance(arguments, dict):
            return VoteResult(request_id, False, "", "arguments must be a JSON object: the call's arguments as they "
                              "are to run", "bad_request")
        edit = await judge_edit(kt, request_id, arguments)
    proposed: ProposedGrant | GrantRefused | None = None
    if grant is not None:
        if verdict != "approve":
            return VoteResult(request_id, False, "", "only an approval can make a standing grant", "bad_request")
        proposed = await judge_grant(kt, request_id, grant)
        if proposed is None:
            return VoteResult(request_id, False, "", f"no request {request_id}", "unknown")
    return await kt.broker.decide(Verdict(
        request_id=request_id, reviewer=identity, verdict=verdict, reason=text, channel=channel), edit, proposed)


async def judge_grant(kt: Keyturn, request_id: str, body: object) -> ProposedGrant | GrantRefused | None:
    """A reviewer's grant spec judged against the request as stored now and the policy in force (the broker checks
    again, in its transaction, that the request is still as judged); None when there is no such request."""
    spec = parse_spec(body)
    if isinstance(spec, GrantRefused):
        return spec
    view = await kt.ledger.get_call(request_id)
    if view is None:
        return None
    events, broken = await kt.ledger.call_chain(request_id)
    if broken is not None:
        return GrantRefused("not_pending", f"the chain around this request is broken: {broken}")
    return prepare_grant(kt.policy.current, view, events, spec)


async def judge_edit(kt: Keyturn, request_id: str, arguments: dict[str, Any]) -> ProposedEdit | EditRefused | None:
    """The edit judged against the request as stored now (the broker checks again, in its transaction, that the
    request is still as judged); None when there is nothing to edit (no such request, or the same arguments)."""
    view = await kt.ledger.get_call(request_id)
    if view is None:
        return None  # the broker answers: no such request
    tool = kt.find_tool(view.tool)
    if tool is None:
        return EditRefused("tool_unavailable", f"this keyturn process does not serve {view.tool}, so it cannot judge "
                                               "an edit of it; edit it where the tool is served")
    edit = await kt.gate.judge_edit(tool, view, arguments)
    if isinstance(edit, ProposedEdit) and edit.args_hash == view.args_hash:
        return None  # the same arguments (once the tool has checked them): a plain approval
    return edit


BODY_FIELDS = {"approve": frozenset({"reason", "arguments", "grant"}), "deny": frozenset({"reason"}),
               "revoke": frozenset({"reason"})}
"""What a reviewer's body may hold, by verdict: anything else is refused (400), never ignored."""


def unknown_fields(body: dict[str, Any], verdict: str) -> JSONResponse | None:
    """The 400 for a body with a field keyturn does not know (naming it), or None."""
    unknown = sorted(set(body) - BODY_FIELDS[verdict])
    if not unknown:
        return None
    allowed = " and ".join(f"`{f}`" for f in sorted(BODY_FIELDS[verdict]))
    return JSONResponse({"error": f"unknown field(s) in the {verdict} body: {', '.join(unknown)} (it takes {allowed})",
                         "code": "unknown_field", "fields": unknown}, status_code=400)


async def _json_body(request: Request) -> dict[str, Any] | JSONResponse:
    """A reviewer's body: a JSON object (empty when none was sent), or the response refusing it."""
    try:
        raw = await read_body(request, MAX_BODY_BYTES)
    except BodyRefused as e:
        return e.json_response()
    try:
        body = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "the body must be JSON", "bad_request")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object", "bad_request")
    return body


def reviewer_identity(kt: Keyturn, request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return kt.credentials.reviewer(token.strip())


def api_routes(kt: Keyturn) -> list[Route]:
    def authed(handler: Any) -> Any:
        async def endpoint(request: Request) -> JSONResponse:
            identity = reviewer_identity(kt, request)
            if identity is None:
                return JSONResponse({"error": "a valid reviewer bearer token is required", "code": "unauthorized"},
                                    status_code=401, headers={"WWW-Authenticate": 'Bearer realm="keyturn"'})
            try:
                result: JSONResponse = await handler(request, identity)
                return result
            except LedgerError as e:  # the cause, not where the ledger lives (the log has that)
                log.error("the reviewer API could not use the ledger: %s", e)
                return _error(503, f"keyturn cannot decide now: {e.public}", "ledger_unavailable")

        return endpoint

    async def whoami(request: Request, identity: str) -> JSONResponse:
        return JSONResponse({"reviewer": identity, "person": kt.broker.directory.person(identity)})

    async def list_requests(request: Request, identity: str) -> JSONResponse:
        state = request.query_params.get("state", "pending")
        states = [s for s in state.split(",") if s]
        allowed = {"received", "allowed", "pending", "approved", "running", "executed", "failed", "denied",
                   "expired", "cancelled", "abandoned"}
        if not states or not set(states) <= allowed:
            return _error(400, f"state must be a comma-separated list of {sorted(allowed)}", "bad_request")
        views = await kt.ledger.list_calls(states, limit=500)
        return JSONResponse({"requests": [view_json(v) for v in views]})

    async def show(request: Request, identity: str) -> JSONResponse:
        view = await kt.ledger.get_call(request.path_params["request_id"])
        if view is None:
            return _error(404, "no such request", "unknown")
        events = await kt.ledger.events(view.id)
        return JSONResponse({"request": view_json(view), "events": [e.model_dump(mode="json") for e in events],
                             "grant": offer(kt.policy.current, view, events)})

    async def vote(request: Request, identity: str, verdict: str) -> JSONResponse:
        body = await _json_body(request)
        if isinstance(body, JSONResponse):
            return body
        if (refused := unknown_fields(body, verdict)) is not None:
            return refused
        if "grant" in body and isinstance(spec := parse_spec(body["grant"]), GrantRefused):
            said: dict[str, Any] = {"error": spec.message, "code": spec.code}
            if spec.fields:
                said["fields"] = list(spec.fields)
            return JSONResponse(said, status_code=400)
        if "arguments" in body and not isinstance(body["arguments"], dict):
            return _error(400, "arguments must be a JSON object: the call's arguments as they are to run",
                          "bad_request")
        request_id = request.path_params["request_id"]
        outcome = await submit_verdict(kt, request_id, identity, "approve" if verdict == "approve" else "deny",
                                       body.get("reason"), channel="api", arguments=body.get("arguments"),
                                       grant=body.get("grant"))
        if not outcome.accepted:
            return _error(outcome.status, outcome.message, outcome.code)
        return JSONResponse({"request_id": request_id, "state": outcome.state, "message": outcome.message})

    async def list_grants(request: Request, identity: str) -> JSONResponse:
        every = request.query_params.get("all", "") in ("1", "true")
        return JSONResponse({"grants": [grant_json(g) for g in await kt.ledger.grants(live_only=not every)]})

    async def revoke_grant(request: Request, identity: str) -> JSONResponse:
        body = await _json_body(request)
        if isinstance(body, JSONResponse):
            return body
        if (refused := unknown_fields(body, "revoke")) is not None:
            return refused
        reason = body.get("reason")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
            return _error(400, f"a revocation needs a reason (a string of at most {MAX_REASON} characters)",
                          "reason_required")
        person = kt.broker.directory.person(identity)
        if person is None:
            return _error(403, f"{identity} is not a configured reviewer", "unknown_reviewer")
        grant_id = request.path_params["grant_id"]
        refusal = await revoke(kt.ledger, grant_id, person=person, reviewer=identity, reason=reason.strip(),
                               channel="api")
        if refusal is not None:
            return _error(404 if refusal.code == "unknown" else 409, refusal.message, refusal.code)
        return JSONResponse({"grant": grant_id, "state": "revoked", "message": f"revoked by {person}"})

    async def audit_tail(request: Request, identity: str) -> JSONResponse:
        try:
            n = max(1, min(1000, int(request.query_params.get("n", "20"))))
        except ValueError:
            return _error(400, "n must be an integer", "bad_request")
        return JSONResponse({"events": [e.model_dump(mode="json") for e in await kt.ledger.tail(n)]})

    async def audit_verify(request: Request, identity: str) -> JSONResponse:
        result = await kt.ledger.verify()
        return JSONResponse({"ok": result.ok, "count": result.count, "first_bad_seq": result.first_bad_seq,
                             "message": result.message})

    return [
        Route("/api/whoami", authed(whoami), methods=["GET"]),
        Route("/api/requests", authed(list_requests), methods=["GET"]),
        Route("/api/requests/{request_id}", authed(show), methods=["GET"]),
        Route("/api/requests/{request_id}/approve", authed(lambda r, i: vote(r, i, "approve")), methods=["POST"]),
        Route("/api/requests/{request_id}/deny", authed(lambda r, i: vote(r, i, "deny")), methods=["POST"]),
        Route("/api/grants", authed(list_grants), methods=["GET"]),
        Route("/api/grants/{grant_id}/revoke", authed(revoke_grant), methods=["POST"]),
        Route("/api/audit/tail", authed(audit_tail), methods=["GET"]),
        Route("/api/audit/verify", authed(audit_verify), methods=["GET"]),
    ]
