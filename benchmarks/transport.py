"""Allow-path and proxy overhead: the same `echo` tool through real server processes and the SDK's client.

Sides (each a separate server process, all started by this module):

    plain        benchmarks/plain_server.py (the SDK's low-level Server, unguarded), over stdio on the same
                 transport as `keyturn serve` (keyturn's `stdio_transport`)
    plain_sdk    the same server on the SDK's default `stdio_server()` (stdio only): the plain server as its
                 users run it
    keyturn      `keyturn serve` with benchmarks.bench_tools (policy allow, ledger on)
    proxy        `keyturn proxy` (policy allow, ledger on) in front of the plain server: `-- python
                 benchmarks/plain_server.py` over stdio, `--upstream-url` of a plain server over HTTP
    fastmcp      fastmcp's `create_proxy` in front of the plain server, over stdio (benchmarks/peers.py)
    mcp_airlock  mcp-airlock in front of a plain server, over streamable HTTP (benchmarks/peers.py)

A proxy's figures include its upstream: its CPU time counts the plain server behind it.

Sequential calls rotate the order of the sides every round, so machine noise lands on all of them;
concurrent runs alternate whole blocks of calls between the sides. Warm-up calls are not counted.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import httpx2
import yaml
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client

from benchmarks import peers
from benchmarks.stats import summary

ROOT = Path(__file__).resolve().parent.parent
PLAIN = ROOT / "benchmarks" / "plain_server.py"
POLICY = ROOT / "benchmarks" / "bench-policy.yaml"
PEER_FASTMCP = ROOT / "benchmarks" / "peer_fastmcp_proxy.py"
PAYLOAD = {"text": "hello from the benchmark"}
PEER = {p.name: p for p in peers.PEERS}


@dataclass
class Side:
    """One server under test and the client connection(s) to it."""

    name: str
    transport: str
    clients: list[Client]
    marker: str  # BENCH_SIDE value in the server's environment, to find its processes
    calls: int = 0

    def cpu_s(self) -> float:
        return tree_cpu_s(self.marker)


def tree_cpu_s(marker: str) -> float:
    """User+system CPU seconds of every live process whose environment carries BENCH_SIDE=marker."""
    want = f"BENCH_SIDE={marker}".encode()
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if want not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(marker: str) -> dict[str, str]:
    return {"PYTHONPATH": str(ROOT), "BENCH_SIDE": marker, "PYTHONDONTWRITEBYTECODE": "1"}


def write_home(dir: Path, name: str, *, tools: bool = True) -> Path:
    """A keyturn config in `dir`: its own ledger file, the benchmark policy, and (for serve) the bench tool pack."""
    dir.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {"db": str(dir / f"{name}.db"), "policy": str(POLICY)}
    cfg["tools"] = [{"module": "benchmarks.bench_tools"}] if tools else []
    path = dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


AIRLOCK_POLICY = {"version": 1, "environment": "bench", "tools": {"echo": {"tiers": {"bench": "L0"}}}}
PRINCIPAL_HEADER = {"X-Airlock-Principal": "bench-agent"}


def stdio_params(name: str, marker: str, home: Path) -> StdioServerParameters:
    py = sys.executable
    env = server_env(marker)
    if name == "plain":
        return StdioServerParameters(command=py, args=[str(PLAIN)], env=env, cwd=str(home))
    if name == "plain_sdk":
        return StdioServerParameters(command=py, args=[str(PLAIN), "--stdio", "sdk"], env=env, cwd=str(home))
    if name == "keyturn":
        config = write_home(home, marker)
        return StdioServerParameters(command=py, args=["-m", "server.cli", "serve", "--config", str(config)],
                                     env=env, cwd=str(home))
    if name == "proxy":
        config = write_home(home, marker, tools=False)
        return StdioServerParameters(
            # The upstream runs in keyturn's sandbox: shown keyturn's package read-only, for the transport it shares.
            command=py, args=["-m", "server.cli", "proxy", "--config", str(config), "--mount", str(ROOT / "server"),
                              "--", py, str(PLAIN)],
            env=env, cwd=str(home))
    if name == "fastmcp":
        peer_py = peers.ensure(PEER["fastmcp"])
        return StdioServerParameters(command=str(peer_py), args=[str(PEER_FASTMCP), "--", py, str(PLAIN)],
                                     env=env, cwd=str(home))
    raise ValueError(name)


async def start_http(name: str, marker: str, home: Path, log: IO[bytes],
                     procs: list[anyio.abc.Process]) -> tuple[str, dict[str, str]]:
    """Start the named side over streamable HTTP (and, for a proxy, the plain server behind it, under the same
    marker so its CPU counts); its processes go into `procs`. Returns its MCP URL and the headers a client sends."""
    py = sys.executable
    headers: dict[str, str] = {}
    env = {**os.environ, **server_env(marker)}
    upstream = ""
    if name in ("proxy", "mcp_airlock"):
        upstream = await launch(f"{name}'s upstream", [py, str(PLAIN), "--http", "127.0.0.1:{port}"], home, log, env,
                                procs)
    if name == "plain":
        url = await launch(name, [py, str(PLAIN), "--http", "127.0.0.1:{port}"], home, log, env, procs)
    elif name == "keyturn":
        url = await launch(name, [py, "-m", "server.cli", "serve", "--http", "127.0.0.1:{port}",
                                  "--config", str(write_home(home, marker))], home, log, env, procs)
    elif name == "proxy":
        url = await launch(name, [py, "-m", "server.cli", "proxy", "--http", "127.0.0.1:{port}", "--config",
                                  str(write_home(home, marker, tools=False)), "--upstream-url", upstream],
                           home, log, env, procs)
    elif name == "mcp_airlock":
        peer_py = await anyio.to_thread.run_sync(peers.ensure, PEER["mcp_airlock"])
        policy = home / "airlock-policy.yaml"
        policy.write_text(yaml.safe_dump(AIRLOCK_POLICY), encoding="utf-8")
        env = {**env, "AIRLOCK_TRUST_PRINCIPAL_HEADER": "1"}
        url = await launch(name, [str(peer_py), "-m", "mcp_airlock", "--policy", str(policy), "--upstream", upstream,
                                  "--env", "bench",
                                  "--audit", str(home / "airlock-audit.jsonl"), "--host", "127.0.0.1",
                                  "--port", "{port}"], home, log, env, procs)
        headers = dict(PRINCIPAL_HEADER)
    else:
        raise ValueError(name)
    return url, headers


async def launch(name: str, cmd: list[str], home: Path, log: IO[bytes], env: dict[str, str],
                 procs: list[anyio.abc.Process]) -> str:
    """Start `cmd` (with `{port}` filled in) and wait until it answers HTTP; returns its MCP URL."""
    port = free_port()
    proc = await anyio.open_process([c.replace("{port}", str(port)) for c in cmd], stdout=log,
                                    stderr=subprocess.STDOUT, cwd=home, env=env)
    procs.append(proc)
    # Up once it answers HTTP (any status: the plain server has no health route).
    async with httpx2.AsyncClient(timeout=1) as http:
        with anyio.move_on_after(60):
            while proc.returncode is None:
                try:
                    await http.get(f"http://127.0.0.1:{port}/healthz")
                    return f"http://127.0.0.1:{port}/mcp"
                except httpx2.TransportError:
                    await anyio.sleep(0.1)
    if proc.returncode is not None:
        raise RuntimeError(f"{name} --http exited with {proc.returncode}; see {log.name}")
    raise RuntimeError(f"{name} --http did not start in 60 s")


OPTIONAL = ("proxy", "fastmcp", "mcp_airlock")
"""Sides whose failure to start drops them from the run with a note (or a skip reason, for a peer), not the run."""


@asynccontextmanager
async def stdio_sides(names: Sequence[str], home: Path, skipped: dict[str, str]) -> AsyncIterator[list[Side]]:
    """Start each named server over stdio (one connection each); yield the sides that answered a first call; stop
    them. An optional side that cannot start or answer is left out, with its reason in `skipped`."""
    async with AsyncExitStack() as stack:
        sides = []
        for name in names:
            marker = f"{name}-stdio-{os.getpid()}"
            try:
                params = await anyio.to_thread.run_sync(stdio_params, name, marker, home)
                errlog = stack.enter_context(open(home / f"{marker}.log", "w"))  # noqa: ASYNC230 (a local log file)
                client = await stack.enter_async_context(Client(stdio_client(params, errlog=errlog)))
                await call_once(client)
            except Exception as e:
                if name not in OPTIONAL:
                    raise
                skipped[name] = f"stdio: {type(e).__name__}: {e} (see {home / marker}.log)"
                continue
            sides.append(Side(name, "stdio", [client], marker))
        yield sides


@asynccontextmanager
async def http_sides(names: Sequence[str], home: Path, clients: int,
                     skipped: dict[str, str]) -> AsyncIterator[list[Side]]:
    """Start each named server over streamable HTTP with `clients` client sessions each (an optional side that
    cannot start or answer is left out, with its reason in `skipped`)."""
    procs: list[anyio.abc.Process] = []
    try:
        async with AsyncExitStack() as stack:
            sides = []
            for name in names:
                marker = f"{name}-http-{os.getpid()}"
                log = stack.enter_context(open(home / f"{marker}.log", "wb"))  # noqa: ASYNC230 (a local log file)
                try:
                    url, headers = await start_http(name, marker, home, log, procs)
                    conns = []
                    for _ in range(clients):
                        http = await stack.enter_async_context(create_mcp_http_client(headers=headers))
                        conns.append(await stack.enter_async_context(
                            Client(streamable_http_client(url, http_client=http))))
                    await call_once(conns[0])
                except Exception as e:
                    if name not in OPTIONAL:
                        raise
                    skipped[name] = f"http: {type(e).__name__}: {e} (see {log.name})"
                    continue
                sides.append(Side(name, "http", conns, marker))
            yield sides
    finally:
        with anyio.CancelScope(shield=True):
            for proc in procs:
                if proc.returncode is None:
                    proc.terminate()
                with anyio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def call_once(client: Client) -> float:
    t = time.perf_counter()
    result = await client.call_tool("echo", PAYLOAD)
    elapsed = time.perf_counter() - t
    if result.is_error or (result.structured_content or {}).get("result") != PAYLOAD["text"]:
        raise RuntimeError(f"unexpected result: {result}")
    return elapsed


@dataclass
class Measured:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    def report(self, sides: Sequence[Side]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for side in sides:
            lat = self.latencies[side.name]
            stats = summary(lat, wall_s=self.wall.get(side.name))
            stats["server_cpu_ms_per_call"] = self.cpu[side.name] / len(lat) * 1e3 if lat else float("nan")
            out[side.name] = stats
        return out


async def sequential(sides: Sequence[Side], calls: int, warmup: int) -> dict[str, Any]:
    """One call at a time, the sides' order rotating each round."""
    for side in sides:
        for _ in range(warmup):
            await call_once(side.clients[0])
    m = Measured({s.name: [] for s in sides})
    cpu0 = {s.name: s.cpu_s() for s in sides}
    for i in range(calls):
        k = i % len(sides)
        for side in [*sides[k:], *sides[:k]]:
            m.latencies[side.name].append(await call_once(side.clients[0]))
    m.cpu = {s.name: s.cpu_s() - cpu0[s.name] for s in sides}
    return m.report(sides)


