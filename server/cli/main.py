"""`keyturn ...`: the command line. The only place that reads environment variables.

serve            run the MCP server (stdio, or --http HOST:PORT with the reviewer API)
proxy            guard an existing MCP server: keyturn proxy [--http HOST:PORT] -- COMMAND ARGS...
pending / show / approve / deny    reviewer commands, through the HTTP reviewer API
grants / revoke                   standing grants: list them, end one
audit tail / follow / show / verify / key / checkpoint / export   auditor commands (server/cli/audit.py)
policy check / explain / test / replay   policy author commands
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from server.errors import KeyturnError

if TYPE_CHECKING:
    from server.config import Settings
    from server.proxy import Proxy
    from server.runtime import Keyturn

DEFAULT_HTTP = "127.0.0.1:8765"
log = logging.getLogger("keyturn")


def _settings(args: argparse.Namespace) -> Settings:
    from server.config import load_settings  # (not for the reviewer commands: they start in a fraction of a second)

    config = args.config or os.environ.get("KEYTURN_CONFIG")
    return load_settings(
        Path(config) if config else None,
        db=getattr(args, "db", None) or os.environ.get("KEYTURN_DB"),
        policy=getattr(args, "policy", None),
    )


def _host_port(value: str, what: str = "--http") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise KeyturnError(f"{what} expects HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _reviewer_options(base: str, db: Path | None) -> str:
    """What the reviewer commands need to reach this server: `--url` unless it is the default, `--db` when they
    must find the local reviewer token beside a ledger other than ./keyturn.db."""
    options = "" if base == f"http://{DEFAULT_HTTP}" else f" --url {base}"
    if db is not None and db.resolve() != Path("keyturn.db").resolve():
        options += f" --db {db.resolve()}"
    return options


def _listen(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, bound now (as uvicorn would bind it): `KeyturnError` when it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise KeyturnError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = (" (another keyturn, or another program, is serving there: stop it, or choose another port with "
                "--http HOST:PORT)" if e.errno == errno.EADDRINUSE else "")
        raise KeyturnError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    sock.set_inheritable(True)
    return sock


# -- serve -----------------------------------------------------------------------------------------

Attach = Callable[["Keyturn"], AbstractAsyncContextManager[object]]


def _metrics_socket(settings: Settings) -> socket.socket | None:
    """`metrics.listen`'s socket, bound now; None when metrics are off or on the HTTP server's own port."""
    m = settings.metrics
    if not m.enabled or m.listen is None:
        return None
    from server.serving.http import is_loopback

    host, port = _host_port(m.listen, "metrics.listen")
    if not is_loopback(host) and not m.token_env:
        raise KeyturnError(f"refusing to serve metrics on {host}: off loopback, set metrics.token_env so that only "
                           "your scraper reads them")
    return _listen(host, port)


@asynccontextmanager
async def _metrics_apart(kt: Keyturn, sock: socket.socket | None, log_level: str) -> AsyncIterator[None]:
    if sock is None or kt.metrics is None:
        yield
        return
    from server.serving.http import serve_metrics_apart

    stop = serve_metrics_apart(kt, sock, log_level)
    try:
        yield
    finally:
        await anyio.to_thread.run_sync(stop)


async def _serve(args: argparse.Namespace, settings: Settings | None = None, attach: Attach | None = None) -> int:
    """Serve MCP (stdio or HTTP); `attach` adds to the running Keyturn (proxy mode: the upstreams' tools)."""
    from server.runtime import running
    from server.secret_files import reviewer_token_path
    from server.serving.mcp import build_mcp_server
    from server.serving.stdio import stdio_transport

    def attached(kt: Keyturn) -> AbstractAsyncContextManager[object]:
        return attach(kt) if attach is not None else nullcontext()

    settings = settings or _settings(args)
    metrics_socket = _metrics_socket(settings)  # (bound before anything starts: a busy port is a user error)
    if args.http:
        import uvicorn

        from server.channels import build_channels
        from server.serving.http import build_http_app, check_bind, server_config

        host, port = _host_port(args.http)
        base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        listening = _listen(host, port)  # before anything starts or is recorded: a busy port is a user error
        async with running(settings, http_base_urls=[base]) as kt, attached(kt), \
                _metrics_apart(kt, metrics_socket, args.log_level.lower()):
            check_bind(kt, host)
            server = build_mcp_server(kt, traces=kt.settings.telemetry.traces_exported(os.environ))
            extra_routes = await build_channels(kt, dict(os.environ))
            app = build_http_app(kt, server, host, extra_routes)
            config = server_config(app, host, port, args.log_level.lower(),
                                   own_log_format=getattr(args, "log_format", "text") == "json")
            where = _reviewer_options(base, kt.settings.db if kt.local_token else None)
            ledger = kt.settings.ledger_name if kt.settings.database_url else kt.settings.db.resolve()
            token_note = (f"the reviewer token is in {reviewer_token_path(kt.settings.db)}" if kt.local_token
                          else "reviewers use their configured tokens (KEYTURN_TOKEN)")
            if getattr(args, "log_format", "text") == "json":  # a pipeline reads stderr: the banner is a line too
                print(json.dumps({
                    "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "level": "info", "logger": "keyturn",
                    "message": "keyturn is running", "call_id": None,
                    "mcp_endpoint": f"{base}/mcp", "reviewer_api": f"{base}/api/requests", "inbox": f"{base}/inbox",
                    "ledger": str(ledger), "policy": str(kt.settings.policy_path()),
                    "tools": [t.name for t in kt.tools()]}), file=sys.stderr, flush=True)
            else:
                print(
                    f"keyturn is running.\n"
                    f"  MCP endpoint (streamable HTTP): {base}/mcp\n"
                    f"  reviewer API:                   {base}/api/requests\n"
                    f"  reviewer inbox and audit (web): {base}/inbox   {base}/audit\n"
                    f"  ledger: {ledger}   policy: {kt.settings.policy_path()}\n"
                    f"  tools: {', '.join(t.name for t in kt.tools())}\n"
                    f"Review held calls from another terminal:\n"
                    f"  keyturn pending{where}\n  keyturn approve REQUEST_ID{where} --reason '...'   "
                    f"(or: keyturn deny REQUEST_ID{where} --reason '...')\n"
                    f"  ({token_note})",
                    file=sys.stderr, flush=True,
                )
            # uvicorn re-raises the signal that stopped it once it has served; by then that signal must not end the
            # process: keyturn's own shutdown (the last checkpoint, the instance row) runs after this line.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: None)
            await uvicorn.Server(config).serve(sockets=[listening])
        return 0

    from mcp.server.lowlevel import NotificationOptions

    from server.channels import build_channels

    async with running(settings) as kt, attached(kt), _metrics_apart(kt, metrics_socket, args.log_level.lower()):
        server = build_mcp_server(kt, traces=kt.settings.telemetry.traces_exported(os.environ))
        # Chat channels announce the calls this process holds; their clicks arrive at whichever
        # process serves HTTP (or Socket Mode), and reach this one through the shared database.
        await build_channels(kt, dict(os.environ))
        if getattr(args, "log_format", "text") == "json":
            print(json.dumps({"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "level": "info",
                              "logger": "keyturn", "message": "keyturn (stdio) is running", "call_id": None,
                              "ledger": kt.settings.ledger_name, "tools": [t.name for t in kt.tools()]}),
                  file=sys.stderr, flush=True)
        else:
            print(f"keyturn (stdio) serving {len(kt.tools())} guarded tools; ledger {kt.settings.ledger_name}",
                  file=sys.stderr, flush=True)
        proxied = attach is not None  # (an upstream's tool, prompt and resource lists may change)
        options = server.create_initialization_options(
            NotificationOptions(tools_changed=proxied, prompts_changed=proxied, resources_changed=proxied))
        async with stdio_transport() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, options)
    return 0


