"""A small upstream (the SDK's low-level `Server`, stdio) with every MCP feature besides tools, for the proxy's
stories: resources (`notes://readme`, `notes://plan`), templates (`notes://{name}`, `file:///{+path}`),
subscriptions, prompts (`greet`), completion, logging, and read-only tools that ask their client for things:
`sample` (sampling), `ask` (elicitation), `roots` (the client's roots), `log` (a log message), `touch` (a
resource-updated notification for a subscribed URI).

    python features_server.py
"""

from __future__ import annotations

import warnings
from typing import Any

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.server.stdio import stdio_server
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ResourceUpdated
from mcp.shared.message import ServerMessageMetadata

warnings.simplefilter("ignore")  # (sampling and logging are deprecated as of 2026-07-28; this server is 2025-era)

NOTES = {"notes://readme": "read me first", "notes://plan": "the secret plan"}
READ_ONLY = types.ToolAnnotations(read_only_hint=True, destructive_hint=False)
OBJECT: dict[str, Any] = {"type": "object", "properties": {}}
TOOLS = [
    types.Tool(name="sample", input_schema=OBJECT, annotations=READ_ONLY),
    types.Tool(name="ask", input_schema=OBJECT, annotations=READ_ONLY),
    types.Tool(name="roots", input_schema=OBJECT, annotations=READ_ONLY),
    types.Tool(name="log", input_schema=OBJECT, annotations=READ_ONLY),
    types.Tool(name="touch", input_schema={"type": "object", "properties": {"uri": {"type": "string"}}},
               annotations=READ_ONLY),
]
subscribed: set[str] = set()  # by 2025-era clients (2026-era ones listen on the bus's streams)
bus = InMemorySubscriptionBus()


def text(value: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=value)])


async def list_tools(ctx: ServerRequestContext[Any], params: Any) -> types.ListToolsResult:
    return types.ListToolsResult(tools=TOOLS)


async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
    if params.name in ("sample", "ask", "roots"):
        answer = await ask_client(ctx, params)
        if isinstance(answer, types.InputRequiredResult):
            return answer
        if isinstance(answer, types.ListRootsResult):
            return text(f"roots: {[str(r.uri) for r in answer.roots]}")
        if isinstance(answer, types.ElicitResult):
            return text(f"elicited: {answer.action} {answer.content}")
        content = answer.content
        return text(f"the model said: {content.text if isinstance(content, types.TextContent) else content}")
    if params.name == "log":
        await ctx.session.send_log_message("warning", {"note": "from upstream"}, logger="features",
                                           related_request_id=ctx.request_id)
        return text("logged")
    if params.name == "touch":
        uri = (params.arguments or {}).get("uri", "")
        if uri in subscribed:
            await ctx.session.send_resource_updated(uri)
        await bus.publish(ResourceUpdated(uri=uri))
        return text(f"touched {uri}")
    return types.CallToolResult(content=[types.TextContent(type="text", text="no such tool")], is_error=True)


async def ask_client(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> Any:
    """Sampling or elicitation: a request to the client on a 2025-era connection; on a 2026-era one (no back-channel)
    an input-required result, and its answer in the retried call."""
    if params.name == "sample":
        request: Any = types.CreateMessageRequest(params=types.CreateMessageRequestParams(
            messages=[types.SamplingMessage(role="user", content=types.TextContent(type="text", text="say hi"))],
            max_tokens=10))
        result: Any = types.CreateMessageResult
    elif params.name == "roots":
        request, result = types.ListRootsRequest(), types.ListRootsResult
    else:
        request = types.ElicitRequest(params=types.ElicitRequestFormParams(
            message="your name?",
            requested_schema={"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}))
        result = types.ElicitResult
    if ctx.session.can_send_request:
        return await ctx.session.send_request(request, result,
                                              metadata=ServerMessageMetadata(related_request_id=ctx.request_id))
    if params.input_responses and "q" in params.input_responses:
        return result.model_validate(params.input_responses["q"])
    return types.InputRequiredResult(input_requests={"q": request})


async def list_resources(ctx: ServerRequestContext[Any], params: Any) -> types.ListResourcesResult:
    return types.ListResourcesResult(resources=[types.Resource(uri=u, name=u.split("/")[-1]) for u in NOTES])


async def list_templates(ctx: ServerRequestContext[Any], params: Any) -> types.ListResourceTemplatesResult:
    return types.ListResourceTemplatesResult(resource_templates=[
        types.ResourceTemplate(uri_template="notes://{name}", name="note"),
        types.ResourceTemplate(uri_template="file:///{+path}", name="file")])


async def read_resource(ctx: ServerRequestContext[Any], params: types.ReadResourceRequestParams) -> Any:
    uri = str(params.uri)
    body = NOTES.get(uri, f"a note made up for {uri}")
    return types.ReadResourceResult(contents=[types.TextResourceContents(uri=uri, text=body, mime_type="text/plain")])


async def subscribe(ctx: ServerRequestContext[Any], params: types.SubscribeRequestParams) -> types.EmptyResult:
    subscribed.add(str(params.uri))
    return types.EmptyResult()


async def unsubscribe(ctx: ServerRequestContext[Any], params: types.UnsubscribeRequestParams) -> types.EmptyResult:
    subscribed.discard(str(params.uri))
    return types.EmptyResult()


async def list_prompts(ctx: ServerRequestContext[Any], params: Any) -> types.ListPromptsResult:
    return types.ListPromptsResult(prompts=[types.Prompt(
        name="greet", description="a greeting", arguments=[types.PromptArgument(name="name", required=True)])])


async def get_prompt(ctx: ServerRequestContext[Any], params: types.GetPromptRequestParams) -> types.GetPromptResult:
    name = (params.arguments or {}).get("name", "nobody")
    return types.GetPromptResult(messages=[types.PromptMessage(
        role="user", content=types.TextContent(type="text", text=f"Say hello to {name}."))])


async def complete(ctx: ServerRequestContext[Any], params: types.CompleteRequestParams) -> types.CompleteResult:
    names = ["alice", "alan", "bob"] if isinstance(params.ref, types.PromptReference) else ["readme", "plan"]
    values = [n for n in names if n.startswith(params.argument.value)]
    return types.CompleteResult(completion=types.Completion(values=values, total=len(values)))


async def set_level(ctx: ServerRequestContext[Any], params: types.SetLevelRequestParams) -> types.EmptyResult:
    return types.EmptyResult()


async def main() -> None:
    server = Server(
        "features", version="1.0.0", on_list_tools=list_tools, on_call_tool=call_tool,
        on_list_resources=list_resources, on_list_resource_templates=list_templates, on_read_resource=read_resource,
        on_subscribe_resource=subscribe, on_unsubscribe_resource=unsubscribe, on_list_prompts=list_prompts,
        on_get_prompt=get_prompt, on_completion=complete, on_set_logging_level=set_level,
        on_subscriptions_listen=ListenHandler(bus))
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


if __name__ == "__main__":
    anyio.run(main)