async def concurrent(sides: Sequence[Side], workers: int, per_worker: int, blocks: int) -> dict[str, Any]:
    """`workers` callers at once (sharing a side's connections round robin), whole blocks alternating between sides."""

    async def block(side: Side, into: list[float] | None) -> float:
        async def worker(i: int) -> None:
            client = side.clients[i % len(side.clients)]
            for _ in range(per_worker):
                elapsed = await call_once(client)
                if into is not None:
                    into.append(elapsed)

        t = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(workers):
                tg.start_soon(worker, i)
        return time.perf_counter() - t

    for side in sides:
        await block(side, None)  # warm-up
    m = Measured({s.name: [] for s in sides}, {s.name: 0.0 for s in sides}, {s.name: 0.0 for s in sides})
    for b in range(blocks):
        order = list(sides) if b % 2 == 0 else list(reversed(sides))
        for side in order:
            cpu0 = side.cpu_s()
            m.wall[side.name] += await block(side, m.latencies[side.name])
            m.cpu[side.name] += side.cpu_s() - cpu0
    return m.report(sides)


async def run(home: Path, *, quick: bool, with_peers: bool = True) -> dict[str, Any]:
    """Every transport benchmark; the result is keyed transport -> mode -> side, with `skipped` (side -> reason)."""
    seq_calls, warmup = (150, 20) if quick else (3000, 200)
    per_worker, blocks = (3, 2) if quick else (20, 6)
    await anyio.Path(home).mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    out: dict[str, Any] = {"stdio": {}, "http": {}, "notes": [], "skipped": skipped,
                           "peers": {p.name: p.requirement for p in peers.PEERS}}
    stdio_names = ["plain", "plain_sdk", "keyturn", "proxy", *(["fastmcp"] if with_peers else [])]
    async with stdio_sides(stdio_names, home, skipped) as sides:
        progress(f"stdio: {', '.join(s.name for s in sides)} started")
        out["stdio"]["sequential"] = await sequential(sides, seq_calls, warmup)
        progress("stdio: sequential done")
        out["stdio"]["concurrent_32"] = await concurrent(sides, 32, per_worker, blocks)
    progress("stdio: done")
    http_names = ["plain", "keyturn", "proxy", *(["mcp_airlock"] if with_peers else [])]
    async with http_sides(http_names, home, 32, skipped) as sides:
        progress(f"http: {', '.join(s.name for s in sides)} started, 32 sessions each")
        out["http"]["sequential"] = await sequential(sides, seq_calls, warmup)
        out["http"]["concurrent_32"] = await concurrent(sides, 32, per_worker, blocks)
    progress("http: done")
    for name, reason in skipped.items():
        out["notes"].append(f"{name} was left out: {reason}")
    return out


def progress(message: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)