async def _proxy(args: argparse.Namespace) -> int:
    from server.proxy import parse_header, parse_proxy_config, running_proxy
    from server.proxy.config import default_name

    settings = _settings(args)
    if "tools" not in settings.model_fields_set:
        settings = settings.model_copy(update={"tools": ()})  # only the upstreams' tools, unless configured
    if settings.policy is None:  # the shipped default is written for keyturn's own packs; upstreams get theirs
        from server.config import proxy_policy_path

        settings = settings.model_copy(update={"policy": proxy_policy_path()})
    command = list(args.upstream_command)
    if command[:1] == ["--"]:
        command = command[1:]
    if command and args.upstream_url:
        raise KeyturnError("give the upstream as a command after -- or as --upstream-url, not both")
    if args.header and not args.upstream_url:
        raise KeyturnError("--header applies to --upstream-url")
    sandboxing = bool(args.mount or args.mount_rw or args.network or args.no_sandbox)
    if sandboxing and not command:
        raise KeyturnError("--mount, --mount-rw, --network and --no-sandbox apply to a command after --")
    name = args.name or default_name(command[0], command[1:]) if command else (
        args.name or default_name(url=args.upstream_url) if args.upstream_url else None)
    upstream: dict[str, Any] = {"name": name}
    if args.prefix is not None:
        upstream["prefix"] = args.prefix
    if command:
        # The command inherits keyturn's environment (less keyturn's secrets), as it would without keyturn in front,
        # and runs in a sandbox that shows it the directories its arguments name (read-only) and the mounts given.
        upstream.update(command=command[0], args=command[1:], inherit_env=True, network=args.network,
                        mounts=[{"path": p} for p in args.mount] + [{"path": p, "writable": True} for p in args.mount_rw])
        if args.no_sandbox:
            upstream["sandbox"] = "off"
    elif args.upstream_url:
        upstream.update(url=args.upstream_url, headers=dict(parse_header(h) for h in args.header))
    elif args.prefix is not None or args.name is not None:
        raise KeyturnError("--name and --prefix apply to an upstream given on the command line")
    config = parse_proxy_config(settings.proxy, [upstream] if "command" in upstream or "url" in upstream else [],
                                call_timeout=args.call_timeout)
    environ = dict(os.environ)
    proxies: list[Proxy] = []

    @asynccontextmanager
    async def attach(kt: Keyturn) -> AsyncIterator[object]:
        async with running_proxy(kt, config, environ) as proxy:
            proxies.append(proxy)
            yield proxy

    async def serve() -> int:
        return await _serve(args, settings, attach)

    async def stopped() -> None:
        for proxy in proxies:
            await proxy.wait_stopped()

    # Over HTTP, uvicorn ends cleanly on SIGTERM; over stdio, a desktop app closing us must stop the upstreams too.
    return await (serve() if args.http else _until_terminated(serve, stopped))


