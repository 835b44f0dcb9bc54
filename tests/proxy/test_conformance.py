"""The official MCP conformance suite (`conformance server --suite all`) against the reference server
(`mcp-server-everything`, streamable HTTP) directly, and through `keyturn proxy` (serving HTTP) in front of the same
server over stdio and over streamable HTTP: every scenario that passes directly passes through keyturn.

The shipped policy (`policies/proxy.yaml`) decides; no scenario calls a tool it holds (the suite's scenarios call
`test_*` tools the reference server does not have), so no approval is needed.

Two scenarios pass directly only because the reference server lacks the tool they call: it answers an unknown
tool with an `isError` result, which those scenarios accept. keyturn answers an unknown tool with the JSON-RPC
error `-32602` (pinned by tests/e2e); for those two the test checks exactly that instead.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.clients.conftest import CLIENTS, NODE22
from tests.conftest import ROOT, free_port
from tests.proxy.conftest import ProxyHome

CONFORMANCE = CLIENTS / "@modelcontextprotocol" / "conformance"
EVERYTHING = CLIENTS / "@modelcontextprotocol" / "server-everything"
SHIPPED_POLICY = ROOT / "policies" / "proxy.yaml"
UNKNOWN_TOOL_ARTIFACTS = {"tools-call-simple-text", "tools-call-error"}

pytestmark = pytest.mark.skipif(
    not NODE22.exists() or not (CLIENTS / ".bin" / "conformance").exists() or not EVERYTHING.exists(),
    reason="Node 22 and the conformance suite are installed by scripts/test-deps")


def _bin(name: str) -> str:
    return str((CLIENTS / ".bin" / name).resolve())


def conformance(url: str, out: Path) -> dict[str, bool]:
    """Every scenario of `--suite all` against `url`: passed or not (its summary line's mark)."""
    run = subprocess.run([str(NODE22), _bin("conformance"), "server", "--url", url, "--suite", "all", "-o", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=out.parent)
    summary = run.stdout.split("=== SUMMARY ===")[-1]
    results = {m[1]: m[0] == "✓" for m in re.findall(r"^([✓✗]) ([\w-]+):", summary, re.M)}
    assert results, run.stdout[-2000:] + run.stderr[-2000:]
    return results


def checks(out: Path, scenario: str) -> list[dict[str, object]]:
    (found,) = out.glob(f"server-{scenario}-*")
    return list(json.loads((found / "checks.json").read_text()))


def everything_http(home: ProxyHome) -> str:
    port = free_port()
    env = {**home.env(), "PORT": str(port)}
    with open(home.dir / f"everything-{port}.log", "wb") as log:
        proc = subprocess.Popen([str(NODE22), _bin("mcp-server-everything"), "streamableHttp"], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=home.dir)
    home.procs.append(proc)
    url = f"http://127.0.0.1:{port}/mcp"
    _wait_listening(home, port)
    return url


def _wait_listening(home: ProxyHome, port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the reference server did not listen on {port}")


def keyturn_proxy(home: ProxyHome, upstream: dict[str, object]) -> str:
    home.write_config(tools=[], policy=str(SHIPPED_POLICY), proxy={"upstreams": [upstream], "connect_timeout": 30})
    return home.proxy_http() + "/mcp"


def test_every_scenario_that_passes_directly_passes_through_keyturn(home: ProxyHome, tmp_path: Path) -> None:
    direct_url = everything_http(home)
    direct = conformance(direct_url, tmp_path / "direct")
    stdio = {"name": "everything", "command": str(NODE22), "args": [_bin("mcp-server-everything"), "stdio"]}
    through_stdio = conformance(keyturn_proxy(home, stdio), tmp_path / "stdio")
    home.stop_all()
    home.procs.clear()
    upstream_url = everything_http(home)
    through_http = conformance(keyturn_proxy(home, {"name": "everything", "url": upstream_url}), tmp_path / "http")

    passed = {s for s, ok in direct.items() if ok}
    print(f"\nconformance --suite all: {len(passed)} of {len(direct)} scenarios pass directly; through keyturn "
          f"{sum(through_stdio.values())} (stdio upstream), {sum(through_http.values())} (HTTP upstream)")
    for scenario in sorted(direct):
        print(f"  {scenario:34} direct {'pass' if direct[scenario] else 'FAIL'}   keyturn/stdio "
              f"{'pass' if through_stdio.get(scenario) else 'FAIL'}   keyturn/http "
              f"{'pass' if through_http.get(scenario) else 'FAIL'}")
    assert set(direct) == set(through_stdio) == set(through_http)
    for name, through, out in (("stdio", through_stdio, tmp_path / "stdio"), ("http", through_http, tmp_path / "http")):
        lost = {s for s in passed - UNKNOWN_TOOL_ARTIFACTS if not through[s]}
        assert not lost, f"passes directly, not through keyturn ({name} upstream): {sorted(lost)}"
        for scenario in UNKNOWN_TOOL_ARTIFACTS & passed:
            # Directly: the reference server lacks the tool and says so in an error result.
            (direct_check,) = checks(tmp_path / "direct", scenario)
            assert "not found" in json.dumps(direct_check.get("details")), direct_check
            # Through keyturn: the same unknown tool is the protocol error keyturn answers for any unknown tool.
            (check,) = checks(out, scenario)
            assert check["status"] == "FAILURE" and "-32602" in str(check["errorMessage"]), check
            assert "unknown tool" in str(check["errorMessage"]), check
