"""keyturn's configuration: one frozen pydantic model, parsed from YAML in one place.

Every section is typed, the channels' and the proxy's too (`SlackConfig`, `TeamsConfig`, `ProxyConfig`, each
beside the code it configures), so a mistake anywhere in the file is refused when it is loaded, naming the key,
before anything starts. Secrets never live in the file in plain text: tokens are given as sha256 digests
(`token_sha256`) or read from a named environment variable at the edge (`token_env`); the channels' tokens
come from the environment only (`load_slack`, `load_teams`).
"""

from __future__ import annotations

import difflib
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.canonical import sha256_hex
from server.channels.slack.config import SlackConfig
from server.channels.teams.config import TeamsConfig
from server.errors import ConfigError, problem_text
from server.proxy.config import ProxyConfig


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Person(_Strict):
    """A human who may review. `groups` are the policy's approver groups."""

    groups: tuple[str, ...] = ()
    email: str | None = None


class Agent(_Strict):
    """An agent principal, authenticated over HTTP by a bearer token."""

    name: str
    token_sha256: str | None = None
    token_env: str | None = None
    on_behalf_of: str | None = None  # a person this agent acts for: that person can't approve its calls

    @model_validator(mode="after")
    def _one_token(self) -> Agent:
        if not (self.token_sha256 or self.token_env):
            raise ValueError(f"agent {self.name!r} needs token_sha256 or token_env")
        return self


class Reviewer(_Strict):
    """A verified reviewer identity (`api:<name>`, `slack:<team>/<user>`, `teams:<tenant>/<oid>`) -> person."""

    identity: str
    person: str
    token_sha256: str | None = None  # api: identities only
    token_env: str | None = None

    @field_validator("identity")
    @classmethod
    def _identity_shape(cls, v: str) -> str:
        kind, sep, rest = v.partition(":")
        if not sep or not rest or kind not in {"api", "slack", "teams", "web", "oidc"}:
            raise ValueError(f"reviewer identity {v!r} must look like api:<name>, slack:<team>/<user>, "
                             "teams:<tenant>/<oid> or oidc:<email or subject>")
        return v


class ToolPack(_Strict):
    """A module of guarded tools to load, with its options (e.g. `tools.sql` with `database:`)."""

    module: str
    options: dict[str, Any] = Field(default_factory=dict)


class StdioIdentity(_Strict):
    principal: str = "local"
    on_behalf_of: str | None = None


