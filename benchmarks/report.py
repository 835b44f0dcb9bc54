"""The Markdown tables of a benchmark run (written beside the JSON, and printed)."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.stats import fmt, ratio


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _transport(t: dict[str, Any]) -> list[str]:
    out = ["### Allow-path overhead: the same trivial tool, plain MCP server vs keyturn (policy allow, ledger on) "
           "and the proxies", ""]
    rows = []
    for tr in ("stdio", "http"):
        for mode, label in (("sequential", "sequential"), ("concurrent_32", "32 concurrent")):
            sides = t.get(tr, {}).get(mode)
            if not sides:
                continue
            plain = sides["plain"]
            for name, s in sides.items():
                rows.append([tr if tr == "stdio" else "streamable HTTP", label, name, s["median_ms"], s["p99_ms"],
                             s["calls_per_s"], s["server_cpu_ms_per_call"],
                             ratio(s["median_ms"], plain["median_ms"]), ratio(s["p99_ms"], plain["p99_ms"])])
    out += _table(["transport", "calls", "server", "median ms", "p99 ms", "calls/s", "server CPU ms/call",
                   "median ÷ plain", "p99 ÷ plain"], rows)
    out.append("`plain` runs on keyturn's stdio transport, `plain_sdk` on the SDK's default `stdio_server()`. `proxy` is "
               "`keyturn proxy` (stdio: `-- python benchmarks/plain_server.py`; HTTP: `--upstream-url` of a plain server), "
               "`fastmcp` fastmcp's `create_proxy`, `mcp_airlock` mcp-airlock, each in front of the plain server: a "
               "proxy's CPU includes its upstream's.")
    out += [f"Note: {n}" for n in t.get("notes", [])]
    return [*out, ""]


def _gate(g: dict[str, Any]) -> list[str]:
    rows = [[name, s["median_us"], s["p99_us"]] for name, s in g["steps"].items()]
    return ["### The guard's own cost (in-process, no transport: one allowed call, step by step)", "",
            *_table(["step", "median µs", "p99 µs"], rows),
            f"The guard adds {g['guard_us_median']:,.0f} µs to the median call ({g['calls']:,} calls): "
            "`Gate.call` less the tool run bare. The steps are timed one by one on separate calls.", ""]


def _held(h: dict[str, Any]) -> list[str]:
    p, d = h["paced"], h["decision_to_tool_start"]
    rows = [
        ["calls held at once", h["held"]],
        ["time to hold them all (s)", h["hold_all_s"]],
        ["memory per held call (KiB, RSS delta)", h["rss_per_held_call_kib"]],
        [f"paced decisions ({p['decisions']:,}, one at a time): decision → tool start, median (ms)",
         p["decision_to_tool_start"]["median_ms"]],
        ["paced decisions: decision → tool start, p99 (ms)", p["decision_to_tool_start"]["p99_ms"]],
        [f"back-to-back decisions ({h['back_to_back']:,}): approvals recorded per s", h["decisions_per_s"]],
        ["back-to-back: calls run per s (first decision to the last call's end)", h["all_run_per_s"]],
        ["back-to-back: decision → tool start, median (ms; the queue behind earlier decisions)", d["median_ms"]],
        ["tool runs (each call exactly once)", f"{h['tool_runs']:,} ({'yes' if h['ran_exactly_once'] else 'NO'})"],
        ["ledger `executed` events", h["ledger_executed_events"]],
        ["ledger chain verifies", f"{'yes' if h['chain_verifies'] else 'NO'} ({h['ledger_events']:,} events)"],
    ]
    return ["### Held calls at scale (in-process: gate + approvals broker + ledger on a temp file)", "",
            *_table(["measure", "value"], rows)]


def _ledger(g: dict[str, Any]) -> list[str]:
    raw = g["raw_insert_per_commit_per_s"]
    rows = [
        ["raw SQLite insert, one row per commit", raw, 1.0],
        ["raw SQLite insert, batched (one transaction)", g["raw_insert_batched_per_s"],
         ratio(g["raw_insert_batched_per_s"], raw)],
        ["Ledger.append, sequential", g["ledger_append_sequential_per_s"], ratio(g["ledger_append_sequential_per_s"], raw)],
        ["Ledger.append, 32 concurrent tasks", g["ledger_append_32_tasks_per_s"], ratio(g["ledger_append_32_tasks_per_s"], raw)],
        [f"audit verify ({g['verify_events']:,} events)", g["verify_events_per_s"], ratio(g["verify_events_per_s"], raw)],
        ["raw SQLite scan of the same events", g["raw_scan_events_per_s"], ratio(g["raw_scan_events_per_s"], raw)],
    ]
    return ["### Ledger (WAL, synchronous=NORMAL, as shipped)", "",
            *_table(["measure", "events/s", "÷ raw insert per commit"], rows),
            f"`audit verify` of {g['verify_events']:,} events took {g['verify_s']:.1f} s "
            f"(building the chain with executemany took {g['build_s']:.1f} s).", "", *_during_verify(g)]


def _during_verify(g: dict[str, Any]) -> list[str]:
    if "appends_during_verify" not in g:
        return []
    quiet, busy = g["appends_quiet"], g["appends_during_verify"]
    rows = [["nothing else running", quiet["n"], quiet["median_ms"], quiet["p99_ms"]],
            [f"while a verify of {g['verify_events']:,} events runs", busy["n"], busy["median_ms"], busy["p99_ms"]]]
    return ["Writes during an audit (sequential `Ledger.append`, same ledger): a verify reads on a connection of its "
            "own, so writes do not wait for it.", "",
            *_table(["appends", "n", "median ms", "p99 ms"], rows),
            f"Longest append while the verify ran: {g['appends_during_verify_max_ms']:.1f} ms.", ""]


def _policy(p: dict[str, Any]) -> list[str]:
    rows = []
    for tool, s in p["scenarios"].items():
        both, decide = s["extract_facts+decide"], s["decide"]
        rows.append([tool, s["candidates"], s["outcome"], both["median_us"], both["p99_us"],
                     decide["median_us"], decide["p99_us"]])
    return [f"### Policy decisions ({p['rules']:,} rules, compiled in {p['compile_ms']:,.0f} ms)", "",
            *_table(["call", "candidate rules", "outcome", "facts+decide median µs", "p99 µs",
                     "decide median µs", "p99 µs"], rows)]


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"## keyturn benchmarks{' (quick)' if r.get('quick') else ''} — {r['started']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}; Python {m['python']}, "
             f"SQLite {m['sqlite']}, mcp {m['mcp']}. Load average at start "
             f"{', '.join(f'{x:.1f}' for x in m['load_at_start'])}, at end "
             f"{', '.join(f'{x:.1f}' for x in m.get('load_at_end', (math.nan,) * 3))}.", ""]
    if "transport" in r:
        lines += _transport(r["transport"])
    if "gate" in r:
        lines += _gate(r["gate"])
    if "held" in r:
        lines += _held(r["held"])
    if "ledger" in r:
        lines += _ledger(r["ledger"])
    if "policy" in r:
        lines += _policy(r["policy"])
    return "\n".join(lines) + "\n"


def _seq_ratio(t: dict[str, Any], transport: str, mode: str, side: str, base: str) -> float:
    sides = t.get(transport, {}).get(mode, {})
    return ratio(sides.get(side, {}).get("median_ms", math.nan), sides.get(base, {}).get("median_ms", math.nan))


def figures(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The run's `name=value` lines, in the order they are printed. Each ratio's name says what it compares:
    `A ÷ B`, both measured in this run, alternating, on the same transport unless the name says otherwise."""
    out: list[tuple[str, str]] = []
    if "gate" in r:
        call = r["gate"]["steps"]["guarded call (Gate.call)"]
        out += [("guard_us_p50", f"{call['median_us']:.1f}"), ("guard_us_p99", f"{call['p99_us']:.1f}")]
    if "transport" in r:
        t = r["transport"]
        for name, args in (
            ("overhead_ratio_stdio_median", ("stdio", "sequential", "keyturn", "plain")),
            ("overhead_ratio_stdio_vs_sdk_default_median", ("stdio", "sequential", "keyturn", "plain_sdk")),
            ("overhead_ratio_http_median", ("http", "sequential", "keyturn", "plain")),
            ("overhead_ratio_stdio_32_median", ("stdio", "concurrent_32", "keyturn", "plain")),
            ("overhead_ratio_http_32_median", ("http", "concurrent_32", "keyturn", "plain")),
            ("proxy_ratio_stdio_median", ("stdio", "sequential", "proxy", "plain")),
            ("proxy_ratio_http_median", ("http", "sequential", "proxy", "plain")),
        ):
            out.append((name, f"{_seq_ratio(t, *args):.3f}"))
        for peer, transport in (("fastmcp", "stdio"), ("mcp_airlock", "http")):
            if peer in t.get("skipped", {}):
                out.append((f"peer_{peer}_skipped", " ".join(t["skipped"][peer].split())[:300]))
            elif peer in t.get(transport, {}).get("sequential", {}):
                out.append((f"peer_{peer}_ratio_median", f"{_seq_ratio(t, transport, 'sequential', peer, 'plain'):.3f}"))
    if "held" in r:
        h = r["held"]
        out += [("held_calls", str(h["held"])),
                ("held_memory_kib_per_call", f"{h['rss_per_held_call_kib']:.2f}"),
                ("held_decision_to_tool_start_median_ms", f"{h['paced']['decision_to_tool_start']['median_ms']:.3f}"),
                ("held_decision_to_tool_start_p99_ms", f"{h['paced']['decision_to_tool_start']['p99_ms']:.3f}"),
                ("held_decisions_back_to_back_per_s", f"{h['decisions_per_s']:.1f}"),
                ("held_back_to_back_all_run_s", f"{h['approve_all_to_all_done_s']:.2f}"),
                ("held_ran_exactly_once", "yes" if h["ran_exactly_once"] else "NO")]
    if "ledger" in r:
        g = r["ledger"]
        out += [("ledger_append_per_s", f"{g['ledger_append_sequential_per_s']:.0f}"),
                ("raw_sqlite_insert_per_commit_per_s", f"{g['raw_insert_per_commit_per_s']:.0f}"),
                ("ledger_append_vs_raw_insert_ratio",
                 f"{ratio(g['ledger_append_sequential_per_s'], g['raw_insert_per_commit_per_s']):.3f}"),
                ("verify_events_per_s", f"{g['verify_events_per_s']:.0f}")]
    if "checkpoints" in r:
        cp = r["checkpoints"]
        out += [("checkpoint_make_median_ms", f"{cp['checkpoint_make_ms']['median_ms']:.3f}"),
                ("verify_with_checkpoints_s", f"{cp['verify_full_s']:.2f}"),
                ("verify_with_checkpoints_events", str(cp["verify_events"]))]
    return out
