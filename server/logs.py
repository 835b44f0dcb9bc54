"""keyturn's log lines: plain text for a terminal, or one JSON object per line (`--log-format json`) for a log
pipeline. Each line logged while a call is served names that call (`call_id`), so an operator can go from a log
line to `keyturn audit show CALL_ID`. Log lines never carry arguments or secrets: what keyturn logs about a call is
masked before it is logged (see `server.classify.Redaction`)."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Literal

current_call: ContextVar[str | None] = ContextVar("keyturn_call_id", default=None)
"""The call being served in this task (set by the gate as soon as a call has its id)."""

TEXT_FORMAT = "keyturn %(levelname)s %(name)s: %(message)s"


class CallIdFilter(logging.Filter):
    """Puts the current call's id on every record (`record.call_id`, None outside a call)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "call_id"):
            record.call_id = current_call.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, call_id, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "call_id": getattr(record, "call_id", None),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(log_format: Literal["text", "json"] = "text") -> None:
    """The root handler on stderr, in `log_format` (called once, by the command line)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CallIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
