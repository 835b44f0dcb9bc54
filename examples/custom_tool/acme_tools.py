"""Acme's own guarded tool: refund an order. `keyturn.yaml` loads it with `module: acme_tools`.

There is no `register()` here, so keyturn adds every module-level guarded tool. The refund is recorded in
`refunds.jsonl` in the working directory, standing in for a call to Acme's payments API.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from server.guarded import guarded_tool


@guarded_tool(
    classifiers={"environment": "env"},  # facts.env.prod is true for production refunds
    annotations={"destructiveHint": True, "idempotentHint": False, "openWorldHint": True},
)
def acme_refund(
    order_id: Annotated[str, Field(pattern=r"^ORD-[0-9]{4,12}$")],
    amount_cents: Annotated[int, Field(gt=0, le=10_000_000)],
    environment: Literal["staging", "production"] = "staging",
    note: str = "",
) -> dict[str, object]:
    """Refund part or all of an order. Amounts are in cents."""
    record = {
        "order_id": order_id,
        "amount_cents": amount_cents,
        "environment": environment,
        "note": note,
        "refunded_at": time.time(),
    }
    with Path("refunds.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return {"refunded": True, **record}
