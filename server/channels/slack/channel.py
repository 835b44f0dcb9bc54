"""The Slack reviewer channel: a Block Kit message per held call, Approve/Deny buttons, a reason modal, an
"Edit & approve" modal (the edited arguments are judged by the gate, `server.approvals.edits`), and, in the thread
of a request an approval made a standing grant from, a message announcing the grant with a Revoke button
(`server.approvals.grants`).

Slack only delivers and reports. A click becomes a `Verdict` for the Slack identity of the clicking
user (`identity`); `ApprovalBroker.decide` alone judges it, and a refusal is explained to that
user only. Each posted message's channel and ts are recorded in the ledger (`notified` events), and a
follower re-renders the messages of every request that changes, whichever keyturn process changed
it, so a slow Slack never holds up a decision or an agent. Clicks arrive over HTTP at `/slack/events`
(signature and timestamp always checked by Bolt) or over Socket Mode.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import anyio
from slack_bolt.adapter.starlette.async_handler import AsyncSlackRequestHandler
from slack_bolt.async_app import AsyncAck, AsyncApp
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from server.approvals import ApprovalBroker
from server.approvals.edits import EditRefused, ProposedEdit, has_masked
from server.approvals.grants import revoke
from server.channels.api import judge_edit
from server.channels.bodies import BodyRefused, read_body, replay
from server.channels.slack import blocks as ui
from server.channels.slack.config import SlackConfig, SlackSecrets, describe, load_slack, make_client
from server.channels.slack.identity import SlackIdentities
from server.config import Settings
from server.errors import ChannelError, LedgerError
from server.ledger import Store
from server.ledger.checkpoints import Checkpoint, checkpoint_line
from server.models import TERMINAL_STATES, Event, RequestView, ReviewSpec, Verdict, VerdictKind

if TYPE_CHECKING:
    from server.runtime import Keyturn

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
MAX_EVENT_BYTES = 1024 * 1024  # Slack's interaction payloads are tens of KiB at most
UPDATE_KINDS = frozenset({"vote", "arguments.edited", "approval.granted", "execution.started", *TERMINAL_STATES})
EditJudge = Callable[[str, dict[str, Any]], Awaitable[ProposedEdit | EditRefused | None]]
"""Judges a reviewer's edited arguments for a request (`server.channels.api.judge_edit` with the runtime)."""


