"""The `keyturn audit verify|key|checkpoint|export` command line, without loading what the commands run
(`server.cli.audit`, the ledger, cryptography) until one of them runs: the other commands start at once."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.config import Settings

SettingsFn = Callable[[argparse.Namespace], "Settings"]


def _audit() -> ModuleType:
    from server.cli import audit

    return audit


def add_commands(audit_parsers: Any, common: argparse.ArgumentParser, settings_of: SettingsFn) -> None:
    verify = audit_parsers.add_parser(
        "verify", parents=[common], help="check the chain, the tables and the signed checkpoints",
        description="Exit 0 when the ledger is intact and extends every checkpoint; 1 naming the first problem.")
    verify.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                        help="a witness file of checkpoints (JSON lines); repeatable")
    verify.add_argument("--public-key", metavar="KEY",
                        help="the checkpoint public key (base64, PEM, or a file); default: the configured key's")
    verify.add_argument("--bundle", metavar="FILE", help="check an exported bundle offline (no ledger needed)")
    verify.set_defaults(func=lambda a: _audit().cmd_verify(a, settings_of))
    key = audit_parsers.add_parser("key", parents=[common], help="print the checkpoint public key and its id")
    key.add_argument("--pem", action="store_true", help="also print it as PEM")
    key.set_defaults(func=lambda a: _audit().cmd_key(a, settings_of))
    checkpoint = audit_parsers.add_parser("checkpoint", parents=[common], help="sign the chain's head now")
    checkpoint.add_argument("--out", metavar="FILE", help="also append the checkpoint to FILE")
    checkpoint.set_defaults(func=lambda a: _audit().cmd_checkpoint(a, settings_of))
    exp = audit_parsers.add_parser("export", parents=[common], help="write a self-contained bundle of events")
    exp.add_argument("--from", dest="from_seq", type=int, required=True, metavar="SEQ")
    exp.add_argument("--to", dest="to_seq", type=int, required=True, metavar="SEQ")
    exp.add_argument("file")
    exp.set_defaults(func=lambda a: _audit().cmd_export(a, settings_of))
