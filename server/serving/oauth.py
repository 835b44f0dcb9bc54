"""keyturn as an OAuth 2.1 resource server (the MCP authorization spec): agents' JWT access tokens verified
against the issuer's published keys, mapped to principals.

The `mcp` SDK does the protocol's part through its public auth support: the bearer check on `/mcp`, `401` with
`WWW-Authenticate` naming the protected resource metadata, `403 insufficient_scope`, and
`/.well-known/oauth-protected-resource/mcp` naming the authorization server. This module is the `TokenVerifier`
it calls: PyJWT checks the signature (a key of the issuer's JWKS; public-key algorithms only), `iss`, `aud`,
`exp`, `nbf` and `iat`; keyturn maps the token to a principal. Every failure is a refusal (None), never an error
that lets a call through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import anyio
import jwt
from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.auth.settings import AuthSettings
from pydantic import AnyHttpUrl

from server.canonical import sha256_hex
from server.config import OAuthConfig, https_or_loopback

log = logging.getLogger(__name__)

JWKS_MAX_BYTES = 512 * 1024
TOKEN_MAX_BYTES = 16 * 1024
METADATA_PATHS = ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration")


class Jwks:
    """An issuer's signing keys: fetched when first needed, again when older than `max_age_s`, and again when a
    token names a key id not in the set, but not more often than every `min_refresh_s` (a flood of tokens with
    made-up key ids cannot make keyturn hammer the issuer). Keys rotate without a restart. Without `uri`, the
    issuer's metadata (`/.well-known/...`) names it."""

    def __init__(self, issuer: str, uri: str | None, *, min_refresh_s: float, max_age_s: float) -> None:
        self.issuer = issuer
        self.uri = uri
        self.min_refresh_s = min_refresh_s
        self.max_age_s = max_age_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched = -float("inf")
        self._lock = anyio.Lock()

    async def _refresh(self) -> None:
        if self.uri is None:
            meta = await issuer_metadata(self.issuer)
            if not isinstance(meta.get("jwks_uri"), str):
                raise ValueError(f"the issuer {self.issuer} publishes no jwks_uri")
            self.uri = https_or_loopback(meta["jwks_uri"])
        data = await get_json(self.uri)
        keys: dict[str, jwt.PyJWK] = {}
        for entry in data.get("keys", []) if isinstance(data, dict) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
                continue  # a key type or algorithm keyturn does not use
            keys[str(entry.get("kid", ""))] = key
        self._keys = keys
        self._fetched = time.monotonic()

    async def key(self, kid: str) -> jwt.PyJWK | None:
        now = time.monotonic()
        async with self._lock:
            stale = now - self._fetched > self.max_age_s
            missing = kid not in self._keys and now - self._fetched >= self.min_refresh_s
            if stale or missing:
                try:
                    await self._refresh()
                except Exception as e:  # keep the keys it has; a token it cannot check is refused
                    self._fetched = now  # (and do not try again before min_refresh_s)
                    log.warning("could not fetch the keys of %s: %s", self.issuer, e)
            return self._keys.get(kid)


async def get_json(url: str, *, data: Mapping[str, str] | None = None, auth: tuple[str, str] | None = None,
                   bearer: str | None = None) -> Any:
    """GET (or, with `data`, POST a form to) `url` and read its JSON answer, bounded in size; no redirects.
    `bearer`: an access token to send (a provider's UserInfo endpoint)."""
    import httpx2

    async with httpx2.AsyncClient(timeout=10, follow_redirects=False) as http:
        if data is None:
            headers = {"Accept": "application/json"}
            if bearer is not None:
                headers["Authorization"] = f"Bearer {bearer}"
            r = await http.get(https_or_loopback(url), headers=headers)
        else:
            extra: dict[str, Any] = {"auth": auth} if auth is not None else {}
            r = await http.post(https_or_loopback(url), data=dict(data), headers={"Accept": "application/json"}, **extra)
    if len(r.content) > JWKS_MAX_BYTES:
        raise ValueError(f"{url} sent more than {JWKS_MAX_BYTES} bytes")
    if r.status_code != 200:
        raise ValueError(f"{url} answered HTTP {r.status_code}")
    return r.json()


