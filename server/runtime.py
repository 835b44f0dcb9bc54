"""The keyturn runtime: settings in, a running gate out (ledger, policy, broker, tools, background tasks)."""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc
import mcp_types as types

from server.approvals import ApprovalBroker, Notifier, ReviewerDirectory
from server.approvals.grants import expire_due
from server.approvals.quorum import unsatisfiable
from server.canonical import sha256_hex
from server.classify import ClassifyContext
from server.config import Settings, resolve_token_digest
from server.errors import ConfigError, LedgerError
from server.execution import PackContext
from server.gate import Gate, Runnable
from server.guarded import ToolRegistry, load_pack, pack_state_paths
from server.ledger import Store
from server.ledger.checkpoints import CheckpointError, signing_key
from server.ledger.opening import store_for
from server.ledger.witnesses import Checkpointer, configured_witnesses
from server.policy import CompiledPolicy, LivePolicy
from server.secret_files import ensure_secret_file, reviewer_token_path

if TYPE_CHECKING:
    from server.metrics import Metrics

log = logging.getLogger(__name__)

LOCAL_REVIEWER = "api:owner"
LOCAL_PERSON = "owner"




def ensure_local_reviewer_token(db: Path) -> str:
    return ensure_secret_file(reviewer_token_path(db), lambda: "kt_" + secrets.token_urlsafe(32))


@dataclass
class Credentials:
    """Bearer token digests -> who they are. Tokens themselves are never stored."""

    agents: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # digest -> (principal, on_behalf_of)
    reviewers: dict[str, str] = field(default_factory=dict)  # digest -> reviewer identity

    def agent(self, token: str) -> tuple[str, str | None] | None:
        return self.agents.get(sha256_hex(token))

    def reviewer(self, token: str) -> str | None:
        return self.reviewers.get(sha256_hex(token))


def build_credentials(settings: Settings, env: dict[str, str] | None = None) -> Credentials:
    env = dict(os.environ) if env is None else env
    creds = Credentials()
    for agent in settings.agents:
        digest = resolve_token_digest(agent.token_sha256, agent.token_env, env)
        assert digest is not None
        creds.agents[digest] = (agent.name, agent.on_behalf_of)
    for reviewer in settings.reviewers:
        digest = resolve_token_digest(reviewer.token_sha256, reviewer.token_env, env)
        if digest is not None:
            if not reviewer.identity.startswith(("api:", "web:")):
                raise ConfigError(f"reviewer {reviewer.identity}: only api: identities authenticate with tokens")
            creds.reviewers[digest] = reviewer.identity
    return creds


def effective_settings(settings: Settings) -> tuple[Settings, str | None]:
    """The embedded default: with no api reviewer configured, one local reviewer `api:owner` with a generated token."""
    if any(r.identity.startswith("api:") for r in settings.reviewers):
        return settings, None
    from server.config import Person, Reviewer

    token = ensure_local_reviewer_token(settings.db)
    people = dict(settings.people)
    people.setdefault(LOCAL_PERSON, Person())
    reviewers = (*settings.reviewers, Reviewer(identity=LOCAL_REVIEWER, person=LOCAL_PERSON,
                                                token_sha256=sha256_hex(token)))
    return settings.model_copy(update={"people": people, "reviewers": reviewers}), token


class ServedTool(Runnable, Protocol):
    """A guarded tool as the MCP server lists it."""

    def to_mcp(self) -> types.Tool: ...


class ToolSource(Protocol):
    """Guarded tools served besides the registry's: in proxy mode, an upstream server's (`server.proxy`)."""

    def list(self) -> Sequence[ServedTool]: ...

    def get(self, name: str) -> ServedTool | None: ...


@dataclass
class Keyturn:
    """Everything one keyturn process runs. Use `async with running(settings) as kt:`."""

    settings: Settings
    ledger: Store
    policy: LivePolicy
    broker: ApprovalBroker
    registry: ToolRegistry
    gate: Gate
    credentials: Credentials
    local_token: str | None = None
    http_base_urls: list[str] = field(default_factory=list)
    sources: list[ToolSource] = field(default_factory=list)
    tool_listeners: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    task_group: anyio.abc.TaskGroup | None = None
    checkpointer: Checkpointer | None = None  # signed checkpoints to the witnesses (None: switched off)
    metrics: Metrics | None = None  # Prometheus metrics (None: `metrics: {enabled: false}`)

    def upstream_health(self) -> list[tuple[str, bool]]:
        """(name, up) of every upstream server this process proxies."""
        return [(u.name, u.state == "up") for source in self.sources for u in getattr(source, "upstreams", ())]

    def add_notifier(self, notifier: Notifier) -> None:
        self.broker.notifiers.append(notifier)

    def start_soon(self, fn: Callable[[], Awaitable[Any]], name: str | None = None) -> None:
        """Run a channel's background work for as long as this process runs; cancelled on shutdown."""
        if self.task_group is None:
            raise RuntimeError("keyturn is not running")
        self.task_group.start_soon(_supervised, fn, name or getattr(fn, "__qualname__", "task"), name=name)

    def tools(self) -> list[ServedTool]:
        """Every guarded tool this process serves: the registry's, then each source's."""
        return [*self.registry.list(), *(t for source in self.sources for t in source.list())]

    def find_tool(self, name: str) -> ServedTool | None:
        tool: ServedTool | None = self.registry.get(name)
        for source in self.sources:
            if tool is not None:
                break
            tool = source.get(name)
        return tool

    async def announce_tools_changed(self) -> None:
        """Tell whoever listens (the MCP server, to notify its clients) that `tools()` changed."""
        for listener in list(self.tool_listeners):
            try:
                await listener()
            except Exception:
                log.exception("a tool-list listener failed")


