"""The HTTP app: MCP at /mcp, the reviewer API beside it, under one Host/Origin guard.

The MCP SDK's DNS-rebinding protection (Host and Origin checks) is applied to every route, not
only /mcp. Agents authenticate on /mcp with bearer tokens mapped to principals; with no agent
tokens configured, keyturn only listens on loopback and calls the client `local`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
from mcp.server import Server
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.channels.api import api_routes
from server.errors import ConfigError
from server.runtime import Keyturn
from server.serving.mcp import CLIENT_GONE_SCOPE_KEY, PRINCIPAL_SCOPE_KEY

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import uvicorn

LOCAL_PRINCIPAL = "local"
KEEP_ALIVE_S = 5
"""An idle keep-alive connection is closed after this long."""
MAX_HEADER_BYTES = 16 * 1024
"""The request line and headers together (h11's incomplete-event limit): larger is refused with a 400."""
MAX_CONCURRENCY = 1000
"""Open connections plus running requests; past it uvicorn answers 503 at once instead of queueing."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def security_settings(host: str, extra_hosts: tuple[str, ...] = ()) -> TransportSecuritySettings:
    hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    origins = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
    if not is_loopback(host):
        hosts.append(f"{host}:*")
        origins += [f"http://{host}:*", f"https://{host}:*"]
    for extra in extra_hosts:
        hosts += [extra, f"{extra}:*"]
        origins += [f"https://{extra}", f"http://{extra}", f"https://{extra}:*", f"http://{extra}:*"]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


class HostOriginGuard:
    """Applies the SDK's Host/Origin validation to every HTTP request the app serves."""

    def __init__(self, app: ASGIApp, settings: TransportSecuritySettings) -> None:
        self.app = app
        self.checker = TransportSecurityMiddleware(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            rejection = await self.checker.validate_request(Request(scope), is_post=False)
            if rejection is not None:
                await rejection(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AgentAuth:
    """On /mcp: maps the bearer token to a principal (or `local` when no agent tokens are configured), and marks
    when the client's connection for this request closes (`CLIENT_GONE_SCOPE_KEY`): a client that gives up
    without a cancel (its timeout, its exit) only closes its connection, and the SDK's 2025-era streamable HTTP
    keeps serving the request, so keyturn watches the ASGI disconnect itself."""

    def __init__(self, app: ASGIApp, kt: Keyturn, path: str = "/mcp") -> None:
        self.app, self.kt, self.path = app, kt, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.path):
            await self.app(scope, receive, send)
            return
        gone = anyio.Event()
        scope[CLIENT_GONE_SCOPE_KEY] = gone
        receive = _watch_disconnect(receive, gone)

        if self.kt.settings.oauth is not None:
            # The SDK's bearer check on /mcp (static tokens and OAuth access tokens, `server.serving.oauth`) decides;
            # the principal is read from its authenticated user when the call is served.
            await self.app(scope, receive, send)
            return
        if not self.kt.credentials.agents:
            scope[PRINCIPAL_SCOPE_KEY] = (self.kt.settings.stdio.principal or LOCAL_PRINCIPAL,
                                          self.kt.settings.stdio.on_behalf_of)
            await self.app(scope, receive, send)
            return
        header = Request(scope).headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        found = self.kt.credentials.agent(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if found is None:
            response = JSONResponse(
                {"error": "a valid agent bearer token is required"}, status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="keyturn"'})
            await response(scope, receive, send)
            return
        scope[PRINCIPAL_SCOPE_KEY] = found
        await self.app(scope, receive, send)


def _watch_disconnect(receive: Receive, gone: anyio.Event) -> Receive:
    async def watched() -> Message:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
        return message

    return watched


def check_bind(kt: Keyturn, host: str) -> None:
    if not is_loopback(host) and not kt.credentials.agents and kt.settings.oauth is None:
        raise ConfigError(
            f"refusing to listen on {host}: without agent tokens anyone who can reach it could call tools. "
            "Configure `agents:` with tokens, or listen on 127.0.0.1.")


def metrics_route(kt: Keyturn) -> Route:
    """`GET /metrics`: Prometheus's text format; with `metrics.token_env`, only for a scraper with that bearer token."""
    import hmac

    token_env = kt.settings.metrics.token_env
    token = os.environ.get(token_env) if token_env else None
    if token_env and not token:
        raise ConfigError(f"metrics.token_env names {token_env}, which is not set")
    metrics = kt.metrics
    assert metrics is not None

    async def scrape(request: Request) -> Response:
        if token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                return JSONResponse({"error": "a valid metrics bearer token is required"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Bearer realm="keyturn metrics"'})
        from server.metrics import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", scrape, methods=["GET"])


def serve_metrics_apart(kt: Keyturn, sock: Any, log_level: str) -> Callable[[], None]:
    """Serve `/metrics` alone on `sock` (`metrics.listen`: a port of their own), in a thread of its own so that its
    server leaves the process's signals to the main one. Returns the function that stops it."""
    import uvicorn

    app = Starlette(routes=[metrics_route(kt)])
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off", http="h11",
                                           timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=16))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="keyturn-metrics", daemon=True)
    thread.start()

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    return stop


def build_http_app(kt: Keyturn, server: Server[Any], host: str, extra_routes: list[BaseRoute] | None = None) -> ASGIApp:
    check_bind(kt, host)
    settings = security_settings(host, kt.settings.allowed_hosts)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def home(request: Request) -> RedirectResponse:
        return RedirectResponse("/inbox", status_code=303)

    routes: list[Any] = [Route("/healthz", health), Route("/", home), *api_routes(kt), *(extra_routes or [])]
    if kt.metrics is not None and kt.settings.metrics.listen is None:
        if is_loopback(host) or kt.settings.metrics.token_env:
            routes.append(metrics_route(kt))
        else:  # as for a port of their own: off loopback, only a scraper with the token reads them
            log.warning("metrics are not served on %s: off loopback they need metrics.token_env", host)
    oauth: dict[str, Any] = {}
    if kt.settings.oauth is not None:  # agents' OAuth access tokens, checked by the SDK's public auth support
        from server.serving.oauth import KeyturnTokenVerifier, auth_settings

        oauth = {"auth": auth_settings(kt.settings.oauth),
                 "token_verifier": KeyturnTokenVerifier(kt.settings.oauth, kt.credentials.agents)}
    app: Starlette = server.streamable_http_app(
        streamable_http_path="/mcp", transport_security=settings, host=host, custom_starlette_routes=routes, **oauth)
    return HostOriginGuard(AgentAuth(app, kt), settings)


def server_config(app: ASGIApp, host: str, port: int, log_level: str, *, own_log_format: bool = False) -> uvicorn.Config:
    """uvicorn's settings for keyturn: bounded headers, idle connections and concurrency. `own_log_format`: uvicorn's
    lines go through keyturn's handler (`server.logs`, e.g. as JSON) instead of uvicorn's own.

    Bodies are bounded (in size and in time) by whichever endpoint reads them (`server.channels.bodies`).
    """
    import uvicorn

    extra: dict[str, Any] = {"log_config": None} if own_log_format else {}
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", http="h11", **extra,
                          timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_S,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, limit_concurrency=MAX_CONCURRENCY)
