"""Fixtures for the Teams channel: a fake Bot Connector on 127.0.0.1 (token endpoint, OpenID metadata and
JWKS with a test RSA key, send/update activity, an incoming webhook), Bot Framework JWTs signed with that
key, and a keyturn home configured for Teams."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from server.canonical import sha256_hex
from tests.conftest import TOKENS, Home
from tests.helpers import eventually

APP_ID = "00000000-0000-4000-8000-00000000b07a"
APP_PASSWORD = "test-app-password-not-a-secret"
LINK_SECRET = "test-link-secret-0123456789abcdef"
TENANT = "11111111-2222-4333-8444-555555555555"
ISSUER = "https://api.botframework.com"
CONVERSATION = "19:keyturn-reviews@thread.tacv2"
OIDS = {p: f"aaaaaaaa-0000-4000-8000-00000000000{i}" for i, p in enumerate(("alice", "carol", "dave", "bob"), 1)}


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class FakeTeams:
    """What the bot sees of Microsoft: records everything, answers like the real services (roughly)."""

    key: rsa.RSAPrivateKey = field(default_factory=new_key)
    kid: str = "test-key-1"
    endorsements: tuple[str, ...] = ("msteams",)
    base: str = ""
    token_requests: list[dict[str, str]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    updated: list[dict[str, Any]] = field(default_factory=list)
    webhook_posts: list[dict[str, Any]] = field(default_factory=list)
    failures: deque[int] = field(default_factory=deque)  # statuses for the next connector/webhook calls
    always_fail: int | None = None
    tokens: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def service_url(self) -> str:
        return self.base + "/"

    def jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        return {**jwk, "kid": self.kid, "use": "sig", "endorsements": list(self.endorsements)}

    def jwt(self, *, key: rsa.RSAPrivateKey | None = None, kid: str | None = None, **overrides: Any) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": APP_ID, "serviceurl": self.service_url, "nbf": now - 5, "iat": now - 5,
                  "exp": now + 3600, **overrides}
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": kid or self.kid})

    def next_failure(self) -> int | None:
        with self.lock:
            return self.failures.popleft() if self.failures else self.always_fail

    def cards_sent(self) -> list[dict[str, Any]]:
        with self.lock:
            return [s["activity"]["attachments"][0]["content"] for s in self.sent]


def _handler(fake: FakeTeams) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _fail(self) -> bool:
            status = fake.next_failure()
            if status is None:
                return False
            self._reply(status, {"error": {"code": "Throttled" if status == 429 else "ServiceError"}},
                        {"Retry-After": "0"} if status == 429 else None)
            return True

        def _authorised(self) -> bool:
            scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
            with fake.lock:
                ok = scheme == "Bearer" and token in fake.tokens
            if not ok:
                self._reply(401, {"error": {"code": "Unauthorized"}})
            return ok

        def do_GET(self) -> None:
            if self.path == "/openid":
                self._reply(200, {"issuer": ISSUER, "jwks_uri": fake.base + "/keys",
                                  "id_token_signing_alg_values_supported": ["RS256"]})
            elif self.path == "/keys":
                self._reply(200, {"keys": [fake.jwk()]})
            else:
                self._reply(404, {})

        def do_POST(self) -> None:
            path, body = urlsplit(self.path).path, self._body()
            if path == "/token":
                form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
                with fake.lock:
                    fake.token_requests.append(form)
                if form.get("client_id") != APP_ID or form.get("client_secret") != APP_PASSWORD:
                    self._reply(401, {"error": "invalid_client"})
                    return
                token = "bot-token-" + uuid.uuid4().hex
                with fake.lock:
                    fake.tokens.add(token)
                self._reply(200, {"token_type": "Bearer", "expires_in": 3600, "access_token": token})
            elif path == "/webhook":
                if not self._fail():
                    with fake.lock:
                        fake.webhook_posts.append(json.loads(body))
                    self._reply(200, None)
            elif path.startswith("/v3/conversations/") and path.endswith("/activities"):
                if self._authorised() and not self._fail():
                    conversation = path.split("/")[3]
                    with fake.lock:
                        activity_id = f"1:act-{len(fake.sent) + 1}"
                        fake.sent.append({"conversation_id": conversation, "id": activity_id,
                                          "activity": json.loads(body)})
                    self._reply(201, {"id": activity_id})
            else:
                self._reply(404, {})

        def do_PUT(self) -> None:
            parts, body = urlsplit(self.path).path.split("/"), self._body()
            if len(parts) != 6 or parts[2] != "conversations":
                self._reply(404, {})
            elif self._authorised() and not self._fail():
                with fake.lock:
                    fake.updated.append({"conversation_id": parts[3], "activity_id": parts[5],
                                         "activity": json.loads(body)})
                self._reply(200, {"id": parts[5]})

    return Handler


@pytest.fixture
def fake_teams() -> Iterator[FakeTeams]:
    fake = FakeTeams()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(5)


def teams_config(fake: FakeTeams, **extra: Any) -> dict[str, Any]:
    return {"app_id": APP_ID, "tenant_id": TENANT, "service_url": fake.service_url,
            "conversation_id": CONVERSATION, "token_url": fake.base + "/token",
            "openid_metadata_url": fake.base + "/openid", "retry_backoff_s": 0.05, "update_interval_s": 0.2,
            **extra}


def reviewers() -> list[dict[str, Any]]:
    api = [{"identity": f"api:{p}", "person": p, "token_sha256": sha256_hex(TOKENS[p])}
           for p in ("alice", "carol", "dave", "bob")]
    return api + [{"identity": f"teams:{TENANT}/{oid}", "person": p} for p, oid in OIDS.items()]


@dataclass
class TeamsHome:
    home: Home
    fake: FakeTeams
    base: str = ""

    def serve(self, teams: dict[str, Any] | None = None, **config: Any) -> str:
        self.home.write_config(teams=teams if teams is not None else teams_config(self.fake),
                               reviewers=reviewers(), **config)
        self.base = self.home.serve_http()
        return self.base

    def invoke(self, request_id: str, verb: str, person: str | None, reason: str | None = None,
               **activity: Any) -> dict[str, Any]:
        data: dict[str, Any] = {"request_id": request_id}
        if reason is not None:
            data["reason"] = reason
        body: dict[str, Any] = {
            "type": "invoke", "name": "adaptiveCard/action", "id": uuid.uuid4().hex, "channelId": "msteams",
            "serviceUrl": self.fake.service_url, "timestamp": "2026-01-01T00:00:00Z",
            "from": {"id": f"29:{person}", "name": person, "aadObjectId": OIDS.get(person or "", None)},
            "recipient": {"id": f"28:{APP_ID}", "name": "keyturn"},
            "conversation": {"id": CONVERSATION, "conversationType": "channel", "tenantId": TENANT},
            "channelData": {"tenant": {"id": TENANT}, "channel": {"id": CONVERSATION}},
            "value": {"action": {"type": "Action.Execute", "verb": f"keyturn.{verb}", "data": data},
                      "trigger": "manual"},
        }
        body.update(activity)
        return body

    async def post(self, activity: dict[str, Any], token: str | None = "valid") -> httpx2.Response:
        headers = {"Authorization": f"Bearer {self.fake.jwt() if token == 'valid' else token}"} if token else {}
        async with httpx2.AsyncClient(timeout=30) as http:
            return await http.post(self.base + "/teams/messages", json=activity, headers=headers)

    async def wait_card(self, tool: str, n: int = 1, within: float = 20) -> dict[str, Any]:
        """The n-th card sent for `tool` (1-based)."""
        def nth() -> dict[str, Any] | None:
            cards = [c for c in self.fake.cards_sent() if f'"{tool}"' in json.dumps(c)]
            return cards[n - 1] if len(cards) >= n else None

        return await eventually(nth, within=within)  # type: ignore[no-any-return]

    async def wait_update(self, activity_id: str, title: str, within: float = 20) -> dict[str, Any]:
        """The first update of the card `activity_id` whose title contains `title`."""
        def titled() -> dict[str, Any] | None:
            with self.fake.lock:
                updates = [u for u in self.fake.updated if u["activity_id"] == activity_id]
            cards = (u["activity"]["attachments"][0]["content"] for u in updates)
            return next((dict(card) for card in cards if title in card["body"][0]["text"]), None)

        return await eventually(titled, within=within)  # type: ignore[no-any-return]


@pytest.fixture
def teams_home(home: Home, fake_teams: FakeTeams, monkeypatch: pytest.MonkeyPatch) -> TeamsHome:
    monkeypatch.setenv("KEYTURN_TEAMS_APP_PASSWORD", APP_PASSWORD)
    monkeypatch.setenv("KEYTURN_LINK_SECRET", LINK_SECRET)
    return TeamsHome(home=home, fake=fake_teams)


def request_id_of(card: dict[str, Any]) -> str:
    return str(card["actions"][0]["data"]["request_id"])


def card_text(card: dict[str, Any]) -> str:
    """Every piece of text on a card, in order (TextBlock text and TextRun text)."""
    out: list[str] = []
    for element in card.get("body", []):
        if "text" in element:
            out.append(element["text"])
        out += [i["text"] for i in element.get("inlines", []) if isinstance(i, dict)]
    return "\n".join(out)
