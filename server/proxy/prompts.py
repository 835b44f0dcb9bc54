"""The upstreams' prompts, under the names agents see: the tools' naming rules (`server.proxy.source`).

An upstream with a configured `prefix` exposes `prefix + prompt`. Otherwise a prompt keeps its own name unless
another upstream offers the same name: then it is `<upstream>__<prompt>`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import mcp_types as types

if TYPE_CHECKING:
    from server.proxy.upstream import Upstream

_LIST_PAGES_MAX = 20


class ExposedPrompt:
    """One upstream's prompt under its exposed name."""

    def __init__(self, upstream: Upstream, prompt: types.Prompt, name: str) -> None:
        self.upstream, self.prompt, self.name = upstream, prompt, name

    def to_mcp(self) -> types.Prompt:
        return self.prompt.model_copy(update={"name": self.name})


def expose(listed: Sequence[tuple[Upstream, Sequence[types.Prompt]]]) -> dict[str, ExposedPrompt]:
    shared = Counter(p.name for u, prompts in listed if u.config.prefix is None for p in prompts)
    exposed: dict[str, ExposedPrompt] = {}
    for upstream, prompts in listed:
        for prompt in prompts:
            if upstream.config.prefix is not None:
                public = upstream.config.prefix + prompt.name
            elif shared[prompt.name] > 1:
                public = f"{upstream.name}__{prompt.name}"
            else:
                public = prompt.name
            if public not in exposed:
                exposed[public] = ExposedPrompt(upstream, prompt, public)
    return exposed


async def list_prompts(upstream: Upstream) -> list[types.Prompt]:
    """Every page of an upstream's prompts, up to a bound."""
    client = await upstream.connected("prompts/list")
    out: list[types.Prompt] = []
    cursor: str | None = None
    for _ in range(_LIST_PAGES_MAX):
        page = await client.list_prompts(cursor=cursor)
        out += page.prompts
        cursor = page.next_cursor
        if not cursor:
            break
    return out