async def _until_terminated(fn: Callable[[], Awaitable[int]], stopped: Callable[[], Awaitable[None]]) -> int:
    """Run `fn`; on SIGTERM or SIGHUP cancel it, so every context closes and child processes are stopped."""
    result = 0
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                async for _ in signals:
                    break
            tg.cancel_scope.cancel()
            # The MCP SDK reads stdin in a worker thread that no cancellation interrupts: once the upstreams
            # are stopped (and the ledger, committed per event, needs nothing more), leave without waiting on it.
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await stopped()
            os._exit(0)

        tg.start_soon(watch)
        result = await fn()
        tg.cancel_scope.cancel()
    return result


# -- reviewer commands (HTTP API) ------------------------------------------------------------------

def _api(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    url = (args.url or os.environ.get("KEYTURN_URL") or f"http://{DEFAULT_HTTP}").rstrip("/")
    token = args.token or os.environ.get("KEYTURN_TOKEN")
    source = "--token" if args.token else "KEYTURN_TOKEN"
    if not token:
        from server.secret_files import reviewer_token_path

        named = args.db or os.environ.get("KEYTURN_DB") or "keyturn.db"
        # (a PostgreSQL ledger keeps its files in ./keyturn.db.*; the reviewer commands load no config module)
        db = Path("keyturn.db" if named.startswith(("postgresql://", "postgres://")) else named)
        token_file = reviewer_token_path(db)
        source = f"the token file {token_file}"
        if token_file.exists():
            token = token_file.read_text(encoding="utf-8").strip()
        else:
            raise KeyturnError(f"no reviewer token: set KEYTURN_TOKEN, pass --token, or pass --db with the ledger of "
                               f"the server you review (its token file is beside it; {token_file} does not exist)")
    if not token:
        raise KeyturnError(f"no reviewer token: {source} is empty")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("error", e.reason)
        except (json.JSONDecodeError, AttributeError):
            detail = e.reason
        hint = ""
        if e.code == 401:
            hint = f"; the token came from {source}"
            if source.startswith("the token file"):
                hint += " (a server with another ledger: pass --db with that ledger, or --token)"
        raise KeyturnError(f"{detail} (HTTP {e.code}){hint}") from e
    except urllib.error.URLError as e:
        raise KeyturnError(f"cannot reach the reviewer API at {url}: {e.reason}") from e


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _print_request(r: dict[str, Any]) -> None:
    print(f"{r['id']}  {r.get('status') or r['state']:<9} {r['risk'] or '-':<8} {r['tool']}  by {r['principal']}"
          + (f" for {r['on_behalf_of']}" if r.get("on_behalf_of") else "")
          + (f"  expires {_when(r['expires'])}" if r.get("expires") else ""))
    print(f"    why: {r['reason']}")
    if r.get("impact"):
        print(f"    would touch: {r['impact']}")
    print(f"    arguments: {json.dumps(r['arguments'], ensure_ascii=False)[:500]}")
    if r.get("needs") and r.get("review"):
        print(f"    needs: {r['needs']['text']} ({r['needs']['progress']})")
    for v in r.get("votes", []):
        print(f"    vote: {v['verdict']} by {v['person']} ({v['reviewer']}) {v['reason'] or ''}")


def cmd_pending(args: argparse.Namespace) -> int:
    data = _api(args, "GET", "/api/requests?state=pending,approved")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if not data["requests"]:
        print("no pending requests")
    for r in data["requests"]:
        _print_request(r)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    data = _api(args, "GET", f"/api/requests/{urllib.parse.quote(args.id)}")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    _print_request(data["request"])
    grant = data.get("grant") or {}
    if grant.get("allowed"):
        print(f"    grant: may be made (--for, --uses); keyturn proposes: {grant['proposed']}")
    elif data["request"]["state"] == "pending" and grant.get("why_not"):
        print(f"    grant: not offered: {grant['why_not']}")
    for e in data["events"]:
        print(f"    #{e['seq']} {_when(e['ts'])} {e['kind']}")
    return 0


def cmd_vote(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"reason": args.reason}
    grant = {k: v for k, v in (("for", getattr(args, "grant_for", None)), ("uses", getattr(args, "uses", None)),
                               ("when", getattr(args, "when", None))) if v is not None}
    if grant:
        if "for" not in grant or "uses" not in grant:
            raise KeyturnError("a standing grant needs both --for (e.g. 1h) and --uses (e.g. 5)")
        body["grant"] = grant
    if getattr(args, "args", None) is not None:
        try:
            body["arguments"] = json.loads(args.args)
        except json.JSONDecodeError as e:
            raise KeyturnError(f"--args must be the call's arguments as a JSON object: {e}") from e
        if not isinstance(body["arguments"], dict):
            raise KeyturnError("--args must be the call's arguments as a JSON object")
    data = _api(args, "POST", f"/api/requests/{urllib.parse.quote(args.id)}/{args.verdict}", body)
    print(f"{data['request_id']}: {data['message']} (state: {data['state']})")
    return 0


# -- auditor commands (ledger file) ----------------------------------------------------------------

async def _with_ledger(args: argparse.Namespace, fn: Any) -> int:
    from server.ledger.opening import open_existing

    ledger = await open_existing(_settings(args))
    try:
        result: int = await fn(ledger)
        return result
    finally:
        await ledger.close()


def impact_line(impact: dict[str, Any]) -> str:
    """A run's impact as the ledger keeps it: the rows estimated before the decision beside the rows really changed."""
    est, actual = impact.get("estimated_rows"), impact.get("actual_rows")
    table = f" in {impact['table']}" if impact.get("table") else ""
    text = (f"estimated {est if est is not None else 'unknown'} rows{table}, "
            f"actually {actual if actual is not None else 'not reported'}")
    return text + (" (DIFFERS from the estimate)" if impact.get("differs") else "")


def _event_line(e: Any) -> str:
    p = e.payload
    detail = ""
    if e.kind == "call.received":
        detail = f"{p.get('tool')} by {p.get('principal')}"
    elif e.kind == "decision":
        rules = [r["id"] for r in p.get("rules", [])]
        detail = f"{p.get('outcome')} ({p.get('risk')}) rules={rules} policy={str(p.get('policy_digest'))[:12]}"
    elif e.kind in ("vote", "vote.refused"):
        who = p.get("person") or p.get("reviewer")
        detail = f"{p.get('verdict')} by {who} via {p.get('channel')}: {p.get('reason') or p.get('message') or ''}"
        if p.get("changed_from"):
            detail += f" (changed from {p['changed_from']})"
    elif e.kind in ("executed", "failed"):
        if p.get("result_digest"):
            what = "error result" if p.get("is_error") else "result"
            detail = f"{what} sha256 {p['result_digest']}"
        else:
            detail = f"no result: {p.get('error') or 'none recorded'}"
        if p.get("note"):
            detail += f" ({p['note']})"
        if isinstance(p.get("impact"), dict):
            detail += f"; {impact_line(p['impact'])}"
    elif e.kind == "policy.rejected":
        detail = f"not applied, the last good policy stays: {p.get('error', '')}"
    elif e.kind == "policy.loaded":
        detail = f"{p.get('rules')} rules, digest {str(p.get('digest'))[:12]}"
    elif e.kind == "client.left":
        detail = str(p.get("reason", ""))
    elif e.kind in ("denied", "expired", "cancelled", "abandoned"):
        by = p.get("by") or p.get("person")
        detail = (f"by {by}: " if by else "") + str(p.get("reason") or "")
        if p.get("code"):
            detail += f" [{p['code']}]"
    elif e.kind == "arguments.edited":
        detail = (f"by {p.get('person')}: {p.get('reason') or ''} args_hash {str(p.get('from_args_hash'))[:12]} -> "
                  f"{str(p.get('args_hash'))[:12]}")
    elif e.kind == "approval.granted":
        detail = f"approvers={p.get('approvers')} args_hash={str(p.get('args_hash'))[:12]}"
    elif e.kind == "grant.created":
        detail = (f"{p.get('tool')} for {p.get('principal')} by {p.get('approvers')} from request {p.get('request_id')}"
                  f": {p.get('uses')} use(s) until {_when(p.get('expires'))} when {' && '.join(p.get('conditions') or [])}")
    elif e.kind == "grant.used":
        detail = f"use {p.get('use')} of {p.get('uses')} by call {p.get('call_id')} ({p.get('tool')})"
    elif e.kind == "grant.revoked":
        detail = f"by {p.get('person')} via {p.get('channel')}: {p.get('reason') or ''}"
    elif e.kind == "grant.expired":
        detail = f"{p.get('reason')} ({p.get('used')} used)"
    elif e.kind == "execution.started" and isinstance(p.get("grant"), dict):
        g = p["grant"]
        detail = f"under grant {g.get('id')} (use {g.get('use')} of {g.get('uses')}, request {g.get('request_id')})"
    return f"#{e.seq:<6} {_when(e.ts)} {e.kind:<18} {e.call_id or '-':<32} {detail}"


def cmd_grants(args: argparse.Namespace) -> int:
    data = _api(args, "GET", "/api/grants" + ("?all=1" if args.all else ""))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if not data["grants"]:
        print("no live grants" if not args.all else "no grants")
    for g in data["grants"]:
        print(f"{g['id']}  {g['state']:<8} {g['tool']}  for {g['principal']}"
              + (f" on behalf of {g['on_behalf_of']}" if g.get("on_behalf_of") else "")
              + f"  {g['used']}/{g['uses']} used  until {_when(g['expires'])}")
        print(f"    when: {g['when']}")
        print(f"    approved by {', '.join(g['approvers'] or [])} on request {g['request_id']}: {g['reason'] or ''}")
        if g.get("ended"):
            print(f"    ended {_when(g['ended'])}: {g['end_reason']}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    data = _api(args, "POST", f"/api/grants/{urllib.parse.quote(args.id)}/revoke", {"reason": args.reason})
    print(f"{data['grant']}: {data['message']}")
    return 0


def cmd_audit_tail(args: argparse.Namespace) -> int:
    async def run(ledger: Any) -> int:
        for e in await ledger.tail(args.n):
            print(json.dumps(e.model_dump(mode="json")) if args.json else _event_line(e))
        return 0

    return anyio.run(_with_ledger, args, run)


def cmd_audit_follow(args: argparse.Namespace) -> int:
    """Events as they are appended, one per line, until interrupted: `--from SEQ` resumes from a sequence number."""
    from server.streaming import event_json, follow_events

    async def run(ledger: Any) -> int:
        poll = _settings(args).poll_interval_s
        stopped_by: list[int] = []
        async with anyio.create_task_group() as tg:
            async def until_signal() -> None:
                # Its own signal handling, not the event loop's default (which cancels the main task once: a ^C that
                # lands while a ledger read runs in a worker thread could be absorbed, and follow would never end).
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        stopped_by.append(int(signum))
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(until_signal)
            async for events in follow_events(ledger, from_seq=args.from_seq, poll_s=poll):
                for e in events:
                    print(event_json(e) if args.format == "jsonl" else _event_line(e), flush=True)
        return 128 + stopped_by[0] if stopped_by else 0  # 130 for ^C, as a shell reports it

    if args.from_seq is not None and args.from_seq < 1:
        raise KeyturnError("--from takes a sequence number, 1 or more")
    return anyio.run(_with_ledger, args, run)


def _show_grant(row: dict[str, Any], events: list[Any], *, as_json: bool) -> int:
    from server.approvals.grants import grant_json

    shown = grant_json(row)
    if as_json:
        print(json.dumps({"grant": shown, "events": [e.model_dump(mode="json") for e in events]}, indent=2))
        return 0
    print(f"grant {shown['id']}: {shown['tool']} for {shown['principal']}"
          + (f" on behalf of {shown['on_behalf_of']}" if shown["on_behalf_of"] else "")
          + f", made by {', '.join(shown['approvers'] or [])} approving request {shown['request_id']}")
    print(f"  when: {shown['when']}")
    print(f"  rules: {', '.join(shown['rules'] or [])}; {shown['used']} of {shown['uses']} uses; until "
          f"{_when(shown['expires'])}")
    print(f"  state: {shown['state']}" + (f" ({shown['end_reason']})" if shown["end_reason"] else ""))
    for e in events:
        print("  " + _event_line(e) + f"  hash {e.hash[:16]}")
    return 0


def cmd_audit_show(args: argparse.Namespace) -> int:
    from server.models import state_label
    from server.records import UNCLASSIFIED

    async def run(ledger: Any) -> int:
        view = await ledger.get_call(args.id)
        if view is None and (grant := await ledger.grant(args.id)) is not None:
            return _show_grant(grant, await ledger.events(args.id), as_json=args.json)
        if view is None:
            raise KeyturnError(f"no request or grant {args.id} in the ledger")
        events = await ledger.events(args.id)
        if args.json:
            print(json.dumps({"request": view.model_dump(mode="json"),
                              "events": [e.model_dump(mode="json") for e in events]}, indent=2))
            return 0
        print(f"request {view.id}: {view.tool} asked by {view.principal}"
              + (f" on behalf of {view.on_behalf_of}" if view.on_behalf_of else "")
              + (f" (model {view.model})" if view.model else ""))
        if view.arguments == UNCLASSIFIED:
            print("  arguments: not kept (they could not be judged; only a valid call's arguments are recorded)")
        else:
            print(f"  arguments (redacted): {json.dumps(view.arguments, ensure_ascii=False)}")
        print(f"  arguments sha256: {view.args_hash or '(none: the arguments were not valid for the tool)'}")
        for e in events:
            if e.kind == "arguments.edited":
                print(f"  edited by {e.payload.get('person')} ({e.payload.get('reason')}): the arguments above are the "
                      f"edited ones, sha256 {e.payload.get('args_hash')}; the agent sent the sha256 above")
        if view.policy_digest is None:  # denied by keyturn before any policy was asked
            print(f"  decision: none: denied by keyturn before the policy was asked "
                  f"({view.outcome_reason or view.reason})")
        else:
            print(f"  decision: risk {view.risk}; {view.reason}; policy {view.policy_digest}")
        for r in view.rules:
            print(f"    rule {r['id']}: {r['outcome']} ({r['risk']}) {r['reason']}")
        if view.review is not None and view.review.impact:
            print(f"  would touch (measured before the decision): {view.review.impact}")
        for e in events:
            if e.kind in ("executed", "failed") and isinstance(e.payload.get("impact"), dict):
                print(f"  impact: {impact_line(e.payload['impact'])}")
        for v in view.votes:
            print(f"  {v['verdict']} by {v['person']} ({v['reviewer']}) at {_when(v['ts'])}: {v['reason'] or '-'}")
        print(f"  outcome: {state_label(view.state)}" + (f": {view.outcome_reason}" if view.outcome_reason else ""))
        for e in events:
            print("  " + _event_line(e) + f"  hash {e.hash[:16]}")
        return 0

    return anyio.run(_with_ledger, args, run)



# -- argument parsing ------------------------------------------------------------------------------

def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("keyturn")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyturn", description="A human's key in the lock between AI agents and privileged operations.")
    parser.add_argument("--version", action="version", version=f"keyturn {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="config file (YAML); default $KEYTURN_CONFIG")
    common.add_argument("--db", help="ledger: a SQLite file (default ./keyturn.db) or a postgresql:// URL")
    reviewer = argparse.ArgumentParser(add_help=False, parents=[common])
    reviewer.add_argument("--url", help=f"reviewer API base URL (default $KEYTURN_URL or http://{DEFAULT_HTTP})")
    reviewer.add_argument("--token", help="reviewer bearer token (default $KEYTURN_TOKEN, or the local token file)")
    reviewer.add_argument("--json", action="store_true", help="print JSON")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the guarded MCP server")
    serve.add_argument("--http", metavar="HOST:PORT", help="serve streamable HTTP at /mcp plus the reviewer API")
    serve.add_argument("--policy", help="policy file (default: the shipped policies/default.yaml)")
    serve.add_argument("--log-level", default="WARNING")
    serve.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="json: one JSON object per line, with the call's id (call_id) on each")
    serve.set_defaults(func=lambda a: anyio.run(_serve, a))

    proxy = sub.add_parser(
        "proxy", parents=[common], help="guard an existing MCP server: keyturn proxy -- COMMAND ARGS...",
        description="Serve the tools of existing MCP servers, each call guarded by keyturn's policy. The upstream "
                    "is the command after --, --upstream-url, or proxy.upstreams in the config file.")
    proxy.add_argument("--http", metavar="HOST:PORT", help="serve streamable HTTP at /mcp plus the reviewer API "
                                                           "(default: serve stdio, for desktop agents)")
    proxy.add_argument("--policy", help="policy file (default: the shipped policies/proxy.yaml)")
    proxy.add_argument("--upstream-url", metavar="URL", help="a streamable HTTP upstream instead of a command")
    proxy.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                       help="an HTTP header for --upstream-url (e.g. authorization); repeatable")
    proxy.add_argument("--name", help="the command-line upstream's name (default: after its command, e.g. "
                                      "mcp-server-git -> git; a url's host)")
    proxy.add_argument("--prefix", help="expose the command-line upstream's tools as PREFIX + tool name")
    proxy.add_argument("--call-timeout", type=float, metavar="SECONDS",
                       help="how long one forwarded call may take (default: proxy.call_timeout, or 300)")
    proxy.add_argument("--mount", action="append", default=[], metavar="PATH",
                       help="show PATH to the upstream command's sandbox, read-only; repeatable (the files and "
                            "directories its arguments name are shown read-only already)")
    proxy.add_argument("--mount-rw", action="append", default=[], metavar="PATH",
                       help="show PATH to the upstream command's sandbox, writable; repeatable")
    proxy.add_argument("--network", action="store_true",
                       help="let the upstream command use the host's network (default: none at all)")
    proxy.add_argument("--no-sandbox", action="store_true",
                       help="run the upstream command without a sandbox, with keyturn's own reach (recorded in "
                            "the ledger, warned about at every start)")
    proxy.add_argument("--log-level", default="WARNING")
    proxy.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="json: one JSON object per line, with the call's id (call_id) on each")
    proxy.add_argument("upstream_command", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS",
                       help="the upstream server to start (stdio)")
    proxy.set_defaults(func=lambda a: anyio.run(_proxy, a))

    sub.add_parser("pending", parents=[reviewer], help="list held requests").set_defaults(func=cmd_pending)
    show = sub.add_parser("show", parents=[reviewer], help="show one request")
    show.add_argument("id")
    show.set_defaults(func=cmd_show)
    for verdict in ("approve", "deny"):
        p = sub.add_parser(verdict, parents=[reviewer], help=f"{verdict} a held request")
        p.add_argument("id")
        p.add_argument("--reason", required=(verdict == "deny"), help="why (recorded in the ledger)")
        if verdict == "approve":
            p.add_argument("--for", dest="grant_for", metavar="DURATION",
                           help="also make a standing grant for calls like this one, lasting this long (e.g. 1h)")
            p.add_argument("--uses", type=int, metavar="N", help="the grant covers at most N calls")
            p.add_argument("--when", metavar="CEL",
                           help="narrow the grant further (CEL over args and facts; ANDed with keyturn's proposal)")
            p.add_argument("--args", metavar="JSON",
                           help="approve the call with these arguments instead (a JSON object: the whole arguments); "
                                "the edited call is judged again and may need more approvals; needs --reason")
        p.set_defaults(func=cmd_vote, verdict=verdict)
    grants = sub.add_parser("grants", parents=[reviewer], help="list standing grants (live ones unless --all)")
    grants.add_argument("--all", action="store_true", help="also the revoked and expired ones")
    grants.set_defaults(func=cmd_grants)
    revoke = sub.add_parser("revoke", parents=[reviewer], help="revoke a standing grant now")
    revoke.add_argument("id", metavar="GRANT_ID")
    revoke.add_argument("--reason", required=True, help="why (recorded in the ledger)")
    revoke.set_defaults(func=cmd_revoke)

    audit = sub.add_parser("audit", help="read the ledger").add_subparsers(dest="audit_command", required=True)
    tail = audit.add_parser("tail", parents=[common], help="the latest events")
    tail.add_argument("-n", type=int, default=20)
    tail.add_argument("--json", action="store_true")
    tail.set_defaults(func=cmd_audit_tail)
    follow = audit.add_parser("follow", parents=[common], help="events as they are appended, until interrupted")
    follow.add_argument("--from", dest="from_seq", type=int, metavar="SEQ",
                        help="start at this sequence number (default: only what is appended from now)")
    follow.add_argument("--format", choices=("text", "jsonl"), default="text",
                        help="jsonl: one event per line as JSON, as `audit tail --json` prints them")
    follow.set_defaults(func=cmd_audit_follow)
    ashow = audit.add_parser("show", parents=[common], help="the whole story of one request")
    ashow.add_argument("id")
    ashow.add_argument("--json", action="store_true")
    ashow.set_defaults(func=cmd_audit_show)
    from server.cli.audit_parser import add_commands

    add_commands(audit, common, _settings)

    _policy_commands(sub, common)
    return parser


