"""Secrets keyturn keeps beside its database (reviewer token, link key): one way to make them.

Created once, atomically (the first process wins and every other reads its value), readable by the owner only.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from server.errors import ConfigError

log = logging.getLogger(__name__)


def beside(db: Path, suffix: str) -> Path:
    """`<db>.<suffix>`: the classifiers treat every such file as keyturn's own (an agent may not touch it)."""
    return db.with_name(f"{db.name}.{suffix}")


def reviewer_token_path(db: Path) -> Path:
    """Where the embedded default keeps its generated reviewer token (mode 0600, beside the database)."""
    return beside(db, "reviewer-token")


def ensure_secret_file(path: Path, make: Callable[[], str] = lambda: secrets.token_urlsafe(48)) -> str:
    """The value in `path`, creating it (mode 0600) when missing. `ConfigError` when it can be neither read nor
    made (its folder cannot be created, a file stands where a folder should)."""
    try:
        return _ensure(path, make)
    except OSError as e:
        why = (f"{e.filename} is a file, not a folder" if e.errno in (errno.EEXIST, errno.ENOTDIR) and e.filename
               else e.strerror or str(e))
        raise ConfigError(f"cannot create or read {path}: {why}") from e


def _ensure(path: Path, make: Callable[[], str]) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(make() + "\n")
        try:
            os.link(tmp, path)  # fails if another process created it first: then theirs is the value
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    if path.stat().st_mode & 0o077:
        log.warning("%s was readable by others; restricting it to its owner", path)
        os.chmod(path, 0o600)
    return path.read_text(encoding="utf-8").strip()
