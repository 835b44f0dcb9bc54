// The official tasks extension client (@modelcontextprotocol/ext-tasks) on the TypeScript SDK's 2.x client,
// driven line by line from pytest: each stdin line is one JSON command, each stdout line one JSON answer.
//
//   node tasks_client.mjs <node_modules> <mcp url> [bearer token]
//   node tasks_client.mjs <node_modules> stdio <server parameters json: {"command", "args", "env", "cwd"}>
//   {"op": "call", "tool": "...", "args": {...}}   -> {"kind": "task", "taskId": "..."} | {"kind": "immediate", "result": {...}}
//   {"op": "snapshot", "taskId": "..."}            -> {"status": "...", "statusMessage": "..."} | {"error": "...", "code": N}
//   {"op": "settle", "taskId": "..."}              -> {"status": "completed", "result": {...}} | {"status": "cancelled"} ...
//   {"op": "cancel", "taskId": "..."}              -> {"ok": true} | {"error": "...", "code": N}
//
// A 2026-07-28 tasks session needs the host's raw request path (`rawDispatch`): the SDK client rejects the
// `resultType: "task"` it does not know. Over streamable HTTP each request is its own POST, so the raw path here is
// one fetch per request with the protocol's headers (`Mcp-Method`, and `Mcp-Name` for tools and tasks). Over stdio
// it is the connection's own transport: requests with ids of their own, their responses taken off the stream before
// the SDK client sees them.
import { join } from "node:path";
import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";

const [modules, url, token] = process.argv.slice(2);
const stdio = url === "stdio";
// The packages come from the shared install (`scripts/test-deps`), by path: this script lives in the repository.
const load = (path) => import(pathToFileURL(join(modules, path)).href);
const { Client, StreamableHTTPClientTransport } = await load("@modelcontextprotocol/client/dist/index.mjs");
const { createTaskSessionFromClient, resultFromTaskOutcome } = await load(
  "@modelcontextprotocol/ext-tasks/dist/client/index.js");
const auth = token && !stdio ? { Authorization: `Bearer ${token}` } : {};
const clientInfo = { name: "ext-tasks-story", version: "1.0.0" };

// The 2.x client speaks 2025-11-25 unless told to negotiate (`versionNegotiation` defaults to "legacy").
const client = new Client(clientInfo, { capabilities: {}, versionNegotiation: { mode: "auto" } });
let transport;
if (stdio) {
  const { StdioClientTransport } = await load("@modelcontextprotocol/client/dist/stdio.mjs");
  transport = new StdioClientTransport({ ...JSON.parse(token), stderr: "inherit" });
} else {
  transport = new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers: auth } });
}
await client.connect(transport);
const protocolVersion = client.getNegotiatedProtocolVersion();
let nextId = 1;

const waiting = new Map(); // raw request id -> resolve, for the stdio raw path
if (stdio) {
  const sdkOnMessage = transport.onmessage;
  transport.onmessage = (message, extra) => {
    const resolve = message.id === undefined ? undefined : waiting.get(message.id);
    if (resolve === undefined) return sdkOnMessage?.(message, extra);
    waiting.delete(message.id);
    resolve(message);
  };
}

async function stdioDispatch(request) {
  const id = `raw-${nextId++}`;
  const answered = new Promise((resolve) => waiting.set(id, resolve));
  await transport.send({ jsonrpc: "2.0", id, ...request });
  const message = await answered;
  return message.error ? { kind: "error", error: message.error } : { kind: "result", result: message.result };
}

async function rawDispatch(request, options = {}) {
  if (stdio) return stdioDispatch(request);
  const id = `raw-${nextId++}`;
  const name = request.method === "tools/call" ? request.params?.name : request.params?.taskId;
  const response = await fetch(url, {
    method: "POST",
    signal: options.signal,
    headers: {
      ...auth,
      "Content-Type": "application/json",
      Accept: "application/json, text/event-stream",
      "MCP-Protocol-Version": protocolVersion,
      "Mcp-Method": request.method,
      ...(name === undefined ? {} : { "Mcp-Name": String(name) }),
    },
    body: JSON.stringify({ jsonrpc: "2.0", id, ...request }),
  });
  const text = await response.text();
  const messages = (response.headers.get("content-type") ?? "").includes("text/event-stream")
    ? text.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).filter(Boolean)
    : [text];
  for (const raw of messages) {
    const message = JSON.parse(raw);
    if (message.id !== id) continue;
    if (message.error) return { kind: "error", error: message.error };
    return { kind: "result", result: message.result };
  }
  throw new Error(`no response to ${request.method} (HTTP ${response.status}): ${text.slice(0, 500)}`);
}

const session = createTaskSessionFromClient(client, {
  endpointId: "keyturn",
  rawDispatch,
  v2RequestFraming: { protocolVersion, clientInfo, clientCapabilities: {} },
});
const executions = new Map();

function failure(error) {
  return { error: String(error?.message ?? error), code: error?.code ?? null, name: error?.name ?? null };
}

async function handle(command) {
  switch (command.op) {
    case "hello":
      return { era: client.getProtocolEra(), protocolVersion, serverTasks: client.getServerCapabilities()?.extensions };
    case "call": {
      const execution = await session.callTool(command.tool, command.args ?? {});
      if (execution.kind === "immediate") {
        const { outcome } = await execution.settle();
        return { kind: "immediate", result: resultFromTaskOutcome(outcome) };
      }
      executions.set(execution.handle.taskId, execution);
      return { kind: "task", taskId: execution.handle.taskId };
    }
    case "snapshot": {
      const view = await session.task(command.taskId).snapshot();
      return { status: view.status, statusMessage: view.statusMessage ?? null, raw: view.raw };
    }
    case "settle": {
      const execution = executions.get(command.taskId);
      const { outcome } = await execution.settle();
      if (outcome.status === "completed") return { status: "completed", result: outcome.result };
      return { status: outcome.status, error: outcome.error ? String(outcome.error.message) : null };
    }
    case "cancel":
      await session.cancelTask(command.taskId);
      return { ok: true };
    default:
      throw new Error(`unknown op ${command.op}`);
  }
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const command = JSON.parse(line);
  if (command.op === "quit") break;
  let answer;
  try {
    answer = await handle(command);
  } catch (error) {
    answer = failure(error);
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
await session.close();
await client.close();