def _policy_cli() -> Any:
    from server.cli import policy as policy_cli

    return policy_cli


def _policy_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    policy = sub.add_parser("policy", help="check, explain, test and replay policies")
    psub = policy.add_subparsers(dest="policy_command", required=True)
    check = psub.add_parser("check", parents=[common], help="validate a policy file")
    check.add_argument("file")
    check.set_defaults(func=lambda a: _policy_cli().cmd_check(Path(a.file), _settings(a) if a.config else None))
    explain = psub.add_parser("explain", parents=[common], help="decide one call and show the trace")
    explain.add_argument("--policy", help="policy file (default: the configured one)")
    explain.add_argument("--tool", required=True)
    explain.add_argument("--args", default="{}", help="arguments as JSON")
    explain.add_argument("--principal", default="local")
    explain.add_argument("--model")
    explain.add_argument("--json", action="store_true")
    explain.add_argument("--facts", help="measured facts as JSON, merged over the classifiers' (what a tool measures "
                                         "when the call is made), e.g. '{\"sql\": {\"impact\": \"measured\", "
                                         "\"rows_affected\": 1204, \"table_rows\": 50311}}'")
    explain.set_defaults(func=_policy_explain)
    test = psub.add_parser("test", parents=[common], help="run a policy's test cases")
    test.add_argument("file")
    test.set_defaults(func=lambda a: _policy_cli().cmd_test(Path(a.file)))
    replay = psub.add_parser("replay", parents=[common], help="re-decide recorded calls under a candidate policy")
    replay.add_argument("file")
    replay.add_argument("--limit", type=int, default=10_000)
    replay.set_defaults(func=_policy_replay)