async def issuer_metadata(issuer: str) -> dict[str, Any]:
    """The issuer's metadata (RFC 8414, else OpenID Connect discovery), checked to be its own (`issuer` equal)."""
    base = issuer.rstrip("/")
    for path in METADATA_PATHS:
        try:
            meta = await get_json(base + path)
        except Exception:  # try the other well-known document
            continue
        if isinstance(meta, dict) and meta.get("issuer") == issuer:
            return meta
    raise ValueError(f"the issuer {issuer} publishes no metadata of its own at {', '.join(METADATA_PATHS)}")


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


class KeyturnTokenVerifier(TokenVerifier):
    """Static agent tokens (by their sha256), then JWT access tokens from the configured issuer."""

    def __init__(self, config: OAuthConfig, static_agents: Mapping[str, tuple[str, str | None]]) -> None:
        self.config = config
        self.static = static_agents  # sha256(token) -> (principal, on_behalf_of)
        self.static_names = {name for name, _ in static_agents.values()}
        self.jwks = Jwks(config.issuer, config.jwks_uri, min_refresh_s=config.jwks_min_refresh_s,
                         max_age_s=config.jwks_max_age_s)
        self.audiences = [config.resource, *config.audiences]

    def _token(self, principal: str, on_behalf_of: str | None, scopes: list[str], expires: int | None,
               subject: str | None, issuer: str | None, token: str) -> AccessToken:
        claims: dict[str, Any] = {"keyturn_on_behalf_of": on_behalf_of}
        if issuer is not None:
            claims["iss"] = issuer
        return AccessToken(token=sha256_hex(token), client_id=principal, scopes=scopes, expires_at=expires,
                           resource=self.config.resource, subject=subject, claims=claims)

    async def verify_token(self, token: str) -> AccessToken | None:
        found = self.static.get(sha256_hex(token))
        if found is not None:  # a static agent token: trusted with the scopes keyturn requires
            return self._token(found[0], found[1], list(self.config.scopes), None, None, None, token)
        if len(token) > TOKEN_MAX_BYTES:
            return None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None
        if header.get("alg") not in self.config.algorithms:
            return None
        key = await self.jwks.key(str(header.get("kid", "")))
        if key is None:
            return None
        try:
            claims = jwt.decode(
                token, key=key, algorithms=list(self.config.algorithms), audience=self.audiences,
                issuer=self.config.issuer, leeway=self.config.leeway_s,
                options={"require": ["exp", "iss", "aud"], "verify_signature": True, "verify_exp": True,
                         "verify_nbf": True, "verify_iat": True, "verify_aud": True, "verify_iss": True})
        except jwt.PyJWTError as e:
            log.info("an agent's access token was refused: %s", type(e).__name__)
            return None
        principal = _claim(claims, self.config.principal_claim)
        if not isinstance(principal, str) or not principal or len(principal) > 200:
            return None
        if principal in self.static_names:  # an issuer's client may not take a static agent's name (and rules)
            log.warning("an access token naming the static agent %r as its principal was refused", principal)
            return None
        on_behalf_of = None
        if self.config.on_behalf_of_claim:
            raw = _claim(claims, self.config.on_behalf_of_claim)
            on_behalf_of = raw if isinstance(raw, str) and raw else None
        scope = claims.get("scope", claims.get("scp", ""))
        scopes = scope.split() if isinstance(scope, str) else [s for s in scope if isinstance(s, str)] \
            if isinstance(scope, list) else []
        return self._token(principal, on_behalf_of, scopes, int(claims["exp"]), claims.get("sub"),
                           claims.get("iss"), token)


def auth_settings(config: OAuthConfig) -> AuthSettings:
    """The SDK's settings for a resource server: the authorization server to name, keyturn's resource URL, the
    scopes every agent's token must carry. The audience is checked by the verifier (PyJWT, `aud`)."""
    return AuthSettings(issuer_url=AnyHttpUrl(config.issuer), resource_server_url=AnyHttpUrl(config.resource),
                        required_scopes=list(config.scopes) or None, validate_token_resource=False)