class Checkpoints(_Strict):
    """Signed checkpoints of the ledger's chain head (`server.ledger.checkpoints`) and the witnesses they go to.

    A checkpoint is made when `every_events` events were appended since the last one, or `every_s` seconds
    passed with anything appended, and at shutdown. The signing key is `key_file` (default `<db>.checkpoint-key`,
    made on first start, mode 0600) or the base64 Ed25519 private key in the environment variable `key_env`.
    Witnesses, each optional: `witness_file` (append-only JSON lines), `witness_url` (an HTTP POST of the JSON).
    """

    enabled: bool = True
    every_events: int = Field(default=1000, ge=1)
    every_s: float = Field(default=60.0, gt=0)
    key_file: Path | None = None
    key_env: str | None = None
    witness_file: Path | None = None
    witness_url: str | None = None
    witness_timeout_s: float = Field(default=5.0, gt=0)
    witness_retries: int = Field(default=3, ge=1)

    @field_validator("witness_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"witness_url {v!r} must be an http:// or https:// URL")
        return v


class Telemetry(_Strict):
    """OpenTelemetry. The MCP SDK's server opens a span for every message it serves; keyturn keeps that only when
    traces are exported. `traces`: `auto` (the default) keeps the spans when the standard OpenTelemetry environment
    says traces go somewhere (`OTEL_TRACES_EXPORTER` other than `none`, `OTEL_EXPORTER_OTLP_ENDPOINT` or
    `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_TRACES_EXPORTER=none` turns them off), `on` always keeps them,
    `off` never does."""

    traces: Literal["auto", "on", "off"] = "auto"

    @field_validator("traces", mode="before")
    @classmethod
    def _yaml_switch(cls, v: Any) -> Any:
        # YAML reads a bare on / off as true / false.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    def traces_exported(self, environ: Mapping[str, str]) -> bool:
        """Whether the SDK's per-message spans are kept, given the process environment."""
        if self.traces != "auto":
            return self.traces == "on"
        exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        if exporter == "none":
            return False
        return bool(exporter or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
                    or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip())


def https_or_loopback(url: str) -> str:
    """`url` when it is https:// (or http:// to a loopback host), else `ValueError`: identity providers' keys,
    tokens and metadata never travel in clear."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if url.startswith("https://") or (url.startswith("http://") and host in ("localhost", "127.0.0.1", "::1")):
        return url
    raise ValueError(f"{url!r} must be an https:// URL (http:// only on loopback)")


class OAuthConfig(_Strict):
    """Agents authenticated by OAuth 2.1 access tokens (JWTs), keyturn being the resource server of the MCP
    authorization spec. A token must be signed by a key of the issuer's JWKS (fetched over HTTPS, cached, fetched
    again when a token names a key it does not have, at most every `jwks_min_refresh_s`), with an allowed
    algorithm, `iss` equal to `issuer`, `aud` naming `resource` (or one of `audiences`), not expired, and carrying
    every scope of `scopes`. Its `principal_claim` (default `sub`) names the principal; `on_behalf_of_claim`, when
    set, the person it acts for (a dotted path such as `act.sub` reaches into an object). Static agent tokens
    (`agents:`) keep working beside it; a token whose principal is a static agent's name is refused."""

    issuer: str
    resource: str  # keyturn's MCP endpoint as agents reach it (https://keyturn.example.com/mcp): the audience
    jwks_uri: str | None = None  # default: read from the issuer's metadata (/.well-known/...)
    audiences: tuple[str, ...] = ()  # more accepted audiences than `resource`
    scopes: tuple[str, ...] = ()
    principal_claim: str = "sub"
    on_behalf_of_claim: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "EdDSA")
    leeway_s: float = Field(default=30.0, ge=0, le=300)
    jwks_min_refresh_s: float = Field(default=30.0, ge=0)
    jwks_max_age_s: float = Field(default=3600.0, gt=0)

    @field_validator("issuer", "resource", "jwks_uri")
    @classmethod
    def _https(cls, v: str | None) -> str | None:
        return None if v is None else https_or_loopback(v)

    @field_validator("algorithms")
    @classmethod
    def _asymmetric(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        allowed = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
        wrong = [a for a in v if a not in allowed]
        if wrong or not v:
            raise ValueError(f"algorithms must be public-key ones from {sorted(allowed)}; got {wrong or 'none'}")
        return v


class SsoConfig(_Strict):
    """Reviewers sign in to the web inbox through the company's OpenID Connect provider (authorization code with
    PKCE). The ID token's `claim` (`email`, verified, by default; or `sub`) gives the identity `oidc:<value>`,
    which `reviewers:` maps to a person like any other identity. `client_secret_env` names the environment variable
    holding the client's secret (a confidential client); without it keyturn is a public client (PKCE alone).
    `redirect_url` is keyturn's callback as browsers reach it: `https://keyturn.example.com/login/sso/callback`.
    Signing out of keyturn signs out at the provider too when it offers RP-initiated logout (`end_session_endpoint`),
    coming back to `post_logout_redirect_url` (keyturn's `/login` beside `redirect_url` by default; register it at
    the provider); `provider_logout: false` ends keyturn's session only."""

    issuer: str
    client_id: str
    redirect_url: str
    client_secret_env: str | None = None
    claim: Literal["email", "sub"] = "email"
    scopes: tuple[str, ...] = ("openid", "email")
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "EdDSA")
    leeway_s: float = Field(default=30.0, ge=0, le=300)
    label: str = "single sign-on"  # the sign-in button says "Sign in with <label>"
    provider_logout: bool = True
    post_logout_redirect_url: str | None = None

    @property
    def after_logout_url(self) -> str:
        """Where the provider sends the browser back after signing out: keyturn's sign-in page."""
        if self.post_logout_redirect_url:
            return self.post_logout_redirect_url
        parts = urllib.parse.urlsplit(self.redirect_url)
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/login", "", ""))

    @field_validator("issuer", "redirect_url", "post_logout_redirect_url")
    @classmethod
    def _https(cls, v: str | None) -> str | None:
        return None if v is None else https_or_loopback(v)

    @field_validator("algorithms")
    @classmethod
    def _asymmetric(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return OAuthConfig._asymmetric(v)

    @field_validator("redirect_url")
    @classmethod
    def _callback(cls, v: str) -> str:
        if urllib.parse.urlsplit(v).path != "/login/sso/callback":
            raise ValueError(f"redirect_url {v!r} must end in keyturn's callback, /login/sso/callback")
        return v


class MetricsConfig(_Strict):
    """Prometheus metrics at `/metrics` (see `server.metrics`). On the HTTP server's own port by default; `listen`
    (`HOST:PORT`) serves them on a port of their own instead (and then for a stdio process too). `token_env`: a
    scraper must send this environment variable's value as a bearer token. A port of their own that is not on
    loopback needs one."""

    enabled: bool = True
    listen: str | None = None
    token_env: str | None = None


class AuditSinkConfig(_Strict):
    """Every ledger event, as it is appended, POSTed to an HTTP collector (a SIEM's): JSON lines, in batches of at most
    `batch` events, in order. Delivery is at least once: a batch is sent again until the collector answers 2xx, and
    only then is the stored cursor (`cursor_file`, default `<db>.audit-sink-cursor`) moved past it, so a restart
    resumes where delivery stopped and a batch cut short by a crash is sent again (collectors drop repeats by `seq`).
    `start`: where a sink with no cursor yet begins, `first` (the whole ledger) or `head` (what is appended from now).
    The bearer token, if the collector wants one, comes from the environment variable `token_env`."""

    url: str
    token_env: str | None = None
    batch: int = Field(default=100, ge=1, le=10_000)
    timeout_s: float = Field(default=10.0, gt=0)
    cursor_file: Path | None = None
    start: Literal["first", "head"] = "first"

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"audit_sink.url {v!r} must be an http:// or https:// URL")
        return v


