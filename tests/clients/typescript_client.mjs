// One story told by the TypeScript SDK's 1.x `Client` against a keyturn server, over stdio or streamable HTTP.
//
//   node typescript_client.mjs '<json>'
//
// The JSON names the SDK's node_modules (`modules`), the transport (`stdio`: `command`, `args`, `env`, `cwd`;
// `http`: `url`, `token`), the `story` and its `calls` ([{tool, arguments}]). Every observation is one JSON line on stdout
// ({"event": ...}); pytest asserts on them. The client lists the tools first, as agents do: that is when the SDK
// learns each tool's output schema, which it then checks results against.
//
// Stories:
//   list    the tools, and which declare an output schema
//   call    each call in turn; its result, or the error the SDK raised
//   held    the call that waits: every progress notification, then its result (the request's timeout is reset by
//           progress, so a wait longer than `timeoutMs` still ends in the result)
//   cancel  the call, aborted (an AbortSignal) at its first progress notification; then, for each line pytest writes
//           on stdin (a request id), `keyturn_cancel` of that request
import { createInterface } from "node:readline";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const spec = JSON.parse(process.argv[2]);
const sdk = (path) => import(pathToFileURL(join(spec.modules, "@modelcontextprotocol/sdk/dist/esm", path)).href);
const { Client } = await sdk("client/index.js");

const say = (event, fields = {}) => process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");
const failure = (e) => ({ name: e?.name, code: e?.code, message: String(e?.message ?? e) });

// A story that hangs is a failure pytest reports, not a process left behind.
setTimeout(() => { say("gave-up", { after_ms: spec.limitMs }); process.exit(2); }, spec.limitMs ?? 240000).unref();

async function transport() {
  if (spec.transport === "stdio") {
    const { StdioClientTransport } = await sdk("client/stdio.js");
    return new StdioClientTransport({ command: spec.command, args: spec.args, env: spec.env, cwd: spec.cwd,
                                      stderr: "inherit" });
  }
  const { StreamableHTTPClientTransport } = await sdk("client/streamableHttp.js");
  const headers = spec.token ? { Authorization: `Bearer ${spec.token}` } : {};
  return new StreamableHTTPClientTransport(new URL(spec.url), { requestInit: { headers } });
}

async function call(client, { tool, arguments: args }, options = {}) {
  try {
    say("result", { result: await client.callTool({ name: tool, arguments: args }, undefined, options) });
  } catch (e) {
    say(options.signal?.aborted ? "aborted" : "error", failure(e));
  }
}

const client = new Client({ name: "keyturn-ts-story", version: "1.0.0" });
try {
  await client.connect(await transport());
  const { tools } = await client.listTools();
  say("tools", { tools: tools.map((t) => ({ name: t.name, outputSchema: Boolean(t.outputSchema) })) });

  if (spec.story === "call") {
    for (const one of spec.calls) await call(client, one);
  } else if (spec.story === "held") {
    const onprogress = (p) => say("progress", { progress: p.progress, message: p.message });
    await call(client, spec.calls[0], { onprogress, resetTimeoutOnProgress: true, timeout: spec.timeoutMs });
  } else if (spec.story === "cancel") {
    const abort = new AbortController();
    const onprogress = (p) => {
      if (!abort.signal.aborted) {
        say("progress", { progress: p.progress, message: p.message });
        abort.abort(new Error("the agent gave up"));
      }
    };
    await call(client, spec.calls[0], { onprogress, signal: abort.signal, resetTimeoutOnProgress: true });
    for await (const line of createInterface({ input: process.stdin })) {
      const requestId = line.trim();
      if (!requestId) break;
      try {
        const result = await client.callTool({ name: "keyturn_cancel", arguments: { request_id: requestId } });
        say("withdrawn", { result });
      } catch (e) {
        say("error", failure(e));
      }
    }
  }
} catch (e) {
  say("failed", failure(e));
} finally {
  await client.close().catch(() => {});
  say("closed");
  process.exit(0);
}
