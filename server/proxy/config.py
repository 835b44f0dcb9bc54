"""The `proxy:` section of the config file (and `keyturn proxy -- COMMAND` on the command line), parsed in one place.

`ProxyConfig` is a section of `server.config.Settings`, validated when the file is loaded; `parse_proxy_config`
adds what the command line gives.

```yaml
proxy:
  call_timeout: 2m          # how long one forwarded call may take before it fails (the upstream may have acted)
  upstreams:
    - name: git
      command: mcp-server-git
    - name: files
      command: npx
      args: [-y, "@modelcontextprotocol/server-filesystem", /srv/data]
      prefix: "fs_"         # expose read_file as fs_read_file
    - name: db
      url: https://mcp.example.com/mcp
      headers: {Authorization: "Bearer ${DB_MCP_TOKEN}"}   # ${VAR}: from keyturn's environment, at start
      classifiers:
        read_query: {query: sql}                          # argument `query` of `read_query` is SQL
        "*": {path: path}                                 # every tool's `path` argument is a path
    - name: reports
      command: mcp-server-reports
      mounts: [{path: /srv/data}, {path: /srv/out, writable: true}]   # what it sees of the host (sandbox.py)
      network: true                                       # the host's network (default: none at all)
```

A command upstream runs in a bubblewrap sandbox (`server/proxy/sandbox.py`) unless `sandbox: off`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.durations import Duration
from server.errors import ConfigError, validation_message

UPSTREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
PREFIX = re.compile(r"^[A-Za-z0-9._-]{0,60}$")
CLASSIFIER_KINDS: frozenset[str] = frozenset({"sql", "shell", "argv", "path", "url", "secret", "size", "env", "host"})
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Built-in classifiers for well-known servers, by the name the server gives itself in `initialize`.
# Keys are tool-name globs; configured classifiers override these argument by argument.
BUILTIN_CLASSIFIERS: dict[str, dict[str, dict[str, str]]] = {
    "mcp-git": {"*": {"repo_path": "path"}},  # PyPI mcp-server-git (its `files` are relative to repo_path)
    "secure-filesystem-server": {  # npm @modelcontextprotocol/server-filesystem
        "*": {"path": "path", "paths": "path", "source": "path", "destination": "path"},
    },
}


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Mount(_Strict):
    """A directory (or file) of the host an upstream's sandbox shows, at the same path; read-only unless writable."""

    path: str
    writable: bool = False