class Settings(_Strict):
    """Everything a keyturn process needs, resolved. Built by `load_settings` or directly in code."""

    db: Path = Path("keyturn.db")
    """The SQLite ledger file; with a PostgreSQL ledger, where the files kept beside a ledger live (the local reviewer
    token, the checkpoint key): `keyturn.db.*` in the working directory."""
    database_url: str | None = Field(default=None, repr=False)
    """A `postgresql://` ledger (`db: postgresql://...`, `--db` or `KEYTURN_DB`); None: the SQLite file `db`."""
    policy: Path | None = None  # None: the shipped policies/default.yaml
    config_file: Path | None = None
    people: dict[str, Person] = Field(default_factory=dict)
    agents: tuple[Agent, ...] = ()
    reviewers: tuple[Reviewer, ...] = ()
    stdio: StdioIdentity = StdioIdentity()
    tools: tuple[ToolPack, ...] = (ToolPack(module="tools.sql"),)
    progress_interval_s: float = 10.0
    poll_interval_s: float = 0.25
    rejoin_window_s: float | None = Field(default=None, ge=0)
    """How long a held call whose keyturn instance died stays open for the agent's retry on another instance. None:
    0 on SQLite (a process on this machine is known dead at once), 120 s on PostgreSQL (by leases)."""
    reviewer_api_url: str | None = None  # the reviewer API as reviewers reach it: Teams links, a trusted origin, a self-target
    allowed_hosts: tuple[str, ...] = ()  # extra Host header values accepted on the HTTP app
    slack: SlackConfig | None = None  # None: no `slack:` section (tokens in the environment may still turn Slack on)
    teams: TeamsConfig | None = None  # None: no Teams channel
    proxy: ProxyConfig = ProxyConfig()  # `keyturn proxy`'s upstreams and timeouts
    checkpoints: Checkpoints = Checkpoints()
    telemetry: Telemetry = Telemetry()
    audit_sink: AuditSinkConfig | None = None  # None: events are not streamed anywhere
    metrics: MetricsConfig = MetricsConfig()
    oauth: OAuthConfig | None = None  # None: agents use static tokens only
    sso: SsoConfig | None = None  # None: reviewers sign in to the inbox with their reviewer token

    @model_validator(mode="before")
    @classmethod
    def _postgres_url(cls, data: Any) -> Any:
        # `db: postgresql://...` selects the PostgreSQL store; `db` then names only where the files beside it live.
        if isinstance(data, dict) and isinstance(data.get("db"), str) and data["db"].startswith(POSTGRES_SCHEMES):
            data = {**data, "database_url": data["db"], "db": "keyturn.db"}
        return data

    @property
    def ledger_name(self) -> str:
        """The ledger as a banner or an error shows it (a PostgreSQL URL without its password)."""
        return safe_url(self.database_url) if self.database_url else str(self.db)

    @field_validator("slack", "teams", mode="before")
    @classmethod
    def _empty_section(cls, v: Any) -> Any:
        return None if v == {} else v  # `slack: {}` is no section, as an absent one

    @model_validator(mode="after")
    def _references(self) -> Settings:
        for r in self.reviewers:
            if r.person not in self.people:
                raise ValueError(f"reviewer {r.identity!r} names unknown person {r.person!r}")
        names = [a.name for a in self.agents]
        if len(names) != len(set(names)):
            raise ValueError("agent names must be unique")
        ids = [r.identity for r in self.reviewers]
        if len(ids) != len(set(ids)):
            raise ValueError("reviewer identities must be unique")
        return self

    @property
    def groups(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for name, person in self.people.items():
            for g in person.groups:
                out.setdefault(g, set()).add(name)
        return out

    def policy_path(self) -> Path:
        return self.policy if self.policy is not None else default_policy_path()


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(POSTGRES_SCHEMES)


def safe_url(url: str) -> str:
    """A database URL with its password replaced by `***`: what banners, logs and errors show."""
    try:
        parts = urlsplit(url)
        password, port = parts.password, parts.port
    except ValueError:
        return url.split("://", 1)[0] + "://***"
    if password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def default_policy_path() -> Path:
    return Path(__file__).resolve().parent.parent / "policies" / "default.yaml"


def proxy_policy_path() -> Path:
    """The shipped policy for `keyturn proxy`: decided by the annotations upstream servers declare."""
    return Path(__file__).resolve().parent.parent / "policies" / "proxy.yaml"


def resolve_token_digest(token_sha256: str | None, token_env: str | None, env: dict[str, str]) -> str | None:
    """The sha256 a presented token must hash to, from the file or from the environment (read at the edge)."""
    if token_sha256:
        return token_sha256.lower()
    if token_env:
        value = env.get(token_env)
        if not value:
            raise ConfigError(f"environment variable {token_env} (a token) is not set")
        return sha256_hex(value)
    return None


def load_settings(path: Path | None, **overrides: Any) -> Settings:
    """Parse the YAML config file (if any) and apply command-line overrides (None values are ignored)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} not found") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML: {e}") from e
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        data.update(raw)
        base = Path(path).resolve().parent
        for key in ("db", "policy"):
            if isinstance(data.get(key), str) and not os.path.isabs(data[key]) and not is_postgres_url(data[key]):
                data[key] = str(base / data[key])
        cps = data.get("checkpoints")
        if isinstance(cps, dict):
            data["checkpoints"] = cps = dict(cps)
            for key in ("key_file", "witness_file"):
                if isinstance(cps.get(key), str) and not os.path.isabs(cps[key]):
                    cps[key] = str(base / cps[key])
        sink = data.get("audit_sink")
        if isinstance(sink, dict) and isinstance(sink.get("cursor_file"), str) and not os.path.isabs(sink["cursor_file"]):
            data["audit_sink"] = {**sink, "cursor_file": str(base / sink["cursor_file"])}
        data["config_file"] = str(Path(path).resolve())
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        text = Path(path).read_text(encoding="utf-8") if path is not None else ""
        raise ConfigError(config_problems(e, f"config file {path or '(defaults)'} is invalid:", text)) from e


def config_problems(e: ValidationError, heading: str, text: str) -> str:
    """`heading`, then one line per problem: where (the line of the file, when it has one), what, and for an unknown
    field the closest known one, as policy errors say them."""
    found: list[tuple[int, str]] = []
    for err in e.errors(include_input=False, include_url=False):
        loc = tuple(err["loc"])
        where = ".".join(str(part) for part in loc) or "(top level)"
        line = _line_of(text, loc) if text else None
        message = problem_text(err)
        if err["type"] == "extra_forbidden" and loc:
            close = difflib.get_close_matches(str(loc[-1]), sorted(_config_fields()), n=1)
            message += f" (did you mean {close[0]!r}?)" if close else ""
        found.append((line or 0, f"  {f'line {line}: ' if line else ''}{where}: {message}"))
    return "\n".join([heading, *(text for _, text in sorted(found, key=lambda f: f[0]))])


def _line_of(text: str, loc: tuple[str | int, ...]) -> int | None:
    """The line of the config file where `loc` (or the nearest enclosing field it has) is written."""
    try:
        node: Any = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)),
                         None)
            if found is None:
                break
            line, node = found[0].start_mark.line + 1, found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _config_fields() -> set[str]:
    """Every field name (and alias) of the config's sections, for "did you mean"."""
    names: set[str] = set()
    seen: set[type] = set()
    stack: list[Any] = [Settings]
    while stack:
        model = stack.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            names.add(info.alias or name)
            stack.extend(_models_in(info.annotation))
    return names


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]
