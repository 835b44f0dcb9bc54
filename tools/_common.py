"""Helpers the shipped tool packs share: strict options, confinement of paths to roots, capped output."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from server.errors import ConfigError, InvalidArguments, validation_message

__all__ = ["PackOptions", "cap_text", "jsonable", "open_new", "parse_options", "real_roots", "resolve_inside"]


class PackOptions(BaseModel):
    """Base of a pack's options: frozen, and a misspelt option is an error, not a silent default."""

    model_config = ConfigDict(frozen=True, extra="forbid")


T = TypeVar("T", bound=PackOptions)


def parse_options(model: type[T], options: Mapping[str, Any], pack: str) -> T:
    """Validate a pack's `options:` mapping from the config file; errors name the pack and the option."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as e:
        raise ConfigError(validation_message(e, f"tool pack {pack!r}: invalid options:", whole="(options)")) from None


def real_roots(paths: Iterable[str | os.PathLike[str]]) -> tuple[Path, ...]:
    """Roots as absolute, symlink-free paths. Relative roots are relative to the process's working directory."""
    return tuple(Path(os.path.realpath(os.path.abspath(p))) for p in paths)


def resolve_inside(value: str, roots: tuple[Path, ...], *, tool: str, field: str, base: Path | None = None) -> Path:
    """The real path `value` names, refused with `InvalidArguments` unless it lies inside one of `roots`.

    Symlinks in every existing component are followed before the check, so a link pointing outside is refused.
    A relative `value` is taken relative to `base` (default: the first root). This is a pre-flight check: a tool
    that creates files must still open them without following a final symlink (see `open_new`).
    """
    if not value or "\x00" in value:
        raise InvalidArguments(f"{tool}: argument {field!r} must be a non-empty path", tool=tool, field=field)
    if not roots:
        raise InvalidArguments(f"{tool}: no roots are configured, so no path is allowed", tool=tool, field=field)
    path = Path(value)
    if not path.is_absolute():
        path = (base or roots[0]) / path
    real = Path(os.path.realpath(path))
    if not any(real == root or real.is_relative_to(root) for root in roots):
        shown = ", ".join(str(r) for r in roots)
        raise InvalidArguments(
            # The field, never the value (it may be a secret, or the agent's probe of where keyturn keeps things).
            f"{tool}: argument {field!r} names a path outside the allowed roots ({shown})",
            tool=tool,
            field=field,
        )
    return real


def open_new(path: Path, mode: str = "w", *, overwrite: bool = False, encoding: str | None = "utf-8") -> Any:
    """Open `path` for writing without following a symlink at the final component.

    With `overwrite=False` the file must not exist (O_EXCL). The caller closes the returned file object.
    """
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_TRUNC if overwrite else os.O_EXCL
    fd = os.open(path, flags, 0o644)
    try:
        return open(fd, mode, encoding=encoding, newline="" if "b" not in mode else None)
    except BaseException:
        os.close(fd)
        raise


def cap_text(data: bytes, limit: int) -> tuple[str, bool]:
    """Decode at most `limit` bytes as UTF-8 (invalid bytes replaced); True when bytes were dropped."""
    truncated = len(data) > limit
    return data[:limit].decode("utf-8", errors="replace"), truncated


def jsonable(value: Any) -> Any:
    """A database or library value as plain JSON: bytes as `base64:...`, dates ISO 8601, NaN/inf as text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return "base64:" + base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID | dt.timedelta):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return str(value)