class UpstreamConfig(_Strict):
    """One MCP server keyturn stands in front of: a command started over stdio, or a streamable HTTP URL."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    inherit_env: bool = False  # pass keyturn's whole environment (less KEYTURN_*) to the command
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    prefix: str | None = None  # exposed name = prefix + tool; unset: `<name>__<tool>` only when names clash
    classifiers: dict[str, dict[str, str]] = Field(default_factory=dict)  # tool glob -> {argument: kind}
    builtin_classifiers: bool = True
    call_timeout: Duration | None = None  # overrides proxy.call_timeout for this upstream
    # The sandbox of a command upstream (server/proxy/sandbox.py); YAML `off` and `false` both turn it off.
    sandbox: bool | Literal["on", "off"] = True
    network: bool = False  # share the host's network (default: a network namespace with nothing in it)
    mounts: tuple[Mount, ...] = ()
    ro_paths: tuple[str, ...] = ()  # more of the host, read-only: a toolchain the runtime detection missed
    mount_args: bool = True  # existing files and directories named in `args` are mounted read-only

    @property
    def sandboxed(self) -> bool:
        return self.command is not None and (self.sandbox is True or self.sandbox == "on")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not UPSTREAM_NAME.match(v) or v.lower().startswith("keyturn"):
            raise ValueError(f"upstream name {v!r}: use 1-40 of A-Z a-z 0-9 _ -, not starting with 'keyturn'")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        # `keyturn_*` names are keyturn's own tools, which policies may allow wholesale.
        if v is not None and (not PREFIX.match(v) or v.lower().startswith("keyturn")):
            raise ValueError(f"prefix {v!r}: use up to 60 of A-Z a-z 0-9 . _ -, not starting with 'keyturn'")
        return v

    @field_validator("classifiers")
    @classmethod
    def _kinds(cls, v: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for tool, arguments in v.items():
            for argument, kind in arguments.items():
                base, _, dialect = kind.partition(":")
                if base not in CLASSIFIER_KINDS or (dialect and base != "sql") or kind.endswith(":"):
                    known = ", ".join(sorted(CLASSIFIER_KINDS))
                    raise ValueError(f"tool {tool!r}, argument {argument!r}: unknown classifier kind {kind!r} "
                                     f"(known: {known}; sql may name a dialect: sql:postgres)")
        return v

    @model_validator(mode="after")
    def _one_transport(self) -> UpstreamConfig:
        if (self.command is None) == (self.url is None):
            raise ValueError(f"upstream {self.name!r} needs exactly one of command (stdio) or url (streamable HTTP)")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"upstream {self.name!r}: url must start with http:// or https://")
        if self.url is not None and (self.args or self.env or self.cwd or self.inherit_env):
            raise ValueError(f"upstream {self.name!r}: args, env, cwd and inherit_env apply to a command, not a url")
        if self.url is not None and (self.mounts or self.ro_paths or self.network):
            raise ValueError(f"upstream {self.name!r}: mounts, ro_paths and network apply to a command keyturn "
                             "starts (in its sandbox), not to a url")
        if self.command is not None and self.headers:
            raise ValueError(f"upstream {self.name!r}: headers apply to a url, not a command")
        return self

    @property
    def transport(self) -> str:
        return "stdio" if self.command is not None else "http"


class ProxyConfig(_Strict):
    """The whole `proxy:` section. Durations take `30s`, `2m` ... or a number of seconds."""

    upstreams: tuple[UpstreamConfig, ...] = ()
    call_timeout: Duration = 300.0
    connect_timeout: Duration = 30.0  # one attempt to start (or reach) an upstream and list its tools
    startup_wait: Duration = 60.0  # how long keyturn waits for each upstream to be up (across retries) at start
    reconnect_wait: Duration = 10.0  # how long a call waits for a restarting upstream before it fails
    restart_backoff: Duration = 0.5  # first delay before restarting a crashed upstream; doubles, up to the max
    restart_backoff_max: Duration = 30.0
    health_interval: Duration | None = 30.0  # re-list an idle upstream's tools this often; null: never
    bwrap: str = "bwrap"  # the bubblewrap binary command upstreams are sandboxed with

    @model_validator(mode="after")
    def _unique(self) -> ProxyConfig:
        names = [u.name for u in self.upstreams]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"upstream names must be unique: {', '.join(dupes)}")
        return self


def parse_proxy_config(section: ProxyConfig | Mapping[str, Any], extra: Sequence[Mapping[str, Any]] = (),
                       **overrides: Any) -> ProxyConfig:
    """`Settings.proxy` (already validated, or a mapping), plus upstreams (`extra`) and options given on the
    command line, as one `ProxyConfig` with at least one upstream."""
    data = section.model_dump(exclude_unset=True) if isinstance(section, ProxyConfig) else dict(section)
    data.update({k: v for k, v in overrides.items() if v is not None})
    if extra:
        upstreams = data.get("upstreams") or []
        data["upstreams"] = [*upstreams, *extra] if isinstance(upstreams, list | tuple) else upstreams
    try:
        config = ProxyConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(validation_message(e, "proxy configuration is invalid:", within=("proxy",))) from None
    if not config.upstreams:
        raise ConfigError("no upstream MCP server: give one after `--` (keyturn proxy -- COMMAND ARGS...), "
                          "--upstream-url URL, or proxy.upstreams in the config file")
    return config


def substitute_env(value: str, environ: Mapping[str, str], where: str) -> str:
    """`${VAR}` references replaced from `environ`; a missing variable is a ConfigError naming `where`."""

    def one(m: re.Match[str]) -> str:
        if m.group(1) not in environ:
            raise ConfigError(f"{where}: environment variable {m.group(1)} is not set")
        return environ[m.group(1)]

    return _ENV_REF.sub(one, value)


_LAUNCHERS = re.compile(r"^(python[0-9.]*|node|nodejs|bun|deno|npx|uvx|uv|pipx|bunx|pnpm|yarn|npm|run|tool|exec|dlx)$")


def default_name(command: str | None = None, args: Sequence[str] = (), url: str | None = None) -> str:
    """A name for an upstream given on the command line, after what it runs: `mcp-server-filesystem` (or
    `npx -y @modelcontextprotocol/server-filesystem`, or `node .../server-filesystem/dist/index.js`) -> `filesystem`,
    `uvx mcp-server-git` -> `git`, a url -> its host. Valid for `UPSTREAM_NAME`; `upstream` when nothing fits."""
    words: list[str] = []
    if url is not None:
        host = re.sub(r"^[a-z]+://", "", url).split("/", 1)[0].rsplit("@", 1)[-1]
        words = [host.rsplit(":", 1)[0].strip("[]")]
    elif command is not None:
        words = [command, *(a for a in args if not a.startswith("-"))]
    name = ""
    for word in words:
        parts = [p for p in word.replace("\\", "/").split("/") if p]
        if "node_modules" in parts[:-2] and ".bin" not in parts:  # a package's script: the package's name
            after = parts[parts.index("node_modules") + 1:]
            parts = after[1:2] if after and after[0].startswith("@") else after[:1]
        base = parts[-1] if parts else ""
        base = re.sub(r"\.(js|mjs|cjs|py|exe)$", "", base.split("@")[0] if not base.startswith("@") else base)
        if not base or _LAUNCHERS.match(base):
            continue
        name = base
        break
    if url is None:
        for affix in ("mcp-server-", "server-", "mcp-", "-mcp-server", "-server", "-mcp", "_mcp"):
            stripped = name.removeprefix(affix) if not affix.startswith(("-", "_")) else name.removesuffix(affix)
            if stripped and stripped != name:
                name = stripped
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-_")[:40]
    return name if UPSTREAM_NAME.match(name) and not name.lower().startswith("keyturn") else "upstream"


def parse_header(value: str) -> tuple[str, str]:
    """`'Name: value'` from `--header`."""
    name, sep, rest = value.partition(":")
    if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
        raise ConfigError("--header expects 'Name: value' (the value is not shown: it may be a secret)")
    return name.strip(), rest.strip()
