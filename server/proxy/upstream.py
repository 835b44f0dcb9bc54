"""One upstream MCP server: its connection, kept alive, its tools, and the calls keyturn forwards to it.

A stdio upstream that exits is restarted with backoff; an HTTP upstream that stops answering is reconnected.
A call never waits forever: it fails after `call_timeout`, and the upstream is then probed (its tools re-listed)
and restarted if it does not answer. While an upstream is down, calls wait up to `reconnect_wait` for it and
then fail with a `ToolError` that says so: nothing is ever delivered outside the gate.

Every upstream is reached through the MCP SDK's public client (`mcp.Client`): over keyturn's own stdio client
transport (`server.proxy.stdio_client`, which sees every line whole), or the SDK's streamable HTTP transport; both
watched (`server.proxy.transport`), so that an upstream's own error is told from a lost connection, and a malformed
answer fails its call at once and leaves the connection as it was.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Literal

import anyio
import httpx2
import mcp_types as types
from mcp import Client, StdioServerParameters
from mcp.client import Transport
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from server.errors import ConfigError, ToolError
from server.execution import PackContext
from server.gate import ProgressFn
from server.proxy.config import ProxyConfig, UpstreamConfig, substitute_env
from server.proxy.relay import ClientRelay
from server.proxy.sandbox import StderrRelay, UpstreamSandbox, sandbox_env
from server.proxy.stdio_client import MalformedMessage, stdio_lines
from server.proxy.transport import Sent, Watched

log = logging.getLogger(__name__)

State = Literal["starting", "up", "down"]
CLIENT_INFO = types.Implementation(name="keyturn-proxy", version="0.1.0")
_LISTED_PAGES_MAX = 100
# Failures of a first attempt that retrying cannot fix: keyturn refuses to start instead.
_FATAL_AT_START = (FileNotFoundError, PermissionError, NotADirectoryError, ConfigError)
# An HTTP upstream's client as the SDK's transports make their own: 30 s to connect, write or wait for a pooled
# connection, 300 s to read (a server may hold a response stream open), redirects not followed (the SDK's
# transport follows those within the endpoint's origin itself).
HTTP_TIMEOUT = httpx2.Timeout(30.0, read=300.0)


class Upstream:
    """A supervised connection to one upstream server. Run `supervise()` in a task; `call()` from anywhere."""

    def __init__(self, config: UpstreamConfig, proxy: ProxyConfig, environ: Mapping[str, str],
                 on_tools: Callable[[], Awaitable[None]] | None = None, context: PackContext | None = None) -> None:
        self.config = config
        self.name = config.name
        self.settings = proxy
        self.call_timeout = config.call_timeout or proxy.call_timeout
        self.tools: dict[str, types.Tool] = {}  # by the upstream's own names; kept while down
        self.server_name: str | None = None  # as the server names itself in initialize / discover
        self.state: State = "starting"
        self.last_error: str | None = None
        self.restarts = 0
        self.tried = anyio.Event()  # the first attempt to connect has finished, either way
        self.stopped = anyio.Event()  # the supervisor has ended: the connection (and any process) is closed
        self.spawn_error: Exception | None = None  # the first attempt could not even start the command
        self._environ = dict(environ)
        self._context = context if context is not None else PackContext()
        self.sandbox: UpstreamSandbox | None = None  # set by `prepare()` for a sandboxed command
        self._startup_deadline = math.inf  # until it has been up once, an attempt may take until then
        self._on_tools = on_tools
        self._client: Client | None = None
        self._wire: Watched | None = None  # the client's transport, watched: what came back for each call
        self._changed = anyio.Event()  # set (and replaced) on every state change
        self._lost = anyio.Event()
        self._lost_reason = ""
        self._relist = anyio.Event()
        self.relay = ClientRelay(self.name)  # what the upstream asks of its client goes to the agent's

    def __repr__(self) -> str:
        return f"Upstream({self.name!r}, {self.config.transport}, {self.state})"

    # -- calls -------------------------------------------------------------------------------------

    async def call(
        self, tool: str, arguments: dict[str, Any], progress: ProgressFn | None = None
    ) -> types.CallToolResult:
        """Forward one call with exactly `arguments`. A delivery failure raises `ToolError`; the upstream's own
        errors (an `isError` result, or a JSON-RPC error) come back as an error result with its message."""
        client = await self._wait_up()
        if client is None:
            raise ToolError(f"upstream {self.name!r} is not available ({self.last_error or 'still starting'}); "
                            f"{tool} was not delivered")
        relay: ProgressFnT | None = None
        if progress is not None:
            report = progress

            async def relay(progress: float, total: float | None, message: str | None) -> None:
                try:
                    await report(progress, total, message)
                except Exception as e:  # the caller went away: the call goes on, unreported
                    log.debug("upstream %s: progress not forwarded: %s", self.name, e)

        wire = self._wire
        assert wire is not None
        try:
            with anyio.fail_after(self.call_timeout), wire.sending(Sent()) as sent:
                return await client.call_tool(tool, arguments, progress_callback=relay)
        except TimeoutError:
            self._relist.set()  # hung, or just slow? A probe that gets no answer restarts it.
            raise ToolError(f"upstream {self.name!r} did not answer {tool} within {self.call_timeout:g}s; "
                            "it may or may not have acted") from None
        except MCPError as e:
            if sent.malformed is not None:
                raise ToolError(f"upstream {self.name!r} sent a malformed answer to {tool} ({sent.malformed}); "
                                "it may or may not have acted") from None
            # The SDK's client raises its "connection closed" with the code a server's own error may carry too
            # (-32000, JSON-RPC's generic server error): only an error that arrived with this call's id is an answer.
            if e.code == types.CONNECTION_CLOSED and not sent.answered_with_error:
                self.lose(f"the connection closed during {tool}")
                raise ToolError(f"upstream {self.name!r} went away during {tool} (it crashed or disconnected); "
                                "it may or may not have acted") from e
            self._relist.set()  # a stale HTTP session answers errors too: a probe reconnects if so
            text = f"{e.message} (upstream {self.name!r}, error {e.code})"
            return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream) as e:
            self.lose(f"the connection broke during {tool}")
            raise ToolError(f"upstream {self.name!r} is not connected; {tool} was not delivered") from e
        except Exception as e:
            raise ToolError(f"upstream {self.name!r}: {tool} failed: {type(e).__name__}: {e}") from e

    async def connected(self, what: str) -> Client:
        """The live client (waiting up to `reconnect_wait` for it); `ToolError` naming `what` when it is down."""
        client = await self._wait_up()
        if client is None:
            raise ToolError(f"upstream {self.name!r} is not available ({self.last_error or 'still starting'}); "
                            f"{what} was not delivered")
        return client

    def capabilities(self) -> types.ServerCapabilities | None:
        """What the upstream declared, while it is up."""
        client = self._client
        return client.server_capabilities if client is not None and self._up() else None

    def lose(self, reason: str) -> None:
        """Drop the connection (the supervisor then restarts or reconnects it)."""
        if not self._lost.is_set():
            self._lost_reason = reason
            self._lost.set()

    async def _wait_up(self) -> Client | None:
        if not self._up():
            with anyio.move_on_after(self.settings.reconnect_wait):
                while not self._up():
                    await self._changed.wait()
        return self._client if self._up() else None

    def _up(self) -> bool:
        # A lost connection is one the supervisor is about to drop (its read stream has ended): not up.
        return self._client is not None and not self._lost.is_set()

    async def wait_started(self) -> None:
        """Until the upstream is up, or its command cannot be started at all."""
        while self.state != "up" and self.spawn_error is None:
            await self._changed.wait()

    def environment(self) -> dict[str, str]:
        """What the command receives: with `inherit_env` keyturn's environment, less every `KEYTURN_*` variable and
        every variable that holds one of keyturn's secrets; then `env` (whose `${VAR}` may not name those)."""
        c = self.config
        where = f"upstream {c.name!r}"
        passable = {k: v for k, v in self._environ.items()
                    if not k.upper().startswith("KEYTURN_") and k not in self._context.secret_env}
        for name in c.env:
            if name.upper().startswith("KEYTURN_") or name in self._context.secret_env:
                raise ConfigError(f"{where}, env {name}: holds keyturn's own secrets and may not reach an upstream")
        env = dict(passable) if c.inherit_env else {}
        env.update({k: substitute_env(v, passable, f"{where}, env {k}") for k, v in c.env.items()})
        return sandbox_env(env, c.env) if c.sandboxed else env

    def prepare(self) -> UpstreamSandbox | None:
        """Work out the sandbox of a command upstream (its mounts and runtime); `ConfigError` or `FileNotFoundError`
        for what cannot work. Unsandboxed (`sandbox: off`, or a url): None."""
        if self.config.sandboxed and self.sandbox is None:
            self.sandbox = UpstreamSandbox.plan(self.config, bwrap=self.settings.bwrap, env=self.environment(),
                                                hidden=self._context.existing_state)
        return self.sandbox

    def _set_state(self, state: State, error: str | None = None) -> None:
        self.state, self.last_error = state, error
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    # -- the supervisor ----------------------------------------------------------------------------

    async def supervise(self) -> None:
        """Connect, serve until the connection is lost, back off, reconnect: for as long as keyturn runs."""
        try:
            await self._supervise()
        finally:
            self.stopped.set()

    async def _supervise(self) -> None:
        delay = self.settings.restart_backoff
        self._startup_deadline = anyio.current_time() + self.settings.startup_wait
        while True:
            started = time.monotonic()
            try:
                await self._connection()
                reason = self._lost_reason or "the connection ended"
            except Exception as e:  # a broken upstream never takes keyturn down
                e = _unwrap(e)
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if isinstance(e, _FATAL_AT_START) and not self.tried.is_set():
                    self.spawn_error = e
            self._client = None
            self._set_state("down", reason)
            self.tried.set()
            if time.monotonic() - started > self.settings.restart_backoff_max:
                delay = self.settings.restart_backoff  # it ran fine for a while: not a crash loop
            log.warning("upstream %s is down (%s); %s in %.1fs", self.name, reason,
                        "restarting" if self.config.command else "reconnecting", delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, self.settings.restart_backoff_max)
            self.restarts += 1

    async def _connection(self) -> None:
        self._lost, self._lost_reason, self._relist = anyio.Event(), "", anyio.Event()
        # While starting, an attempt may take until startup_wait ends: a slow server is not killed at connect_timeout.
        timeout = max(self.settings.connect_timeout, self._startup_deadline - anyio.current_time())
        relay: StderrRelay | None = None
        with anyio.CancelScope(deadline=anyio.current_time() + timeout) as connecting:
            try:
                async with AsyncExitStack() as stack:
                    if self.config.command is not None and self.prepare() is not None:
                        relay = await stack.enter_async_context(StderrRelay())
                    await self._serve(stack, connecting, relay)
            except Exception:
                # bubblewrap could not start the command (it is not there in the sandbox, a mount failed): say so.
                if relay is not None and (failure := relay.failure()) is not None:
                    raise failure from None
                raise
        if connecting.cancelled_caught:
            raise TimeoutError(f"no answer within {timeout:g}s")

    async def _serve(self, stack: AsyncExitStack, connecting: anyio.CancelScope, relay: StderrRelay | None) -> None:
        transport = await self._transport(stack, relay)
        wire = Watched(transport, self.lose, self.name)
        client = Client(wire, cache=None, client_info=CLIENT_INFO, message_handler=self._on_message,
                        **self.relay.callbacks())
        await stack.enter_async_context(client)
        tools = await self._list_tools(client)
        connecting.deadline = math.inf
        info = client.server_info
        self.server_name = info.name if info is not None else None
        self._client, self._wire = client, wire
        self._startup_deadline = -math.inf  # it has been up: a restart gets connect_timeout
        self._set_state("up")
        self.tried.set()
        log.info("upstream %s is up (%s, %d tools)", self.name, self.server_name, len(tools))
        await self._update_tools(tools)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._relister, client)
            if self.settings.health_interval:
                tg.start_soon(self._health, self.settings.health_interval)
            caps = client.server_capabilities
            if client.protocol_version in MODERN_PROTOCOL_VERSIONS and caps.tools and caps.tools.list_changed:
                tg.start_soon(self._listen, client)
            if client.protocol_version in MODERN_PROTOCOL_VERSIONS and (caps.resources or caps.prompts):
                tg.start_soon(self.relay.follow, client)
            await self._lost.wait()
            self._client = None
            tg.cancel_scope.cancel()

    async def _transport(self, stack: AsyncExitStack, relay: StderrRelay | None) -> Transport:
        c = self.config
        if c.command is not None:
            env = self.environment()
            if self.sandbox is not None and relay is not None:
                argv = self.sandbox.argv()  # keyturn's state as it is now: masked
                params = StdioServerParameters(command=argv[0], args=argv[1:], env=env)
                return stdio_lines(params, relay.errlog)
            log.warning("upstream %s runs without a sandbox (sandbox: off): it acts on the agent's arguments with "
                        "keyturn's own reach (its files, processes and network)", self.name)
            params = StdioServerParameters(command=c.command, args=list(c.args), env=env, cwd=c.cwd)
            return stdio_lines(params, sys.stderr)
        assert c.url is not None
        where = f"upstream {c.name!r}"
        headers = {k: substitute_env(v, self._environ, f"{where}, header {k}") for k, v in c.headers.items()}
        http = await stack.enter_async_context(httpx2.AsyncClient(headers=headers, timeout=HTTP_TIMEOUT))
        return streamable_http_client(c.url, http_client=http)

    async def _list_tools(self, client: Client) -> dict[str, types.Tool]:
        async def page(cursor: str | None) -> tuple[list[types.Tool], str | None]:
            listed = await client.list_tools(cursor=cursor)
            return listed.tools, listed.next_cursor

        return {t.name: t for t in await all_pages(page)}

    async def _update_tools(self, tools: dict[str, types.Tool]) -> None:
        if _dump(tools) == _dump(self.tools):
            return
        self.tools = tools
        if self._on_tools is not None:
            await self._on_tools()

    async def _relister(self, client: Client) -> None:
        """Re-list on `tools/list_changed`, on a health tick, or after a call timed out; no answer drops it."""
        while True:
            await self._relist.wait()
            self._relist = anyio.Event()
            try:
                with anyio.fail_after(self.settings.connect_timeout):
                    tools = await self._list_tools(client)
            except Exception as e:
                self.lose(f"it did not answer tools/list ({type(e).__name__}: {e})")
                return
            await self._update_tools(tools)

    async def _health(self, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            self._relist.set()

    async def _listen(self, client: Client) -> None:
        """2026-era servers announce tool changes only on a `subscriptions/listen` stream."""
        try:
            async with client.listen(tools_list_changed=True) as subscription:
                async for _ in subscription:
                    self._relist.set()
        except Exception as e:
            log.info("upstream %s: not following tool changes: %s", self.name, e)

    async def _on_message(self, message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            self._relist.set()
        elif isinstance(message, MalformedMessage):
            pass  # logged, and failed its call if it named one, by the watched transport
        elif isinstance(message, Exception):
            log.warning("upstream %s: transport error: %s", self.name, message)
        else:
            await self.relay.notice(message)


async def all_pages(page: Callable[[str | None], Awaitable[tuple[list[Any], str | None]]]) -> list[Any]:
    """Every item of a paginated list (`page(cursor)` gives one page's items and the next cursor), up to
    `_LISTED_PAGES_MAX` pages: an upstream whose cursors never end cannot keep keyturn listing."""
    items: list[Any] = []
    cursor: str | None = None
    for _ in range(_LISTED_PAGES_MAX):
        found, cursor = await page(cursor)
        items += found
        if not cursor:
            break
    return items


def _unwrap(e: Exception) -> Exception:
    while isinstance(e, ExceptionGroup) and len(e.exceptions) == 1 and isinstance(e.exceptions[0], Exception):
        e = e.exceptions[0]
    return e


def _dump(tools: dict[str, types.Tool]) -> list[dict[str, Any]]:
    return [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools.values()]


@asynccontextmanager
async def supervised(upstreams: list[Upstream], startup_wait: float) -> AsyncIterator[None]:
    """Run every upstream's supervisor; wait up to `startup_wait` for each one to be up (across its retries).

    An upstream whose command cannot be started at all is a configuration error; any other failure is
    retried in the background while keyturn serves (and its tools' calls say that it is starting or down).
    """
    async with anyio.create_task_group() as tg:
        for upstream in upstreams:
            tg.start_soon(upstream.supervise)
        with anyio.move_on_after(startup_wait):
            for upstream in upstreams:
                await upstream.wait_started()
        try:
            for upstream in upstreams:
                if upstream.spawn_error is not None:
                    raise ConfigError(f"upstream {upstream.name!r} cannot start: {upstream.last_error}")
                if upstream.state != "up":
                    log.warning("upstream %s is not up yet (%s); serving without its tools until it is",
                                upstream.name, upstream.last_error or "still starting")
            yield
        finally:
            tg.cancel_scope.cancel()
