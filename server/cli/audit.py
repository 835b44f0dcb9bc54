"""`keyturn audit verify | key | checkpoint | export`: the auditor's commands on checkpoints and bundles.

verify      the chain, the head row, the calls and votes tables, and every checkpoint known: the ledger's own
            copies, the configured witness file, and each --checkpoint FILE; --bundle FILE checks a bundle offline
key         the public key that checkpoints are signed with (give it to whoever verifies)
checkpoint  sign the head now, send it to the configured witnesses (and --out FILE)
export      a self-contained bundle of events FROM..TO with the checkpoints that cover them
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from server.config import Settings
from server.errors import KeyturnError
from server.ledger import Store
from server.ledger.audit import AuditResult
from server.ledger.bundle import verify_bundle
from server.ledger.checkpoints import (
    Checkpoint,
    CheckpointError,
    key_id,
    key_path,
    parse_public_key,
    public_key_pem,
    public_key_text,
    read_checkpoint_file,
    sign,
    signing_key,
    unique,
)
from server.ledger.opening import open_existing
from server.ledger.witnesses import Checkpointer, FileWitness, Witness, configured_witnesses

SettingsFn = Callable[[argparse.Namespace], Settings]


def _run(settings: Settings, fn: Callable[[Store], Awaitable[int]]) -> int:
    async def main() -> int:
        ledger = await open_existing(settings)
        try:
            return await fn(ledger)
        finally:
            await ledger.close()

    return int(anyio.run(main))


def _public_key(args: argparse.Namespace, settings: Settings) -> Ed25519PublicKey | None:
    """--public-key, else the public half of the configured signing key when it is readable here."""
    if getattr(args, "public_key", None):
        return parse_public_key(args.public_key)
    try:
        return signing_key(settings, os.environ, create=False).public_key()
    except (CheckpointError, KeyturnError):
        return None


def _report(result: AuditResult) -> int:
    if result.ok:
        print(result.message)
        for note in result.notes:
            print(f"note: {note}")
        return 0
    where = f" at event {result.first_bad_seq}" if result.first_bad_seq is not None else ""
    print(f"BROKEN{where}: {result.message}")
    return 1


def cmd_verify(args: argparse.Namespace, settings_of: SettingsFn) -> int:
    if args.bundle:
        if not args.public_key:
            raise KeyturnError("--bundle needs --public-key (the key the checkpoints were signed with)")
        try:
            data = json.loads(Path(args.bundle).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise KeyturnError(f"cannot read bundle {args.bundle}: {e}") from e
        return _report(verify_bundle(data, parse_public_key(args.public_key)))

    settings = settings_of(args)
    key = _public_key(args, settings)
    given: list[Checkpoint] = []
    files = [Path(f) for f in args.checkpoint]
    witness_file = settings.checkpoints.witness_file
    if witness_file is not None and witness_file.exists() and witness_file not in files:
        files.append(witness_file)
    for f in files:
        given += read_checkpoint_file(f)
    if given and key is None:
        raise KeyturnError("checkpoints need a public key to be checked: pass --public-key")
    mine = key_id(key) if key is not None else None

    async def run(ledger: Store) -> int:
        # The ledger's own copies: those by other keys (before a key change) are not this key's to check.
        result, _ = await ledger.audit(given, key, own_key_id=mine)
        if result.ok and key is None:
            result.notes.append(f"no checkpoint key at {key_path(settings)} and no --public-key: a truncated tail, "
                                "a re-chained or a swapped ledger cannot be detected without checkpoints")
        elif result.ok and not given:
            result.notes.append("only the ledger's own checkpoint copies were checked: pass the witnesses' files "
                                "with --checkpoint")
        return _report(result)

    return _run(settings, run)


def cmd_key(args: argparse.Namespace, settings_of: SettingsFn) -> int:
    settings = settings_of(args)
    public = signing_key(settings, os.environ).public_key()
    print(f"key id: {key_id(public)}")
    print(f"public key (base64): {public_key_text(public)}")
    if args.pem:
        print(public_key_pem(public), end="")
    return 0


def _checkpointer(ledger: Store, settings: Settings, out: str | None) -> Checkpointer:
    witnesses: list[Witness] = list(configured_witnesses(settings))
    if out and Path(out) != settings.checkpoints.witness_file:
        witnesses.append(FileWitness(Path(out)))
    cfg = settings.checkpoints
    return Checkpointer(ledger, signing_key(settings, os.environ), witnesses,
                        anchors=[cfg.witness_file] if cfg.witness_file is not None else [])


def cmd_checkpoint(args: argparse.Namespace, settings_of: SettingsFn) -> int:
    settings = settings_of(args)

    async def run(ledger: Store) -> int:
        checkpointer = _checkpointer(ledger, settings, args.out)
        checkpoint = await checkpointer.make(force=True)
        assert checkpoint is not None
        print(checkpoint.to_json())
        return 0

    return _run(settings, run)


def cmd_export(args: argparse.Namespace, settings_of: SettingsFn) -> int:
    settings = settings_of(args)
    if not 1 <= args.from_seq <= args.to_seq:
        raise KeyturnError("--from and --to must be event numbers with 1 <= FROM <= TO")
    private = signing_key(settings, os.environ, create=False)
    key = private.public_key()
    mine = key_id(key)
    files = [settings.checkpoints.witness_file] if settings.checkpoints.witness_file else []
    given = [c for f in files if f is not None and f.exists() for c in read_checkpoint_file(f)]

    async def run(ledger: Store) -> int:
        result, known = await ledger.audit(given, key, own_key_id=mine)
        if not result.ok:
            print("the ledger does not verify, so nothing was exported")
            return _report(result)
        if args.to_seq > result.count:
            raise KeyturnError(f"the ledger has {result.count} events; --to {args.to_seq} is past its end")
        covering = [c for c in known if c.seq >= args.to_seq]
        if covering:
            cover = min(covering, key=lambda c: c.seq)
        else:  # nothing signed covers the range yet: sign its last event now (the chain was just verified)
            hashes = await ledger.event_hashes(args.to_seq)
            assert hashes is not None  # the chain was just verified up to past `to_seq`
            at_hash, chain = hashes
            cover = sign(private, args.to_seq, at_hash, chain)
            await ledger.store_checkpoint(cover)
            known = unique([*known, cover])

        bundle: dict[str, Any] = await ledger.export_bundle(args.from_seq, args.to_seq, cover, known, key)
        await anyio.Path(args.file).write_text(json.dumps(bundle, indent=1) + "\n", encoding="utf-8")
        print(f"exported events {args.from_seq}..{cover.seq} with {len(bundle['checkpoints'])} checkpoint(s) "
              f"(key {mine}) to {args.file}")
        return 0

    return _run(settings, run)
