"""The Microsoft Teams reviewer channel: an Adaptive Card per held call, Approve / Deny as `Action.Execute`.

Teams only delivers and reports. A click arrives as an `adaptiveCard/action` invoke at
`POST /teams/messages`; its Bot Framework JWT is validated (`auth`, never skipped) and the
reviewer is `teams:<tenant>/<aad-object-id>` from the activity, which the config maps to a person;
`ApprovalBroker.decide` alone judges the verdict. The invoke response is the card redrawn with the
outcome. Each sent card's activity id is recorded in the ledger (a `notified` event), and a follower
re-renders the cards of every request that changes, whichever keyturn process changed it (expired,
executed, failed, a vote through another channel), so Teams slowness never holds up a decision.

A standing grant made from a request whose card this process sent is announced by a card of its own, with
**Revoke** (an `Action.Execute` too; a reason is required; `server.approvals.grants.revoke` judges nothing but that
the grant is live: any configured reviewer may end one).

Without a bot, an incoming webhook gets a card whose "Open" link leads to a signed, single-use
decision page (`decision_link`, `decision_page`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

try:
    from microsoft_teams.api.activities.invoke.adaptive_card import AdaptiveCardInvokeActivity
    from microsoft_teams.cards import AdaptiveCard
except ModuleNotFoundError as e:  # the optional `teams` extra is not installed
    from server.errors import ConfigError

    raise ConfigError("the Teams channel needs the Teams SDK: pip install 'keyturn[teams]'") from e
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from server.approvals.grants import revoke
from server.channels.api import submit_verdict
from server.channels.bodies import BodyRefused, read_body
from server.channels.teams import cards as ui
from server.channels.teams.auth import BotFrameworkAuth, reviewer_identity
from server.channels.teams.config import TeamsConfig, TeamsSecrets, load_teams
from server.channels.teams.connector import BotConnector, BotToken, RetryPolicy, post_webhook
from server.channels.teams.decision_link import LinkSigner, ensure_link_secret
from server.channels.teams.decision_page import decision_routes
from server.errors import AuthError, ChannelError, ConfigError, LedgerError
from server.ledger import Store
from server.ledger.checkpoints import Checkpoint, checkpoint_line
from server.models import TERMINAL_STATES, Event, RequestView

if TYPE_CHECKING:
    from server.runtime import Keyturn

log = logging.getLogger(__name__)

MESSAGES_PATH = "/teams/messages"
MAX_ACTIVITY_BYTES = 256 * 1024
UPDATE_KINDS = frozenset({"vote", "approval.granted", "execution.started", *TERMINAL_STATES})
WEBHOOK_FOLLOW_UPS = frozenset({"approval.granted", "denied", "expired", "cancelled", "failed", "abandoned"})
MAX_UPDATE_RETRIES = 5


class TeamsChannel:
    """The Notifier for Teams (bot and/or webhook) and the bot endpoint. `run()` keeps sent cards current."""

    name = "teams"

    def __init__(self, *, ledger: Store, kt: Keyturn, config: TeamsConfig, secrets: TeamsSecrets,
                 signer: LinkSigner | None = None, link_base: str | None = None) -> None:
        self.kt, self.ledger, self.config = kt, ledger, config
        self.retry = RetryPolicy(attempts=config.retries, backoff_s=config.retry_backoff_s)
        self.connector: BotConnector | None = None
        self.auth: BotFrameworkAuth | None = None
        if config.bot_enabled:
            assert config.app_id and config.service_url and secrets.app_password
            token = BotToken(config.resolved_token_url(), config.app_id, secrets.app_password, config.scope,
                             retry=self.retry, timeout_s=config.request_timeout_s)
            self.connector = BotConnector(config.service_url, token, retry=self.retry,
                                          timeout_s=config.request_timeout_s)
            self.auth = BotFrameworkAuth(config.app_id, config.openid_metadata_url, config.issuer,
                                         clock_skew_s=config.clock_skew_s, timeout_s=config.request_timeout_s)
        self.signer, self.link_base = signer, (link_base or "").rstrip("/")
        self._cards: dict[str, tuple[str, str]] = {}  # request id -> (conversation id, activity id)
        self._sent: dict[str, str] = {}  # request id -> digest of the card last sent
        self._local: dict[int, Event] = {}  # changes made in this process (webhook follow-ups)
        self._retry: dict[str, int] = {}  # request id -> failed card updates so far (tried again next round)
        self._posted: set[str] = set()  # requests whose card this process sent: it alone announces their grants
        self._feed = ledger.follow(UPDATE_KINDS | {"grant.created"})

    # -- outbound (Notifier) ---------------------------------------------------------------------

    def decision_url(self, view: RequestView) -> str:
        assert self.signer is not None
        expires = min(view.expires or float("inf"), time.time() + self.config.link_ttl_s)
        return f"{self.link_base}/teams/decide/{self.signer.mint(view.id, expires)}"

    async def request_opened(self, request: RequestView) -> None:
        """Send the card (bot) and/or the link card (webhook); record the bot's activity id in the ledger."""
        failures = []
        if self.connector is not None and self.config.conversation_id:
            card = ui.request_card(request)
            try:
                activity_id = await self.connector.send_card(self.config.conversation_id, card)
            except (ChannelError, ValueError, KeyError) as e:
                failures.append(f"bot: {e}")
            else:
                self._cards[request.id] = (self.config.conversation_id, activity_id)
                self._sent[request.id] = _digest(card)
                self._posted.add(request.id)
                await self.ledger.append("notified", request.id, {
                    "channel": "teams", "conversation_id": self.config.conversation_id, "activity_id": activity_id})
        if self.config.webhook_url:
            try:
                await post_webhook(self.config.webhook_url, ui.request_card(
                    request, interactive=False, open_url=self.decision_url(request)), self.retry,
                    self.config.request_timeout_s)
            except ChannelError as e:
                failures.append(f"webhook: {e}")
        if failures:
            raise ChannelError("could not post to Teams: " + "; ".join(failures))

    async def checkpoint_digest(self, checkpoint: Checkpoint, public_key: str) -> None:
        """A quiet card in the reviewers' conversation (bot) or webhook with the latest signed checkpoint."""
        card = ui.checkpoint_card(checkpoint_line(checkpoint, public_key))
        if self.connector is not None and self.config.conversation_id:
            await self.connector.send_card(self.config.conversation_id, card)
        elif self.config.webhook_url:
            await post_webhook(self.config.webhook_url, card, self.retry, self.config.request_timeout_s)
        else:
            raise ChannelError("no Teams conversation or webhook to post the checkpoint to")

    async def request_changed(self, request: RequestView, event: Event) -> None:
        """Never waits on Teams: the follower picks the change up from the ledger at once."""
        self._local[event.seq] = event
        self._feed.wake()

    # -- keeping cards current -------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the ledger to keep cards current (run in the runtime's task group, restarted if it fails)."""
        await self._feed.start()
        while True:
            await self._feed.wait(self.config.update_interval_s)
            try:
                await self.catch_up()
            except LedgerError as e:
                log.warning("teams: cannot read the ledger: %s", e)

    async def catch_up(self) -> None:
        events = await self._feed.read()
        touched: dict[str, list[Event]] = {}
        for e in events:
            if e.kind == "grant.created" and e.call_id is not None:
                await self._announce_grant(e.call_id, e.payload)
            elif e.call_id is not None:
                touched.setdefault(e.call_id, []).append(e)
        for e in list(self._local.values()):  # reported after this follower had already passed them
            if e.call_id is not None and e.seq <= (self._feed.last_seq or 0):
                touched.setdefault(e.call_id, [])
        for request_id in list(self._retry):
            touched.setdefault(request_id, [])
        for request_id, changes in touched.items():
            await self._refresh(request_id, changes)

    async def _announce_grant(self, grant_id: str, payload: dict[str, Any]) -> None:
        request_id = str(payload.get("request_id") or "")
        if self.connector is None or not self.config.conversation_id or request_id not in self._posted:
            return
        try:
            await self.connector.send_card(self.config.conversation_id, ui.grant_card(grant_id, payload))
        except (ChannelError, ValueError, KeyError) as e:
            log.warning("teams: could not announce grant %s: %s", grant_id, e)

    async def _find_card(self, request_id: str) -> tuple[str, str] | None:
        if request_id not in self._cards:
            for e in await self.ledger.events(request_id):
                if e.kind == "notified" and e.payload.get("channel") == "teams" and e.payload.get("activity_id"):
                    self._cards[request_id] = (str(e.payload["conversation_id"]), str(e.payload["activity_id"]))
        return self._cards.get(request_id)

    async def _refresh(self, request_id: str, changes: list[Event]) -> None:
        local = [self._local.pop(seq) for seq, e in list(self._local.items())
                 if e.call_id == request_id and seq <= (self._feed.last_seq or 0)]
        view = await self.ledger.get_call(request_id)
        if view is None:
            return
        card_ref = await self._find_card(request_id) if self.connector is not None else None
        if card_ref is not None and self.connector is not None:
            card = ui.request_card(view)
            if self._sent.get(request_id) != (digest := _digest(card)):
                try:
                    await self.connector.update_card(card_ref[0], card_ref[1], card)
                    self._sent[request_id] = digest
                    self._retry.pop(request_id, None)
                except (ChannelError, ValueError, KeyError) as e:
                    log.warning("teams: could not update the card of %s: %s", request_id, e)
                    self._retry[request_id] = self._retry.get(request_id, 0) + 1
            if self._retry.get(request_id, 0) > MAX_UPDATE_RETRIES:
                self._retry.pop(request_id, None)
            if view.state in TERMINAL_STATES and request_id not in self._retry:
                self._cards.pop(request_id, None)
                self._sent.pop(request_id, None)
        if self.config.webhook_url and local:
            await self._webhook_follow_up(view, local)

    async def _webhook_follow_up(self, view: RequestView, changes: list[Event]) -> None:
        """Webhook messages cannot be updated: post the outcome, or a fresh link when more votes are needed."""
        assert self.config.webhook_url is not None
        kinds = {e.kind for e in changes}
        if view.state == "pending" and "vote" in kinds:
            card = ui.request_card(view, interactive=False, open_url=self.decision_url(view),
                                   notice="A vote was recorded and more are needed: a new link for the next reviewer.")
        elif kinds & WEBHOOK_FOLLOW_UPS:
            card = ui.request_card(view, interactive=False)
        else:
            return
        try:
            await post_webhook(self.config.webhook_url, card, self.retry, self.config.request_timeout_s)
        except ChannelError as e:
            log.warning("teams: could not post the follow-up for %s: %s", view.id, e)

    # -- inbound: the bot endpoint ---------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = []
        if self.auth is not None:
            routes.append(Route(MESSAGES_PATH, self.messages, methods=["POST"]))
        if self.signer is not None:
            routes += decision_routes(self.kt, self.signer)
        return routes

    async def messages(self, request: Request) -> Response:
        assert self.auth is not None
        try:
            body = await read_body(request, MAX_ACTIVITY_BYTES)  # bounded before the JWT is looked at
        except BodyRefused as e:
            return e.json_response()
        try:
            activity = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            activity = None
        if not isinstance(activity, dict):
            return JSONResponse({"error": "the body must be a JSON activity"}, status_code=400)
        try:
            await self.auth.verify(request.headers.get("authorization"), activity)
        except AuthError as e:
            log.warning("teams: refused an unauthenticated activity: %s", e)
            return JSONResponse({"error": str(e)}, status_code=401)
        if activity.get("type") != "invoke" or activity.get("name") != "adaptiveCard/action":
            conversation = activity.get("conversation") or {}
            log.info("teams: %s activity in conversation %s (serviceUrl %s)", activity.get("type"),
                     conversation.get("id") if isinstance(conversation, dict) else None, activity.get("serviceUrl"))
            return Response(status_code=200)  # installs, messages, conversation updates: nothing to do
        try:
            invoke = AdaptiveCardInvokeActivity.model_validate(activity)
        except ValidationError:
            return JSONResponse(ui.invoke_error(400, "not an Adaptive Card action keyturn understands"))
        try:
            return JSONResponse(await self._on_action(invoke))
        except LedgerError as e:  # the cause, not where the ledger lives (the log has that)
            log.error("a Teams action could not use the ledger: %s", e)
            return JSONResponse(ui.invoke_error(500, f"nothing was decided: keyturn {e.public}"))

    async def _on_action(self, invoke: AdaptiveCardInvokeActivity) -> dict[str, Any]:
        """Report the click as a verdict with the verified identity; answer with the card redrawn for the clicker."""
        data = invoke.value.action.data
        if invoke.value.action.verb == ui.REVOKE_VERB:
            if unknown := sorted(set(data) - ui.REVOKE_FIELDS):
                return ui.invoke_error(400, f"unknown field(s) {', '.join(repr(u[:64]) for u in unknown[:5])}: "
                                            "keyturn refuses what it does not know rather than ignore it")
            return await self._on_revoke(invoke, data)
        verdict = {ui.APPROVE_VERB: "approve", ui.DENY_VERB: "deny", ui.EDIT_VERB: "edit"}.get(
            invoke.value.action.verb or "")
        request_id, reason = data.get("request_id"), data.get(ui.REASON_INPUT)
        if verdict is None or not isinstance(request_id, str):
            return ui.invoke_error(400, "not a keyturn action")
        if unknown := sorted(set(data) - ui.ACTION_FIELDS):
            return ui.invoke_error(400, f"unknown field(s) {', '.join(repr(u[:64]) for u in unknown[:5])}: keyturn "
                                        "refuses what it does not know rather than ignore it")
        view = await self.ledger.get_call(request_id)
        if view is None:
            return ui.invoke_error(404, f"keyturn has no request {request_id}")
        identity = reviewer_identity(invoke)
        if identity is None:
            return ui.invoke_card(ui.request_card(view, notice="Teams did not say who you are; nothing was counted."))
        if verdict == "edit":
            return await self._on_edit(view, identity, data.get(ui.EDIT_ARGUMENTS_INPUT), data.get(ui.EDIT_REASON_INPUT))
        outcome = await submit_verdict(self.kt, request_id, identity, "approve" if verdict == "approve" else "deny",
                                       (reason.strip() or None) if isinstance(reason, str) else reason, channel="teams")
        view = await self.ledger.get_call(request_id) or view
        notice = (f"You {'approved' if verdict == 'approve' else 'denied'}: {outcome.message}." if outcome.accepted
                  else f"Your vote was not counted: {outcome.message}")
        return ui.invoke_card(ui.request_card(view, notice=notice, notice_ok=outcome.accepted))

    async def _on_edit(self, view: RequestView, identity: str, text: Any, reason: Any) -> dict[str, Any]:
        """The edit form: the reviewer's arguments (JSON text) approved as edited, with their reason. The edited call
        is judged again by the gate and the broker (`submit_verdict`); what is wrong with the form is said on the
        card, and nothing is counted."""
        def again(notice: str) -> dict[str, Any]:
            return ui.invoke_card(ui.request_card(view, notice=notice))

        if not isinstance(reason, str) or not reason.strip() or len(reason) > ui.MAX_REASON:
            return again(f"Say why you changed the arguments (at most {ui.MAX_REASON} characters); nothing was "
                         "counted.")
        try:
            arguments = json.loads(text) if isinstance(text, str) and len(text) <= ui.MAX_EDIT_CHARS else None
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            return again("The arguments must be a JSON object (the whole arguments, as they are to run); nothing was "
                         "counted.")
        outcome = await submit_verdict(self.kt, view.id, identity, "approve", reason.strip(), channel="teams",
                                       arguments=arguments)
        current = await self.ledger.get_call(view.id) or view
        notice = (f"You approved the edited call: {outcome.message}." if outcome.accepted
                  else f"Your edit was not counted: {outcome.message}")
        return ui.invoke_card(ui.request_card(current, notice=notice, notice_ok=outcome.accepted))


    async def _on_revoke(self, invoke: AdaptiveCardInvokeActivity, data: dict[str, Any]) -> dict[str, Any]:
        """Revoke a standing grant for the verified reviewer; answer with the grant's card redrawn for them."""
        grant_id, reason = data.get("grant_id"), data.get(ui.REASON_INPUT)
        row = await self.ledger.grant(grant_id) if isinstance(grant_id, str) else None
        if row is None or not isinstance(grant_id, str):
            return ui.invoke_error(404, f"keyturn has no grant {grant_id}")
        spec = json.loads(row["spec"])
        identity = reviewer_identity(invoke)
        person = self.kt.broker.directory.person(identity) if identity is not None else None
        text = reason.strip() if isinstance(reason, str) else ""
        if person is None or identity is None:
            notice = "Not revoked: you are not a configured reviewer (or Teams did not say who you are)."
        elif not text or len(text) > ui.MAX_REASON:
            notice = f"Not revoked: write why (at most {ui.MAX_REASON} characters)."
        else:
            refused = await revoke(self.ledger, grant_id, person=person, reviewer=identity, reason=text,
                                   channel="teams")
            if refused is None:
                return ui.invoke_card(ui.grant_card(grant_id, spec, notice=f"You revoked this grant: {text}",
                                                    notice_ok=True, live=False))
            notice = f"Not revoked: {refused.message}"
        now = await self.ledger.grant(grant_id)
        return ui.invoke_card(ui.grant_card(grant_id, spec, notice=notice,
                                            live=now is not None and now["state"] == "live"))


