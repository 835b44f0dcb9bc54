"""The audit explorer: search the ledger's calls, export the filtered view, and verify the hash chain.

Filters go to `Ledger.search_calls` as bound parameters only. Times are read and shown in UTC.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, get_args
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.channels.inbox.render import utc
from server.channels.inbox.sessions import Session, harden
from server.channels.inbox.site import Site
from server.ledger import CallFilter, VerifyResult
from server.models import RequestState, RequestView

PAGE_SIZE = 50
EXPORT_BATCH = 500
MAX_EXPORT = 100_000
MAX_FIELD = 200
VERIFY_AUTO_MAX = 200_000  # events verified on every page load; past that, on request
STATES: tuple[str, ...] = get_args(RequestState)
FILTER_KEYS = ("tool", "principal", "reviewer", "outcome", "since", "until")
CSV_COLUMNS = ("id", "created_utc", "tool", "principal", "on_behalf_of", "model", "state", "risk", "reason",
               "rules", "votes", "outcome_reason", "expires_utc", "args_hash", "policy_digest", "arguments")


class BadFilter(ValueError):
    pass


def parse_time(value: str, *, end: bool) -> float:
    """An ISO date or date-time, read as UTC; a bare date as `until` means the end of that day."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as e:
        raise BadFilter(f"{value!r} is not a date (YYYY-MM-DD) or date and time (YYYY-MM-DDTHH:MM)") from e
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if end and len(value) == 10:
        moment += timedelta(days=1)
    return moment.timestamp()


@dataclass(frozen=True)
class AuditQuery:
    fields: dict[str, str]  # what the form shows back
    where: CallFilter
    before: tuple[float, str] | None

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> AuditQuery:
        fields = {k: params.get(k, "").strip()[:MAX_FIELD] for k in FILTER_KEYS}
        if fields["outcome"] and fields["outcome"] not in STATES:
            raise BadFilter(f"outcome must be one of {', '.join(STATES)}")
        since = parse_time(fields["since"], end=False) if fields["since"] else None
        until = parse_time(fields["until"], end=True) if fields["until"] else None
        before = None
        if cursor := params.get("before", ""):
            created, _, call_id = cursor.partition(":")
            try:
                before = (float(created), call_id[:MAX_FIELD])
            except ValueError as e:
                raise BadFilter("the page cursor is malformed") from e
        where = CallFilter(tool=fields["tool"] or None, principal=fields["principal"] or None,
                           reviewer=fields["reviewer"] or None, state=fields["outcome"] or None,
                           since=since, until=until)
        return cls(fields, where, before)

    def link(self, path: str, **extra: str) -> str:
        params = {k: v for k, v in self.fields.items() if v} | extra
        return f"{path}?{urlencode(params)}" if params else path


def csv_cell(value: Any) -> str:
    """A cell a spreadsheet will not run as a formula."""
    text = "" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def csv_row(view: RequestView) -> list[str]:
    votes = "; ".join(f"{v['person']} {v['verdict']}" + (f": {v['reason']}" if v.get("reason") else "")
                      for v in view.votes)
    values: list[Any] = [
        view.id, utc(view.created), view.tool, view.principal, view.on_behalf_of, view.model, view.state,
        view.risk, view.reason, " ".join(str(r.get("id")) for r in view.rules), votes, view.outcome_reason,
        utc(view.expires) if view.expires else "", view.args_hash, view.policy_digest, view.arguments,
    ]
    return [csv_cell(v) for v in values]


class Audit:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.kt = site.kt

    async def verification(self, asked: bool) -> VerifyResult | int:
        """The whole chain recomputed (an edit anywhere must show, so nothing is cached), or, past
        VERIFY_AUTO_MAX events and unless asked, the number of events left unverified on this load."""
        head = await self.kt.ledger.head_seq()
        if head > VERIFY_AUTO_MAX and not asked:
            return head
        return await self.kt.ledger.verify()

    async def page(self, request: Request, session: Session) -> Response:
        facets = await self.kt.ledger.call_facets()
        verify = await self.verification(request.query_params.get("verify") == "1")
        try:
            query = AuditQuery.parse(request.query_params)
        except BadFilter as e:
            empty = {k: request.query_params.get(k, "")[:MAX_FIELD] for k in FILTER_KEYS}
            return self.site.page(request, "audit.html", session, status=400, title="Audit", error=str(e),
                                  fields=empty, states=STATES, facets=facets, verify=verify, rows=[],
                                  older=None, exports=None, newest=None, verify_link="/audit?verify=1")
        rows = await self.kt.ledger.search_calls(query.where, limit=PAGE_SIZE + 1, before=query.before)
        older = None
        if len(rows) > PAGE_SIZE:
            rows = rows[:PAGE_SIZE]
            older = query.link("/audit", before=f"{rows[-1].created!r}:{rows[-1].id}")
        exports = {fmt: query.link(f"/audit/export.{fmt}") for fmt in ("csv", "jsonl")}
        return self.site.page(request, "audit.html", session, title="Audit", error=None, fields=query.fields,
                              states=STATES, facets=facets, verify=verify, rows=rows, older=older, exports=exports,
                              newest=query.link("/audit") if query.before else None,
                              verify_link=query.link("/audit", verify="1"))

    async def export(self, request: Request, session: Session) -> Response:
        fmt = request.path_params["fmt"]
        if fmt not in ("csv", "jsonl"):
            return harden(Response("unknown export format", status_code=404, media_type="text/plain"))
        try:
            query = AuditQuery.parse(request.query_params)
        except BadFilter as e:
            return harden(Response(str(e), status_code=400, media_type="text/plain"))
        first = await self.kt.ledger.search_calls(query.where, limit=EXPORT_BATCH, before=query.before)

        async def batches() -> AsyncIterator[list[RequestView]]:
            rows, sent = first, 0
            while rows and sent < MAX_EXPORT:
                yield rows
                sent += len(rows)
                if len(rows) < EXPORT_BATCH:
                    return
                rows = await self.kt.ledger.search_calls(query.where, limit=EXPORT_BATCH,
                                                         before=(rows[-1].created, rows[-1].id))

        async def body() -> AsyncIterator[str]:
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            if fmt == "csv":
                writer.writerow(CSV_COLUMNS)
            async for rows in batches():
                for view in rows:
                    if fmt == "csv":
                        writer.writerow(csv_row(view))
                    else:
                        buffer.write(json.dumps(view.model_dump(mode="json"), ensure_ascii=False) + "\n")
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
            if fmt == "csv" and buffer.tell():
                yield buffer.getvalue()

        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        media = "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson; charset=utf-8"
        response = StreamingResponse(body(), media_type=media, headers={
            "Content-Disposition": f'attachment; filename="keyturn-audit-{stamp}.{fmt}"'})
        return harden(response)