class SlackChannel:
    """The Notifier and the Bolt app. `run()` must run for messages to be updated (and for Socket Mode)."""

    name = "slack"

    def __init__(self, *, ledger: Store, broker: ApprovalBroker, settings: Settings, config: SlackConfig,
                 secrets: SlackSecrets, client: AsyncWebClient | None = None, judge: EditJudge | None = None) -> None:
        self.ledger, self.broker, self.settings, self.config, self.secrets = ledger, broker, settings, config, secrets
        self.judge = judge  # judges an edit's arguments (the runtime's gate); without it, edits are refused
        self.client = client or make_client(config, secrets)
        self.app = AsyncApp(name="keyturn", client=self.client, signing_secret=secrets.signing_secret or "",
                            request_verification_enabled=True, logger=log)
        self.app.action(ui.APPROVE_ACTION)(self._on_click)
        self.app.action(ui.DENY_ACTION)(self._on_click)
        self.app.view(ui.REASON_CALLBACK)(self._on_reason)
        self.app.action(ui.EDIT_ACTION)(self._on_edit_click)
        self.app.view(ui.EDIT_CALLBACK)(self._on_edit)
        self.app.action(ui.REVOKE_ACTION)(self._on_revoke_click)
        self.app.view(ui.REVOKE_CALLBACK)(self._on_revoke)
        self.identities = SlackIdentities(client=self.client, broker=broker, settings=settings,
                                          map_email=config.map_email, timeout_s=config.post_timeout_s)
        self._messages: dict[str, list[tuple[str, str]]] = {}  # request id -> [(slack channel id, ts)]
        self._sent: dict[tuple[str, str], str] = {}  # (channel, ts) -> digest of what it shows
        self._posted: set[tuple[str, str]] = set()  # messages this process posted: it alone replies in their threads
        self._retry: dict[str, int] = {}
        self._feed = ledger.follow(UPDATE_KINDS | {"notified", "grant.created"})

    # -- wiring ----------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """`POST /slack/events`, only with a signing secret: no unverified way in."""
        if not self.secrets.signing_secret:
            return []
        handler = AsyncSlackRequestHandler(self.app)
        verifier = SignatureVerifier(self.secrets.signing_secret)

        async def events(request: Request) -> Response:
            # Checked here, before Bolt parses anything: an unsigned body never reaches a parser, and an unsigned
            # body is read only up to its limit (`bodies`), before the signature is checked.
            try:
                body = await read_body(request, MAX_EVENT_BYTES)
            except BodyRefused as e:
                return e.json_response()
            timestamp = request.headers.get("x-slack-request-timestamp", "")
            if not timestamp.isdigit() or not verifier.is_valid(body, timestamp,
                                                                request.headers.get("x-slack-signature", "")):
                return JSONResponse({"error": "invalid Slack signature"}, status_code=401)
            if not _well_formed(body, request.headers.get("content-type", "")):
                return JSONResponse({"error": "malformed Slack request"}, status_code=400)
            try:
                response = await handler.handle(replay(request, body))
            except Exception:
                log.warning("slack: a signed request could not be handled (malformed payload)", exc_info=True)
                return JSONResponse({"error": "malformed Slack request"}, status_code=400)
            if response.status_code >= 500:
                # Bolt failed on a signed body whose shape no real Slack payload has: the caller's fault.
                log.warning("slack: a signed request could not be handled (malformed payload)")
                return JSONResponse({"error": "malformed Slack request"}, status_code=400)
            return response

        return [Route(EVENTS_PATH, events, methods=["POST"])]

    async def run(self) -> None:
        """Follow the ledger to keep messages current; hold the Socket Mode connection when configured."""
        await self._feed.start()
        async with anyio.create_task_group() as tg:
            if self.config.socket_mode:
                tg.start_soon(self._socket_mode)
            await self._follow()

    async def _socket_mode(self) -> None:
        from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

        handler = AsyncSocketModeHandler(self.app, self.secrets.app_token)
        try:
            await handler.connect_async()  # type: ignore[no-untyped-call]
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await handler.close_async()  # type: ignore[no-untyped-call]

    # -- outbound (Notifier) ---------------------------------------------------------------------

    def eligible_users(self, view: RequestView) -> list[str]:
        """Slack user ids of the mapped reviewers who may vote on `view` (for DMs and mentions only)."""
        spec, directory = view.review or ReviewSpec(), self.broker.directory
        users = []
        for identity, person in directory.identities.items():
            if identity.startswith("slack:") and person not in {view.principal, view.on_behalf_of} and any(
                    directory.eligible(person, g) for g in spec.groups):
                users.append(identity.rpartition("/")[2])
        return sorted(set(users))

    def targets(self, view: RequestView) -> list[str]:
        named = [c.partition(":")[2] for c in (view.review or ReviewSpec()).channels if c.split(":")[0] == "slack"]
        out: list[str] = []
        if not named:
            out += [self.config.default_channel] if self.config.default_channel else []
            out += self.eligible_users(view) if self.config.dm_reviewers else []
        for name in named:
            if name in ("", "default"):
                out += [self.config.default_channel] if self.config.default_channel else []
            elif name in ("reviewers", "dm"):
                out += self.eligible_users(view)
            else:
                out.append(name.removeprefix("@"))
        return list(dict.fromkeys(out))

    def render(self, view: RequestView) -> tuple[str, list[dict[str, Any]], str]:
        mentions = self.eligible_users(view) if self.config.mention_reviewers and view.state == "pending" else None
        text, blocks = ui.request_message(view, mentions)
        digest = hashlib.sha256(json.dumps([text, blocks], sort_keys=True).encode()).hexdigest()
        return text, blocks, digest

    async def request_opened(self, request: RequestView) -> None:
        """Post the review message to each target; record each (channel, ts) in the ledger."""
        targets = self.targets(request)
        if not targets:
            raise ChannelError("no Slack channel for this request: set slack.default_channel, "
                               "or name one in the rule (channels: [slack:#ops-approvals])")
        text, blocks, digest = self.render(request)
        failures = []
        for target in targets:
            try:
                with anyio.fail_after(self.config.post_timeout_s):
                    resp = await self.client.chat_postMessage(channel=target, text=text, blocks=blocks,
                                                              unfurl_links=False, unfurl_media=False)
                channel, ts = str(resp["channel"]), str(resp["ts"])
            except Exception as e:
                failures.append(f"{target}: {describe(e)}")
                continue
            self._messages.setdefault(request.id, []).append((channel, ts))
            self._sent[(channel, ts)] = digest
            self._posted.add((channel, ts))
            await self.ledger.append("notified", request.id,
                                     {"channel": "slack", "slack_channel": channel, "ts": ts, "target": target})
        if failures:
            raise ChannelError("could not post to Slack: " + "; ".join(failures))

    async def request_changed(self, request: RequestView, event: Event) -> None:
        """Never waits on Slack: the follower picks the change up from the ledger at once."""
        self._feed.wake()

    # -- keeping messages current ---------------------------------------------------------------

    async def _follow(self) -> None:
        while True:
            await self._feed.wait(self.config.update_interval_s)
            try:
                await self.catch_up()
            except LedgerError as e:
                log.warning("slack: cannot read the ledger: %s", e)
            except Exception:  # a rendering bug must not stop every later update
                log.exception("slack: updating messages failed")

    async def catch_up(self) -> None:
        """Re-render the messages of every request changed since the last look (and retry failed updates)."""
        events = await self._feed.read()
        touched: dict[str, list[Event]] = {request_id: [] for request_id in self._retry}
        for e in events:
            if e.call_id is None:
                continue
            if e.kind == "grant.created":
                await self._announce_grant(e.call_id, e.payload)
                continue
            if e.kind == "notified" and e.payload.get("channel") == "slack" and e.payload.get("ts"):
                known = self._messages.get(e.call_id)
                msg = (str(e.payload["slack_channel"]), str(e.payload["ts"]))
                if known is not None and msg not in known:
                    known.append(msg)
                touched.setdefault(e.call_id, [])
            elif e.kind in UPDATE_KINDS:
                touched.setdefault(e.call_id, []).append(e)
        for request_id, changes in touched.items():
            await self._refresh(request_id, changes)

    async def _find_messages(self, request_id: str) -> list[tuple[str, str]]:
        if request_id not in self._messages:
            self._messages[request_id] = [
                (str(e.payload["slack_channel"]), str(e.payload["ts"])) for e in await self.ledger.events(request_id)
                if e.kind == "notified" and e.payload.get("channel") == "slack" and e.payload.get("ts")]
        return self._messages[request_id]

    async def _refresh(self, request_id: str, changes: list[Event]) -> None:
        messages = await self._find_messages(request_id)
        view = await self.ledger.get_call(request_id) if messages else None
        if view is None:
            self._messages.pop(request_id, None)
            self._retry.pop(request_id, None)
            return
        text, blocks, digest = self.render(view)
        ok = True
        for channel, ts in messages:
            if self._sent.get((channel, ts)) != digest:
                try:
                    with anyio.fail_after(self.config.post_timeout_s):
                        await self.client.chat_update(channel=channel, ts=ts, text=text, blocks=blocks)
                    self._sent[(channel, ts)] = digest
                except Exception as e:
                    ok = False
                    log.warning("slack: could not update the message for %s: %s", request_id, describe(e))
            # Updates are idempotent, so any process may make them; a thread reply is made once, by the poster.
            replies = self.config.thread_replies and (channel, ts) in self._posted
            for line in (ui.thread_line(e) for e in changes) if replies else ():
                if line:
                    await self._call("chat_postMessage", channel=channel, thread_ts=ts, text=line)
        attempts = 0 if ok else self._retry.get(request_id, 0) + 1
        if ok or attempts > 5:
            self._retry.pop(request_id, None)
            if view.state in TERMINAL_STATES:
                for msg in self._messages.pop(request_id, []):
                    self._sent.pop(msg, None)
                    self._posted.discard(msg)
        else:
            self._retry[request_id] = attempts

    async def _announce_grant(self, grant_id: str, payload: dict[str, Any]) -> None:
        """In the thread of each message of the request the grant came from (posted by this process: one reply), a
        message announcing the grant, with a Revoke button."""
        request_id = str(payload.get("request_id") or "")
        text, blocks = ui.grant_message(grant_id, payload)
        for channel, ts in await self._find_messages(request_id):
            if (channel, ts) in self._posted:
                await self._call("chat_postMessage", channel=channel, thread_ts=ts, text=text, blocks=blocks,
                                 unfurl_links=False, unfurl_media=False)

    async def checkpoint_digest(self, checkpoint: Checkpoint, public_key: str) -> None:
        """A quiet line in the default channel with the latest signed checkpoint (a witness: once posted, a rewrite
        of the ledger file cannot reach it). Raises ChannelError so the checkpointer logs the failure."""
        if not self.config.default_channel:
            raise ChannelError("no slack.default_channel to post the checkpoint to")
        text = checkpoint_line(checkpoint, public_key)
        if not await self._call("chat_postMessage", channel=self.config.default_channel, text=text,
                                unfurl_links=False, unfurl_media=False):
            raise ChannelError("slack: the checkpoint message could not be posted")

    async def _call(self, method: str, **kwargs: Any) -> bool:
        try:
            with anyio.fail_after(self.config.post_timeout_s):
                await getattr(self.client, method)(**kwargs)
            return True
        except Exception as e:
            log.warning("slack: %s failed: %s", method, describe(e))
            return False

    # -- inbound (Bolt listeners) -----------------------------------------------------------------

    async def _on_click(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        action = body["actions"][0]
        verdict: VerdictKind = "approve" if action["action_id"] == ui.APPROVE_ACTION else "deny"
        request_id = str(action.get("value") or "")
        channel = str((body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id") or "")
        user, identity = await self.identities.identify(body)
        view = await self.ledger.get_call(request_id)
        wants_reason = verdict == "deny" or bool(view and view.review and view.review.require_reason)
        if view is not None and view.state in ("pending", "approved") and wants_reason:
            modal = ui.reason_modal(view, verdict, {"r": request_id, "v": verdict, "c": channel})
            if not await self._call("views_open", trigger_id=body["trigger_id"], view=modal):
                await self._ephemeral(channel, user, "keyturn could not open the reason dialog; please try again.")
            return
        await self._vote(Verdict(request_id=request_id, reviewer=identity, verdict=verdict, channel="slack"),
                         user, channel)

    @staticmethod
    async def _submitted(ack: AsyncAck, view: dict[str, Any], ask: str, what: str) -> tuple[str, dict[str, Any]] | None:
        """A reason modal's submission: (the reason, keyturn's metadata), acknowledged; None when the reason is
        missing or too long (the modal says `ask`, and stays open) or the metadata is not keyturn's (`what` is
        logged as ignored)."""
        value = view["state"]["values"].get(ui.REASON_BLOCK, {}).get(ui.REASON_INPUT, {}).get("value") or ""
        if not value.strip() or len(value) > ui.MAX_REASON:
            await ack(response_action="errors",
                      errors={ui.REASON_BLOCK: f"Please {ask} (at most {ui.MAX_REASON} characters)."})
            return None
        await ack()
        try:
            meta = json.loads(view.get("private_metadata") or "{}")
        except (TypeError, ValueError):
            meta = None
        if not isinstance(meta, dict):
            log.warning("slack: %s without keyturn's metadata was ignored", what)
            return None
        return value, meta

    async def _on_reason(self, ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        if (submitted := await self._submitted(ack, view, "give a reason", "a modal submission")) is None:
            return
        value, meta = submitted
        verdict: VerdictKind = "approve" if meta.get("v") == "approve" else "deny"
        user, identity = await self.identities.identify(body)
        await self._vote(Verdict(request_id=str(meta.get("r", "")), reviewer=identity, verdict=verdict,
                                 reason=value.strip(), channel="slack"), user, str(meta.get("c") or ""))

    async def _on_edit_click(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        request_id = str(body["actions"][0].get("value") or "")
        channel = str((body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id") or "")
        user, _ = await self.identities.identify(body)
        view = await self.ledger.get_call(request_id)
        if view is None or view.state != "pending":
            await self._ephemeral(channel, user, f"keyturn request {ui.escape(request_id)} is not pending.")
            return
        if has_masked(view.arguments):
            await self._ephemeral(channel, user, "This call's arguments hold values keyturn masks, so they cannot be "
                                                 "edited; deny it with guidance instead.")
            return
        modal = ui.edit_modal(view, {"r": request_id, "c": channel})
        if modal is None:
            await self._ephemeral(channel, user, "These arguments are too long to edit in Slack; use the inbox or "
                                                 f"`keyturn approve {ui.escape(request_id)} --args JSON`.")
        elif not await self._call("views_open", trigger_id=body["trigger_id"], view=modal):
            await self._ephemeral(channel, user, "keyturn could not open the edit dialog; please try again.")

    async def _on_edit(self, ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        values = view["state"]["values"]
        reason = values.get(ui.REASON_BLOCK, {}).get(ui.REASON_INPUT, {}).get("value") or ""
        text = values.get(ui.ARGUMENTS_BLOCK, {}).get(ui.ARGUMENTS_INPUT, {}).get("value") or ""
        if not reason.strip() or len(reason) > ui.MAX_REASON:
            await ack(response_action="errors", errors={
                ui.REASON_BLOCK: f"Please say why you changed the arguments (at most {ui.MAX_REASON} characters)."})
            return
        try:
            arguments = json.loads(text)
            meta = json.loads(view.get("private_metadata") or "{}")
        except ValueError:
            arguments = meta = None
        if not isinstance(arguments, dict):
            await ack(response_action="errors", errors={
                ui.ARGUMENTS_BLOCK: "The arguments must be a JSON object (the whole arguments, as they are to run)."})
            return
        if not isinstance(meta, dict) or self.judge is None:
            await ack()
            log.warning("slack: an edit submission without keyturn's metadata (or without a judge) was ignored")
            return
        request_id = str(meta.get("r", ""))
        edit = await self.judge(request_id, arguments)
        if isinstance(edit, EditRefused) and edit.code in ("invalid_arguments", "denied_by_policy", "masked_values"):
            # What the reviewer can fix in the dialog is said there (and recorded as a refused vote below).
            await ack(response_action="errors", errors={ui.ARGUMENTS_BLOCK: _clip_error(edit.message)})
        else:
            await ack()
        user, identity = await self.identities.identify(body)
        await self._vote(Verdict(request_id=request_id, reviewer=identity, verdict="approve", reason=reason.strip(),
                                 channel="slack"), user, str(meta.get("c") or ""), edit)

    async def _on_revoke_click(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        grant_id = str(body["actions"][0].get("value") or "")
        channel = str((body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id") or "")
        modal = ui.revoke_modal(grant_id, {"g": grant_id, "c": channel})
        if not await self._call("views_open", trigger_id=body["trigger_id"], view=modal):
            user, _ = await self.identities.identify(body)
            await self._ephemeral(channel, user, "keyturn could not open the revoke dialog; please try again.")

    async def _on_revoke(self, ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        if (submitted := await self._submitted(ack, view, "say why", "a revoke submission")) is None:
            return
        value, meta = submitted
        user, identity = await self.identities.identify(body)
        channel, grant_id = str(meta.get("c") or ""), str(meta.get("g") or "")
        person = self.broker.directory.person(identity)
        if person is None:
            await self._ephemeral(channel, user, ":no_entry_sign: Not revoked: you are not a configured reviewer.")
            return
        try:
            refused = await revoke(self.ledger, grant_id, person=person, reviewer=identity, reason=value.strip(),
                                   channel="slack")
        except LedgerError:
            log.exception("slack: ledger failure while revoking a grant")
            await self._ephemeral(channel, user, "keyturn could not record the revocation (ledger unavailable); the "
                                                 "grant still stands. Please try again.")
            return
        if refused is not None:
            await self._ephemeral(channel, user, f":no_entry_sign: Not revoked: {ui.escape(refused.message)}")
        else:
            await self._ephemeral(channel, user, f":wastebasket: Grant `{ui.escape(grant_id)}` revoked.")

    async def _vote(self, verdict: Verdict, user: str, channel: str,
                    edit: ProposedEdit | EditRefused | None = None) -> None:
        try:
            result = await self.broker.decide(verdict, edit)
            if result.code == "unknown":
                await self._ephemeral(channel, user, f"keyturn has no request {ui.escape(verdict.request_id)}.")
            elif not result.accepted:
                await self._ephemeral(channel, user,
                                      f":no_entry_sign: Your vote was not counted: {ui.escape(result.message)}")
        except LedgerError:
            log.exception("slack: ledger failure while recording a vote")
            await self._ephemeral(channel, user, "keyturn could not record your vote (ledger unavailable); "
                                                 "nothing was decided. Please try again.")

    async def _ephemeral(self, channel: str, user: str, text: str) -> None:
        if channel:
            await self._call("chat_postEphemeral", channel=channel, user=user, text=text)
        else:
            await self._call("chat_postMessage", channel=user, text=text)

def _clip_error(message: str, limit: int = 150) -> str:
    """A modal's field error (Slack shows a short line)."""
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _well_formed(body: bytes, content_type: str) -> bool:
    """A JSON object, or a form whose `payload` (if any) is a JSON object with a mapping `view` (if any)."""
    try:
        if content_type.startswith("application/json"):
            return isinstance(json.loads(body), dict)
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        if "payload" not in form:
            return True
        payload = json.loads(form["payload"][0])
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(payload, dict) or not isinstance(payload.get("type", ""), str):
        return False
    if any(payload.get(key) is not None and not isinstance(payload[key], dict) for key in _OBJECT_FIELDS):
        return False
    actions = payload.get("actions", [])
    return isinstance(actions, list) and all(isinstance(a, dict) for a in actions)


_OBJECT_FIELDS = ("view", "user", "team", "channel", "container", "message", "enterprise", "state")


def attach_slack(kt: Keyturn, env: dict[str, str]) -> list[BaseRoute]:
    """Enable Slack when configured: add the notifier, start its background work, return its routes."""
    loaded = load_slack(kt.settings.slack, env)
    if loaded is None:
        return []
    config, secrets = loaded
    async def judge(request_id: str, arguments: dict[str, Any]) -> ProposedEdit | EditRefused | None:
        return await judge_edit(kt, request_id, arguments)

    channel = SlackChannel(ledger=kt.ledger, broker=kt.broker, settings=kt.settings, config=config, secrets=secrets,
                           judge=judge)
    kt.add_notifier(channel)
    if kt.checkpointer is not None and config.default_channel:
        kt.checkpointer.add_notifier(channel)  # a daily checkpoint line in the reviewers' channel
    kt.start_soon(channel.run, name="keyturn-slack")
    return channel.routes()