def _digest(card: AdaptiveCard) -> str:
    return hashlib.sha256(json.dumps(ui.card_json(card), sort_keys=True).encode()).hexdigest()


def attach_teams(kt: Keyturn, env: dict[str, str]) -> list[BaseRoute]:
    """Enable Teams when configured: add the notifier, start its background work, return its routes."""
    loaded = load_teams(kt.settings.teams, env)
    if loaded is None:
        return []
    config, secrets = loaded
    signer, link_base = None, None
    if config.webhook_url:
        key = secrets.link_secret.encode() if secrets.link_secret else ensure_link_secret(kt.settings.db)
        signer = LinkSigner(key)
        link_base = config.public_url or kt.settings.reviewer_api_url or next(iter(kt.http_base_urls), None)
        if not link_base:
            raise ConfigError("teams.webhook_url needs teams.public_url: where reviewers' browsers reach keyturn")
    channel = TeamsChannel(ledger=kt.ledger, kt=kt, config=config, secrets=secrets, signer=signer,
                           link_base=link_base)
    kt.add_notifier(channel)
    if kt.checkpointer is not None and ((channel.connector is not None and config.conversation_id)
                                        or config.webhook_url):
        kt.checkpointer.add_notifier(channel)  # a daily checkpoint card for the reviewers
    kt.start_soon(channel.run, name="keyturn-teams")
    return channel.routes()
