"""Signed checkpoints of the ledger's chain head: what makes truncation, a re-chain or a swapped file detectable.

A checkpoint is `{seq, hash, chain, time, key_id}` signed with keyturn's Ed25519 key: "event `seq` of the chain
whose first event hashes to `chain` had hash `hash` at `time`". Copies go to witnesses outside the ledger file
(`server.ledger.witnesses`); `server.ledger.audit` proves a ledger extends every checkpoint, with only the public key.

The private key is `<db>.checkpoint-key` (PKCS#8 PEM, mode 0600, made on first start; like every `<db>.*` file
it is keyturn's state, out of the tools' reach), or a file or environment variable named in the config.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from server.canonical import canonical_json, sha256_hex
from server.config import Settings
from server.errors import ConfigError, KeyturnError
from server.secret_files import beside, ensure_secret_file

DOMAIN = b"keyturn-checkpoint/1\n"
"""Prefixed to every signed message, so a checkpoint signature can never be taken for another signed thing."""


class CheckpointError(KeyturnError):
    """A checkpoint, a key or a witness file that cannot be read."""


# -- keys ------------------------------------------------------------------------------------------

def key_path(settings: Settings) -> Path:
    return settings.checkpoints.key_file or beside(settings.db, "checkpoint-key")


def _new_key_pem() -> str:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem.decode("ascii").strip()


def private_key_from_text(text: str) -> Ed25519PrivateKey:
    """A PKCS#8 PEM private key, or the base64 of the raw 32-byte Ed25519 seed."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode("ascii") + b"\n", password=None)
        else:
            key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(text, validate=True))
    except (ValueError, TypeError, binascii.Error) as e:
        raise CheckpointError(f"not an Ed25519 private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise CheckpointError("the checkpoint key must be an Ed25519 key")
    return key


def signing_key(settings: Settings, environ: Mapping[str, str], *, create: bool = True) -> Ed25519PrivateKey:
    """keyturn's checkpoint key: from `checkpoints.key_env`, else the key file (made now if missing and `create`)."""
    cfg = settings.checkpoints
    if cfg.key_env:
        value = environ.get(cfg.key_env)
        if not value:
            raise ConfigError(f"environment variable {cfg.key_env} (the checkpoint key) is not set")
        return private_key_from_text(value)
    path = key_path(settings)
    if not create and not path.exists():
        raise CheckpointError(f"no checkpoint key at {path}")
    try:
        return private_key_from_text(ensure_secret_file(path, _new_key_pem))
    except OSError as e:
        raise CheckpointError(f"cannot read the checkpoint key {path}: {e}") from e


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """A short fingerprint of the public key: the first 16 hex digits of the sha256 of its raw 32 bytes."""
    return sha256_hex(raw_public(key))[:16]


def public_key_text(key: Ed25519PublicKey) -> str:
    """The public key as the base64 of its raw 32 bytes (what `--public-key` takes)."""
    return base64.b64encode(raw_public(key)).decode("ascii")


def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def parse_public_key(value: str) -> Ed25519PublicKey:
    """A public key given as raw base64, as PEM text, or as the path of a file holding either."""
    text = value.strip()
    if not text.startswith("-----BEGIN") and Path(text).is_file():
        text = Path(text).read_text(encoding="utf-8").strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode("ascii") + b"\n")
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, TypeError, binascii.Error) as e:
        raise CheckpointError(f"not an Ed25519 public key (raw base64, PEM, or a file holding one): {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise CheckpointError("the public key must be an Ed25519 key")
    return key


# -- checkpoints -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Checkpoint:
    """A signed statement that event `seq` of chain `chain` (its first event's hash) had hash `hash` at `time`."""

    seq: int
    hash: str
    chain: str
    time: float
    key_id: str
    sig: str = ""  # base64 Ed25519 signature of DOMAIN + the canonical JSON of the other fields

    def message(self) -> bytes:
        body = {"seq": self.seq, "hash": self.hash, "chain": self.chain, "time": self.time, "key_id": self.key_id}
        return DOMAIN + canonical_json(body).encode("utf-8")

    def signed_by(self, key: Ed25519PublicKey) -> bool:
        if self.key_id != key_id(key):
            return False
        try:
            key.verify(base64.b64decode(self.sig, validate=True), self.message())
        except (InvalidSignature, ValueError, binascii.Error):
            return False
        return True

    def to_json(self) -> str:
        return canonical_json({"type": "keyturn.checkpoint", **asdict(self)})

    @classmethod
    def from_dict(cls, data: Any) -> Checkpoint:
        if not isinstance(data, dict):
            raise CheckpointError("a checkpoint must be a JSON object")
        try:
            seq, time_ = data["seq"], data["time"]
            fields = {k: data[k] for k in ("hash", "chain", "key_id", "sig")}
        except KeyError as e:
            raise CheckpointError(f"a checkpoint lacks {e}") from e
        if type(seq) is not int or seq < 1 or not isinstance(time_, int | float) or isinstance(time_, bool):
            raise CheckpointError("a checkpoint's seq must be a positive integer and its time a number")
        if not all(isinstance(v, str) for v in fields.values()):
            raise CheckpointError("a checkpoint's hash, chain, key_id and sig must be strings")
        return cls(seq=seq, time=float(time_), **fields)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time))
        return f"checkpoint of event {self.seq} signed {when} by key {self.key_id}"


def sign(key: Ed25519PrivateKey, seq: int, hash_: str, chain: str, at: float | None = None) -> Checkpoint:
    unsigned = Checkpoint(seq=seq, hash=hash_, chain=chain, time=float(at if at is not None else time.time()),
                          key_id=key_id(key.public_key()))
    sig = base64.b64encode(key.sign(unsigned.message())).decode("ascii")
    return Checkpoint(**{**asdict(unsigned), "sig": sig})


def read_checkpoint_file(path: Path) -> list[Checkpoint]:
    """Every checkpoint in a witness file (JSON lines; blank lines are skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from e
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(Checkpoint.from_dict(json.loads(line)))
        except (json.JSONDecodeError, CheckpointError) as e:
            raise CheckpointError(f"{path}:{number}: not a checkpoint: {e}") from e
    return out


def unique(checkpoints: Iterable[Checkpoint]) -> list[Checkpoint]:
    """The checkpoints without repeats, by seq."""
    return sorted(dict.fromkeys(checkpoints), key=lambda c: (c.seq, c.key_id, c.time))


def checkpoint_line(checkpoint: Checkpoint, public_key: str) -> str:
    """One line a reviewer channel keeps: enough to prove later, with the public key, what the ledger held."""
    return (f"keyturn ledger checkpoint: {checkpoint.to_json()} "
            f"(verify with keyturn audit verify --checkpoint FILE --public-key {public_key})")