def build_directory(settings: Settings) -> ReviewerDirectory:
    return ReviewerDirectory(
        identities={r.identity: r.person for r in settings.reviewers},
        groups_of={name: frozenset(p.groups) for name, p in settings.people.items()},
    )


def unreachable_rules(policy: CompiledPolicy, settings: Settings) -> list[str]:
    """The review rules the configured reviewers can never approve (one line each): a quorum larger than the
    distinct people who may vote on it, or a group nobody who can review is in. Such a rule's calls can only
    expire."""
    directory = build_directory(settings)
    if not any(identity.startswith("api:") for identity in directory.identities):  # as `effective_settings` adds
        directory = ReviewerDirectory({**directory.identities, LOCAL_REVIEWER: LOCAL_PERSON}, directory.groups_of)
    return unsatisfiable(policy.reviews(), directory, settings.people)


def pack_context(settings: Settings, environ: Mapping[str, str] | None = None) -> PackContext:
    """keyturn's state, as the tool packs must see it: the ledger and the secrets beside it, the config, the
    policy, and every pack's own state (the secret store); the environment variables that hold its secrets."""
    environ = os.environ if environ is None else environ
    paths: list[Path] = [settings.db, settings.policy_path()]
    if settings.config_file is not None:
        paths.append(settings.config_file)
    paths += [p for p in (settings.checkpoints.key_file, settings.checkpoints.witness_file) if p is not None]
    for pack in settings.tools:
        paths += pack_state_paths(pack.module, pack.options)
    secret_env = {name for name in environ if name.startswith("KEYTURN_")}
    secret_env |= {a.token_env for a in settings.agents if a.token_env}
    secret_env |= {r.token_env for r in settings.reviewers if r.token_env}
    return PackContext.for_state(paths, ledger=settings.db, secret_env=secret_env, ledger_url=settings.database_url)


