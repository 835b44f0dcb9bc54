"""The upstreams' prompts, under the names agents see: the tools' naming rules (`server.proxy.source`).

An upstream with a configured `prefix` exposes `prefix + prompt`. Otherwise a prompt keeps its own name unless
another upstream offers the same name: then it is `<upstream>__<prompt>`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import mcp_types as types

from server.proxy.upstream import Upstream, all_pages


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

    async def page(cursor: str | None) -> tuple[list[types.Prompt], str | None]:
        listed = await client.list_prompts(cursor=cursor)
        return listed.prompts, listed.next_cursor

    return await all_pages(page)
