"""The secrets pack: an encrypted local secret store, and tools to inspect, rotate and read its secrets.

Options (`tools: [{module: tools.secrets, options: {...}}]`):
  store           path of the store file (default `keyturn-secrets.json`, relative to the process's cwd).
  master_key_env  environment variable holding the master key (default `KEYTURN_SECRETS_MASTER_KEY`),
                  read once when the pack is registered.

Each value is sealed with AES-256-GCM under a key derived from the master key by scrypt (salt kept in the
file), bound to the secret's name and version, so a value cannot be moved between entries unnoticed.
Fingerprints are keyed (HMAC) so they identify a value without making a short one guessable.
`secrets_read`'s result is marked secret (`_meta["keyturn/secret_result"]`): the ledger keeps only its digest.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import string
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from pydantic import Field
from typing_extensions import TypedDict

from server.errors import ConfigError, InvalidArguments, KeyturnError
from server.guarded import GuardedTool, ToolRegistry, guarded_tool
from tools._common import PackOptions, parse_options

PACK = "tools.secrets"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,127}$")
_ALPHABET = string.ascii_letters + string.digits
_CHECK = "keyturn-secret-store"


class SecretStoreError(KeyturnError):
    """The store cannot be opened (wrong master key, tampering) or has no such secret."""


class SecretsOptions(PackOptions):
    store: str = "keyturn-secrets.json"
    master_key_env: str = "KEYTURN_SECRETS_MASTER_KEY"


class SecretMetadata(TypedDict):
    name: str
    version: int
    created: float
    rotated: float
    fingerprint: str


class SecretValue(TypedDict):
    name: str
    version: int
    value: str


class SecretStore:
    """A JSON file of sealed secrets. Every call reads the file; writes are atomic and locked across processes."""

    def __init__(self, path: str | os.PathLike[str], master_key: str, *, scrypt_n: int = 2**15) -> None:
        if len(master_key) < 16:
            raise SecretStoreError("the master key must be at least 16 characters")
        self.path = Path(path).resolve()
        self._master, self._n = master_key.encode("utf-8"), scrypt_n
        self._keys: tuple[bytes, bytes, bytes] | None = None  # (salt, seal key, fingerprint key)
        with self._locked():
            data = self._load()
            if data is None:
                salt = os.urandom(16)
                data = {"format": 1, "salt": _b64(salt), "scrypt_n": self._n, "secrets": {}}
                data["check"] = self._seal(salt, _CHECK, 0, _CHECK)
                self._save(data)
            else:
                try:
                    self._open(data, _CHECK, 0, data["check"])
                except (SecretStoreError, KeyError, ValueError):
                    raise SecretStoreError(f"{self.path}: the master key does not open this store") from None

    def put(self, name: str, value: str) -> SecretMetadata:
        """Store `value` under `name`: a new secret at version 1, or the next version of an existing one."""
        _check_name(name)
        with self._locked():
            data = self._require()
            now = time.time()
            old = data["secrets"].get(name)
            version = old["version"] + 1 if old else 1
            data["secrets"][name] = {
                "version": version,
                "created": old["created"] if old else now,
                "rotated": now,
                "fingerprint": self._fingerprint(data, value),
                "sealed": self._seal(_salt(data), name, version, value),
            }
            self._save(data)
            return self._meta(name, data["secrets"][name])

    def get(self, name: str) -> str:
        return self.read(name)[1]

    def read(self, name: str) -> tuple[int, str]:
        """The current version and value of `name`, from one reading of the file."""
        _check_name(name)
        data = self._require()
        entry = data["secrets"].get(name)
        if entry is None:
            raise SecretStoreError(f"no secret named {name!r}")
        return entry["version"], self._open(data, name, entry["version"], entry["sealed"])

    def metadata(self, name: str) -> SecretMetadata:
        return self._meta(name, self._entry(name))

    def rotate(self, name: str, length: int = 32) -> SecretMetadata:
        """Replace the value with `length` random letters and digits (creating the secret if it is new)."""
        return self.put(name, "".join(secrets.choice(_ALPHABET) for _ in range(length)))

    def names(self) -> list[str]:
        return sorted(self._require()["secrets"])

    # -- internals -------------------------------------------------------------------------------

    def _entry(self, name: str) -> dict[str, Any]:
        _check_name(name)
        entry = self._require()["secrets"].get(name)
        if entry is None:
            raise SecretStoreError(f"no secret named {name!r}")
        return dict(entry)

    def _meta(self, name: str, entry: Mapping[str, Any]) -> SecretMetadata:
        return {
            "name": name,
            "version": entry["version"],
            "created": entry["created"],
            "rotated": entry["rotated"],
            "fingerprint": entry["fingerprint"],
        }

    def _derive(self, salt: bytes) -> tuple[bytes, bytes]:
        if self._keys is None or self._keys[0] != salt:
            root = Scrypt(salt=salt, length=64, n=self._n, r=8, p=1).derive(self._master)
            self._keys = (salt, root[:32], root[32:])
        return self._keys[1], self._keys[2]

    def _seal(self, salt: bytes, name: str, version: int, value: str) -> str:
        nonce = os.urandom(12)
        ct = AESGCM(self._derive(salt)[0]).encrypt(nonce, value.encode("utf-8"), f"{name}\x00{version}".encode())
        return _b64(nonce + ct)

    def _open(self, data: Mapping[str, Any], name: str, version: int, sealed: str) -> str:
        raw = base64.b64decode(sealed)
        try:
            plain = AESGCM(self._derive(_salt(data))[0]).decrypt(raw[:12], raw[12:], f"{name}\x00{version}".encode())
        except InvalidTag:
            raise SecretStoreError(f"{self.path}: {name!r} does not decrypt (wrong master key or tampered)") from None
        return plain.decode("utf-8")

    def _fingerprint(self, data: Mapping[str, Any], value: str) -> str:
        key = self._derive(_salt(data))[1]
        return "hmac-sha256:" + hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:16]

    def _load(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise SecretStoreError(f"{self.path}: not a secret store ({e})") from e
        if not isinstance(data, dict) or data.get("format") != 1:
            raise SecretStoreError(f"{self.path}: not a keyturn secret store")
        self._n = int(data.get("scrypt_n", self._n))
        return data

    def _require(self) -> dict[str, Any]:
        data = self._load()
        if data is None:
            raise SecretStoreError(f"{self.path}: the store file has disappeared")
        return data

    def _save(self, data: Mapping[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with open(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _salt(data: Mapping[str, Any]) -> bytes:
    return base64.b64decode(data["salt"])


def _check_name(name: str, tool: str | None = None) -> None:
    if not NAME.match(name):
        # Named as the field when a tool checks it (an agent's argument: never echoed); the store's own callers
        # (the CLI) are told the name they gave.
        where = f"{tool}: argument 'name' (a secret name)" if tool else f"secret name {name[:64]!r}"
        msg = f"{where} must be 1-128 characters of A-Z a-z 0-9 _ . - /"
        raise InvalidArguments(msg, tool=tool, field="name")


def _name_check(tool: str) -> Callable[[dict[str, Any]], None]:
    return lambda args: _check_name(args["name"], tool)


def build_tools(store: SecretStore) -> list[GuardedTool]:
    # A secret's name is not secret (the reviewer must see which one is asked for), and no listed classifier
    # kind fits it, so `name` is left for the policy to match directly (e.g. `arguments.name.startsWith("prod/")`).
    @guarded_tool(annotations={"readOnlyHint": True, "openWorldHint": False})
    async def secrets_metadata(name: str) -> SecretMetadata:
        """A secret's version, creation and rotation times and fingerprint; never its value."""
        return await anyio.to_thread.run_sync(store.metadata, name)

    @guarded_tool(annotations={"readOnlyHint": False, "destructiveHint": True, "openWorldHint": False})
    async def secrets_rotate(name: str, length: Annotated[int, Field(ge=16, le=256)] = 32) -> SecretMetadata:
        """Give a secret a new random value of `length` characters; returns its metadata, never the value."""
        return await anyio.to_thread.run_sync(store.rotate, name, length)

    @guarded_tool(annotations={"readOnlyHint": True, "openWorldHint": False}, secret_result=True)
    async def secrets_read(name: str) -> SecretValue:
        """A secret's current value. The result is marked secret: the ledger keeps only its digest."""

        version, value = await anyio.to_thread.run_sync(store.read, name)
        return {"name": name, "version": version, "value": value}

    tools = [secrets_metadata, secrets_rotate, secrets_read]
    for tool in tools:
        tool.check(_name_check(tool.name))
    return tools


def state_paths(options: Mapping[str, Any]) -> list[Path]:
    """The store and its lock are keyturn's state: no other tool may reach them (see `server.execution`)."""
    store = Path(parse_options(SecretsOptions, options, PACK).store)
    return [store, store.with_name(store.name + ".lock")]


def register(registry: ToolRegistry, options: Mapping[str, Any]) -> None:
    opts = parse_options(SecretsOptions, options, PACK)
    master = os.environ.get(opts.master_key_env)
    if not master:
        raise ConfigError(f"tool pack {PACK!r}: environment variable {opts.master_key_env} (the master key) is not set")
    try:
        store = SecretStore(opts.store, master)
    except SecretStoreError as e:
        raise ConfigError(f"tool pack {PACK!r}: {e}") from e
    for tool in build_tools(store):
        registry.add(tool)