def _policy_explain(args: argparse.Namespace) -> int:
    settings = _settings(args)
    path = Path(args.policy) if args.policy else settings.policy_path()
    fn: Any = _policy_cli().cmd_explain
    return int(fn(path, args.tool, args.args, args.principal, args.model, settings=settings, as_json=args.json,
                  measured_json=args.facts))


def _policy_replay(args: argparse.Namespace) -> int:
    from server.policy.replay import cmd_replay

    settings = _settings(args)
    if settings.database_url is None and not settings.db.exists():
        raise KeyturnError(f"no ledger at {settings.db}")
    return int(anyio.run(cmd_replay, Path(args.file), settings, args.limit))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from server.logs import configure

    configure(getattr(args, "log_format", None) or "text")
    if getattr(args, "log_level", None):  # (serve and proxy) keyturn's own log level
        logging.getLogger("server").setLevel(args.log_level.upper())
    try:
        return int(args.func(args))
    except KeyturnError as e:
        return _user_error(args, [e])
    except BaseExceptionGroup as group:  # raised inside `running()`, whose task group wraps it
        ours, rest = group.split(KeyturnError)
        if ours is None or rest is not None:
            raise
        return _user_error(args, _leaves(ours))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `keyturn pending | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's last flush does not fail again
        return 141


def _user_error(args: argparse.Namespace, errors: list[BaseException]) -> int:
    """One line per error on stderr, exit code 2; with `--json`, also `{"error": ...}` on stdout for programs."""
    for error in errors:
        print(f"keyturn: {error}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": "; ".join(str(e) for e in errors)}))
    return 2


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    return [leaf for e in group.exceptions
            for leaf in (_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])]


if __name__ == "__main__":
    sys.exit(main())
