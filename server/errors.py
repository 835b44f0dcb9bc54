"""keyturn's exceptions, and the one way a pydantic `ValidationError` becomes a message. Callers act on the
subclass; the message is for humans."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError
    from pydantic_core import ErrorDetails


class KeyturnError(Exception):
    """Base of every error keyturn raises on purpose."""


class ConfigError(KeyturnError):
    """The configuration file or command line is invalid."""


class PolicyError(KeyturnError):
    """A policy file is invalid. Names the file, line, rule and field when known."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        rule: str | None = None,
        field: str | None = None,
    ) -> None:
        self.file, self.line, self.rule, self.field = file, line, rule, field
        where = ", ".join(
            part
            for part in (
                f"file {file}" if file else "",
                f"line {line}" if line else "",
                f"rule {rule!r}" if rule else "",
                f"field {field!r}" if field else "",
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)


class ClassifierError(KeyturnError):
    """A classifier could not extract facts; the call fails closed."""


class LedgerError(KeyturnError):
    """The ledger could not record an event; nothing may run.

    The message is the operator's (it may name the ledger's file or database server); `public` is what an agent
    may read of it: the cause without where the ledger lives."""

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public or "its ledger is unavailable"


class ChannelError(KeyturnError):
    """A reviewer channel could not deliver or verify."""


class ToolError(KeyturnError):
    """A guarded tool failed while running; wraps the tool's own exception."""


class AuthError(KeyturnError):
    """A bearer token or channel identity could not be verified."""


class InvalidArguments(KeyturnError):
    """A tool call's arguments are malformed or structurally refused (wrong type, path outside the roots ...).

    Raised by `GuardedTool.validate` before any policy runs; `field` names the offending argument when known.
    """

    def __init__(self, message: str, *, tool: str | None = None, field: str | None = None) -> None:
        self.tool, self.field = tool, field
        super().__init__(message)


# -- pydantic validation errors, as people read them -----------------------------------------------------

def dotted(loc: Sequence[str | int]) -> str:
    """A pydantic location as the config file spells it: `proxy.upstreams.0.name`."""
    return ".".join(str(part) for part in loc)


def problem_text(err: ErrorDetails) -> str:
    """One error's message, never showing the input value (it may be a secret)."""
    if err["type"] == "missing":
        return "is required"
    if err["type"] == "extra_forbidden":
        return "unknown field"
    return err["msg"].removeprefix("Value error, ")


def problems(e: ValidationError, *, within: Sequence[str | int] = ()) -> list[tuple[tuple[str | int, ...], str]]:
    """Each error of `e` as (location, message); `within` is prepended to every location."""
    return [((*within, *err["loc"]), problem_text(err)) for err in e.errors(include_input=False, include_url=False)]


def validation_message(e: ValidationError, heading: str, *, within: Sequence[str | int] = (),
                       whole: str = "(top level)") -> str:
    """`heading`, then one `  location: message` line per error (`whole` when the location is empty)."""
    return "\n".join([heading, *(f"  {dotted(loc) or whole}: {text}" for loc, text in problems(e, within=within))])
