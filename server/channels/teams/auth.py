"""Bot Framework request authentication: the JWT the Bot Connector sends with every activity.

Checked as the Bot Connector spec asks: an RS256-family signature by a key from the OpenID
metadata's `jwks_uri` (the key endorsed for the activity's channel), the issuer, the audience (our
app id), the validity window (with a bounded clock skew), and the `serviceurl` claim equal to the
activity's `serviceUrl`. There is no switch to skip it. The key set is fetched asynchronously and
cached; an unknown key id triggers at most one refresh per `refresh_floor_s`.

Why not the Teams SDK's `TokenValidator`: it lives in `microsoft-teams-apps` (FastAPI, MSAL and a DI
container come with it), fetches keys with `PyJWKClient`, which blocks the event loop, derives the
key URL from the metadata URL by string rewriting instead of reading `jwks_uri`, and does not check
key endorsements. The checks are the same; PyJWT does the cryptography here as it does there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import jwt

from server.channels.teams.config import BOT_FRAMEWORK_ISSUER, BOT_FRAMEWORK_OPENID, require_https
from server.errors import AuthError, ConfigError

if TYPE_CHECKING:
    from microsoft_teams.api.activities.invoke.adaptive_card import AdaptiveCardInvokeActivity

ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})


def same_service_url(a: str, b: str) -> bool:
    return a.rstrip("/").lower() == b.rstrip("/").lower()


@dataclass
class BotFrameworkAuth:
    """Validates the `Authorization: Bearer <jwt>` of an inbound Bot Framework activity."""

    app_id: str
    openid_metadata_url: str = BOT_FRAMEWORK_OPENID
    issuer: str = BOT_FRAMEWORK_ISSUER
    clock_skew_s: float = 300.0
    cache_s: float = 24 * 3600.0
    refresh_floor_s: float = 300.0
    timeout_s: float = 10.0
    _keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    _algorithms: frozenset[str] = ASYMMETRIC_ALGORITHMS
    _fetched: float = 0.0
    _lock: anyio.Lock = field(default_factory=anyio.Lock)

    def __post_init__(self) -> None:
        require_https(self.openid_metadata_url, "openid_metadata_url")
        if not self.app_id:
            raise ConfigError("teams.app_id is required to validate Bot Framework tokens")

    async def verify(self, authorization: str | None, activity: Mapping[str, Any]) -> dict[str, Any]:
        """The token's claims, or AuthError. `activity` is the parsed body the token came with."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("a Bot Framework bearer token is required")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as e:
            raise AuthError(f"malformed token: {e}") from e
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("the token names no signing key")
        jwk = await self._key(kid)
        if alg not in self._algorithms:
            raise AuthError(f"signing algorithm {alg!r} is not accepted")
        channel = activity.get("channelId")
        endorsements = jwk.get("endorsements")
        if isinstance(endorsements, list) and channel not in endorsements:
            raise AuthError(f"the signing key is not endorsed for channel {channel!r}")
        try:
            key = jwt.PyJWK.from_dict(jwk, algorithm=alg)
            claims: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=[alg], audience=self.app_id, issuer=self.issuer,
                leeway=self.clock_skew_s, options={"require": ["exp", "iss", "aud"]})
        except (jwt.InvalidTokenError, jwt.PyJWKError) as e:
            raise AuthError(f"invalid Bot Framework token: {e}") from e
        service_url = activity.get("serviceUrl")
        claimed = claims.get("serviceurl")
        if not (isinstance(service_url, str) and isinstance(claimed, str) and same_service_url(claimed, service_url)):
            raise AuthError("the token's serviceurl claim does not match the activity's serviceUrl")
        return claims

    async def _key(self, kid: str) -> dict[str, Any]:
        async with self._lock:
            now = time.monotonic()
            stale = not self._fetched or now - self._fetched > self.cache_s
            unknown = kid not in self._keys and now - self._fetched > self.refresh_floor_s
            if stale or unknown:
                await self._refresh()
            jwk = self._keys.get(kid)
        if jwk is None:
            raise AuthError("the token is signed by an unknown key")
        return jwk

    async def _refresh(self) -> None:
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as http:
                meta = await _get_json(http, self.openid_metadata_url)
                jwks_uri = meta.get("jwks_uri")
                if not isinstance(jwks_uri, str):
                    raise AuthError("the OpenID metadata names no jwks_uri")
                require_https(jwks_uri, "jwks_uri (from the OpenID metadata)")
                keys = (await _get_json(http, jwks_uri)).get("keys")
        except (httpx.HTTPError, ValueError, ConfigError) as e:
            raise AuthError(f"cannot fetch the Bot Framework signing keys: {e}") from e
        if not isinstance(keys, list):
            raise AuthError("the key set has no keys")
        supported = meta.get("id_token_signing_alg_values_supported")
        algorithms = ASYMMETRIC_ALGORITHMS & set(supported) if isinstance(supported, list) else ASYMMETRIC_ALGORITHMS
        self._algorithms = frozenset(algorithms)
        self._keys = {k["kid"]: k for k in keys if isinstance(k, dict) and isinstance(k.get("kid"), str)
                      and k.get("kty") == "RSA"}
        self._fetched = time.monotonic()


async def _get_json(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    response = await http.get(url)
    response.raise_for_status()
    data = json.loads(response.content)
    if not isinstance(data, dict):
        raise ValueError(f"{url} did not return a JSON object")
    return data


def reviewer_identity(invoke: AdaptiveCardInvokeActivity) -> str | None:
    """`teams:<tenant>/<aad-object-id>`, lower-cased, or None when the activity does not say who clicked.

    The tenant is `conversation.tenantId` and `channelData.tenant.id`; if both are given they must agree.
    The activity body is trusted because its JWT was verified (only the Bot Connector can send it).
    """
    oid = invoke.from_.aad_object_id
    channel_tenant = invoke.channel_data.tenant.id if invoke.channel_data and invoke.channel_data.tenant else None
    tenants = {t.lower() for t in (invoke.conversation.tenant_id, channel_tenant) if t}
    if not oid or len(tenants) != 1:
        return None
    return f"teams:{tenants.pop()}/{oid.lower()}"
