// The TypeScript SDK 1.x client (@modelcontextprotocol/sdk), as most agents use it, calling one tool over
// streamable HTTP with the request options an agent chooses; prints one JSON line: how the call ended and when.
//
//   node sdk1_held.mjs <node_modules> <mcp url> <tool> <args json> <request options json>
//   request options: {"timeout": ms, "resetTimeoutOnProgress": bool, "maxTotalTimeout": ms, "progress": bool}
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, url, tool, args, optionsJson] = process.argv.slice(2);
const load = (path) => import(pathToFileURL(join(modules, "@modelcontextprotocol/sdk/dist/esm", path)).href);
const { Client } = await load("client/index.js");
const { StreamableHTTPClientTransport } = await load("client/streamableHttp.js");

const { progress, ...options } = JSON.parse(optionsJson);
const client = new Client({ name: "sdk1-story", version: "1.0.0" });
await client.connect(new StreamableHTTPClientTransport(new URL(url)));
const started = Date.now();
const messages = [];
try {
  const result = await client.callTool({ name: tool, arguments: JSON.parse(args) }, undefined, {
    ...options,
    ...(progress ? { onprogress: (p) => messages.push(p.message ?? "") } : {}),
  });
  console.log(JSON.stringify({ ended: "result", elapsedMs: Date.now() - started, result, progress: messages }));
} catch (error) {
  console.log(JSON.stringify({ ended: "error", elapsedMs: Date.now() - started, code: error.code ?? null,
                               message: String(error.message), progress: messages }));
}
await client.close();