@asynccontextmanager
async def running(settings: Settings, *, http_base_urls: list[str] | None = None) -> AsyncIterator[Keyturn]:
    """Open the ledger, load policy and tools, abandon orphans, run the background tasks; close on exit."""
    settings, local_token = effective_settings(settings)
    credentials = build_credentials(settings)
    registry = ToolRegistry()
    context = pack_context(settings)
    for pack in settings.tools:
        load_pack(pack.module, registry, pack.options, context)

    # The policy before the ledger: a policy that cannot be loaded stops keyturn before anything is recorded.
    policy = LivePolicy(settings.policy_path(), groups=settings.groups, people=set(settings.people))
    compiled = policy.load()
    traces = None
    if settings.telemetry.traces_exported(os.environ):
        from server import tracing

        traces = tracing.configure(os.environ)  # (before anything is recorded: a missing SDK is a user error)
    ledger = store_for(settings)
    await ledger.open()
    try:
        keyturn_paths = context.state_paths  # the ledger, policy, config and every pack's state (the secret store)
        urls = tuple(http_base_urls or ())
        if settings.reviewer_api_url:
            urls = (*urls, settings.reviewer_api_url)

        async def on_policy_event(kind: str, payload: dict[str, object]) -> None:
            await ledger.append(kind, None, dict(payload))
            if kind == "policy.loaded":  # a reloaded policy is checked against the reviewers as at start-up
                for line in unreachable_rules(policy.current, settings):
                    log.warning("%s", line)

        policy.on_event = on_policy_event
        window = settings.rejoin_window_s
        broker = ApprovalBroker(ledger=ledger, directory=build_directory(settings),
                                poll_interval_s=settings.poll_interval_s,
                                rejoin_window_s=window if window is not None else 120.0 if settings.database_url else 0.0)
        gate = Gate(ledger=ledger, broker=broker, policy=policy,
                    classify_context=ClassifyContext(keyturn_paths=keyturn_paths, keyturn_urls=urls),
                    progress_interval_s=settings.progress_interval_s)
        await ledger.register_instance(broker.instance_id, socket.gethostname(), os.getpid())
        abandoned = await broker.abandon_orphans()
        await ledger.append("process.started", None, {
            "instance": broker.instance_id, "policy_digest": compiled.digest,
            "policy_path": str(settings.policy_path()), "abandoned": abandoned,
        })
        for kind, payload in context.events:  # what the packs asked to record (a sandbox turned off ...)
            await ledger.append(kind, None, {**payload, "instance": broker.instance_id})
        for line in unreachable_rules(compiled, settings):  # once started, on the console: such calls only expire
            log.warning("%s", line)
        kt = Keyturn(settings=settings, ledger=ledger, policy=policy, broker=broker, registry=registry, gate=gate,
                     credentials=credentials, local_token=local_token, http_base_urls=list(urls),
                     checkpointer=_checkpointer(settings, ledger))
        sink = None
        if settings.audit_sink is not None:
            from server.streaming import AuditSink

            sink = AuditSink(ledger, settings.audit_sink, settings.db, poll_s=settings.poll_interval_s)
            sink.read_cursor()  # a cursor file that is not one stops keyturn here, not in the background
        if settings.metrics.enabled:
            from server.metrics import Metrics

            kt.metrics = Metrics(ledger, held_now=lambda: broker.held_now, upstreams=kt.upstream_health)
        async with anyio.create_task_group() as tg:
            kt.task_group = tg
            tg.start_soon(policy.watch)
            if kt.metrics is not None:
                tg.start_soon(_supervised, kt.metrics.run, "metrics")
            if sink is not None:
                tg.start_soon(_supervised, sink.run, "audit sink")
            tg.start_soon(broker.poll_store)
            tg.start_soon(_housekeeping, kt)
            if kt.checkpointer is not None:
                tg.start_soon(_supervised, kt.checkpointer.run, "checkpoints")
            try:
                yield kt
            finally:
                tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            if kt.checkpointer is not None:
                await _last_checkpoint(kt.checkpointer)
            if kt.metrics is not None:
                kt.metrics.close()
            try:
                await ledger.remove_instance(broker.instance_id)
            except LedgerError:
                pass
    finally:
        with anyio.CancelScope(shield=True):
            await ledger.close()
        if traces is not None:
            from server import tracing

            await anyio.to_thread.run_sync(tracing.shutdown, traces)


def _checkpointer(settings: Settings, ledger: Store) -> Checkpointer | None:
    cfg = settings.checkpoints
    if not cfg.enabled:
        return None
    witnesses = configured_witnesses(settings)
    key = signing_key(settings, os.environ)  # (the environment only when the config names a variable)
    return Checkpointer(ledger, key, list(witnesses), every_events=cfg.every_events, every_s=cfg.every_s,
                        anchors=[cfg.witness_file] if cfg.witness_file is not None else [])


async def _last_checkpoint(checkpointer: Checkpointer) -> None:
    """A checkpoint of the head at shutdown, bounded: witnesses that do not answer are not waited for."""
    with anyio.move_on_after(15):
        try:
            await checkpointer.make()
        except (LedgerError, CheckpointError) as e:
            log.error("no checkpoint at shutdown: %s", e)


async def _supervised(fn: Callable[[], Awaitable[Any]], name: str) -> None:
    """A channel's failure is logged and retried with backoff; it never takes the gate down with it."""
    delay = 1.0
    while True:
        try:
            await fn()
            return
        except Exception:
            log.exception("%s stopped; restarting in %.0f s", name, delay)
        await anyio.sleep(delay)
        delay = min(delay * 2, 60.0)


ORPHAN_SWEEP_EVERY = 5
"""Housekeeping rounds (of 2 s) between two looks for calls held by a process that has died."""


async def _housekeeping(kt: Keyturn) -> None:
    """Heartbeat (so other processes know we hold our calls), expiry of requests nobody is waiting on, the
    outcomes of runs the ledger could not record at the time (a full disk, a lock held too long), and calls held
    by another keyturn process that died (abandoned now, not at that process's next start: until then reviewers
    would be offered, and could approve, a request nobody waits for)."""
    rounds = 0
    while True:
        await anyio.sleep(2.0)
        rounds += 1
        try:
            await kt.gate.record_pending_outcomes()
            await kt.ledger.heartbeat(kt.broker.instance_id)
            await kt.broker.sweep_expired()
            await expire_due(kt.ledger)  # standing grants whose time passed or whose uses ran out
            if rounds % ORPHAN_SWEEP_EVERY == 0 and (abandoned := await kt.broker.abandon_orphans()):
                log.warning("abandoned %d call(s) held by a keyturn process that stopped", len(abandoned))
        except LedgerError as e:
            log.warning("housekeeping failed: %s", e)
