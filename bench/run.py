"""The benchmark driver: ``python -m bench.run`` runs parts 1-4 and writes bench/REPORT.md,
bench/results.json and PNG plots (when matplotlib is installed).

Options: ``--runs N`` (default 5), ``--no-postgresql``, ``--report-only``, ``--quick`` (a few-second smoke run of every code path,
written to a temp directory unless ``--out`` is given), ``--parts 1,2,3,4``, ``--out DIR``.
Each part's failure is recorded in the report instead of stopping the others.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import policy_bench, postfix_bench, scale_bench, socketmap_bench
from bench.common import machine, summarize, yardstick

HERE = Path(__file__).resolve().parent

NOISE = ("Measured on a shared 2-core virtual machine: figures are noisy "
         "(see the load average and the min–max ranges). Server and load generator share the two cores. "
         "The yardstick (a fixed piece of Python, timed at the start and the end; lower is faster) tells how "
         "fast the host was: compare reports by it.")


def _cell(rows: list[dict[str, Any]], key: str, fmt: str) -> str:
    return summarize([r[key] for r in rows]).cell(fmt) if rows else "–"


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return summarize([r[key] for r in rows]).median if rows else float("nan")


def _ratio(ours: list[dict[str, Any]], peer: list[dict[str, Any]], paired: bool, fmt: str = "{:.2f}") -> tuple[float, str]:
    """The ratio of the median rates, and its text. Runs taken in turn (``paired``) also give
    the range of the run-by-run ratios: how far one run's ratio can stray from the median's."""
    ratio = _median(ours, "rate") / _median(peer, "rate")
    text = fmt.format(ratio)
    if paired and len(ours) == len(peer) > 1:
        each = summarize([a["rate"] / b["rate"] for a, b in zip(ours, peer, strict=True)])
        text += f" (run by run {fmt.format(each.minimum)}–{fmt.format(each.maximum)})"
    return ratio, text


def part1_md(data: dict[str, Any]) -> list[str]:
    lines = ["## 1. Policy daemon: decisions per second over a unix socket (postfwd: loopback TCP)", "",
             f"Median (min–max) of {data['runs']} runs of {data['duration']} s each; persistent connections, one "
             "request in flight per connection (as each smtpd process); requests are full Postfix 3.7 RCPT requests, "
             "half from partner domains spread over all connectors (half of those without TLS: REJECT 5.7.10), "
             "half from other domains. Client CPU is the load generator's CPU time as % of one core "
             "(1 client process for 1 connection, 2 otherwise). Server CPU is the server's own CPU time (user + "
             "system, all threads and child processes) per request answered: what a request costs it, whatever "
             "share of the cores the clients took." + (
                 " The floor and the tlsgate-policyd daemons run side by side, their runs interleaved (one run "
                 "of each in turn), so that a host slowing down moves them alike; postfwd follows."
                 if data.get("interleaved") else ""), "",
             "| server | verdict check | conns | requests/s | p50 ms | p99 ms | client CPU % | server CPU µs/request |",
             "|---|---|---|---|---|---|---|---|"]
    for s in data["servers"]:
        results = s.get("results") or {}
        if not results:
            lines.append(f"| {s['name']} | {s.get('check', s.get('error', ''))} | – | not counted | | | | |")
        for conns, rows in results.items():
            server_cpu = _cell(rows, "server_cpu_us", "{:.1f}") if all("server_cpu_us" in r for r in rows) else "–"
            lines.append(f"| {s['name']} | {'ok' if s.get('valid') else 'WRONG'} | {conns} | {_cell(rows, 'rate', '{:,.0f}')} | "
                         f"{_cell(rows, 'p50_ms', '{:.2f}')} | {_cell(rows, 'p99_ms', '{:.2f}')} | "
                         f"{_cell(rows, 'client_cpu_pct', '{:.0f}')} | {server_cpu} |")
    lines += ["", "Verdict checks:", ""] + [f"- {s['name']}: {s.get('check', '')} (start-up {s.get('startup_s', 0):.1f} s)"
                                              for s in data["servers"]]
    by = {s["name"]: s.get("results") or {} for s in data["servers"]}
    floor = next((s.get("results") or {} for s in data["servers"] if s["kind"] == "floor"), {})
    t10 = next((r for n, r in by.items() if n.startswith("tlsgate-policyd, 10 ")), {})
    t100k = next((r for n, r in by.items() if n.startswith("tlsgate-policyd, 100,000")), {})
    costs = [(label, rows["16"]) for label, rows in (("floor", floor), ("tlsgate-policyd, 10 connectors", t10),
                                                       ("tlsgate-policyd, 100,000 connectors", t100k))
             if "16" in rows and all("server_cpu_us" in r for r in rows["16"])]
    if costs:
        lines += ["", "Server CPU per request (medians, 16 connections): "
                  + ", ".join(f"{label} {_median(rows, 'server_cpu_us'):.1f} µs" for label, rows in costs) + "."]
    return lines


def part2_md(data: dict[str, Any]) -> list[str]:
    if "skipped" in data:
        return ["## 2. Through a real Postfix", "", f"Skipped: {data['skipped']}"]
    res = data["results"]
    cpu_columns = all("postfix_cpu_us" in r for modes in res.values() for rows in modes.values() for r in rows)
    lines = ["## 2. Through a real Postfix (STARTTLS, messages accepted per second)", "",
             f"Median (min–max) of {data['runs']} runs, {data['messages']} messages per configuration and run, "
             f"{data['processes']} client processes (smtplib: EHLO, STARTTLS, EHLO, then MAIL/RCPT/DATA). "
             "Configurations interleaved within each run. Ratio: median against Postfix alone, and the range of the "
             "ratios of the runs taken together (one run of each configuration in turn)."
             + (" CPU per message: the CPU time (user + system) that Postfix (its master and every process "
                "under it) and the configuration's add-on daemons spent while its messages were sent, per message; "
                "on two shared cores, what one of them spends more is taken from the others." if cpu_columns else ""),
             "",
             "| configuration | msgs/connection | messages/s | ratio to Postfix alone |"
             + (" Postfix CPU µs/message | add-on CPU µs/message |" if cpu_columns else ""),
             "|---|---|---|---|" + ("---|---|" if cpu_columns else "")]
    for config, modes in res.items():
        for k, rows in modes.items():
            _, ratio = _ratio(rows, res["postfix alone"][k], paired=config != "postfix alone")
            cpu_cells = ""
            if cpu_columns:
                add_on = _cell(rows, "addon_cpu_us", "{:,.0f}") if config != "postfix alone" else "–"
                cpu_cells = f" {_cell(rows, 'postfix_cpu_us', '{:,.0f}')} | {add_on} |"
            lines.append(f"| {config} | {k} | {_cell(rows, 'rate', '{:,.1f}')} | {ratio} |{cpu_cells}")
    lines.append("")
    for k in next(iter(res.values())):
        for ours, peer in (("tlsgate-policyd", "floor policy server"), ("tlsgate-milter", "no-op pymilter")):
            if ours in res and peer in res:
                lines.append(f"- {ours} / {peer}, {k} per connection: {_ratio(res[ours][k], res[peer][k], paired=True)[1]}")
    lines += ["", f"Decisions logged with the bench connector: tlsgate-policyd {data.get('policyd_decisions')}, "
              f"tlsgate-milter {data.get('milter_decisions')} (they were in the path)."]
    cpu = data.get("cpu_us_per_message")
    if cpu:
        lines += ["", "CPU time per message of each add-on process (user + system, all threads, over every message "
                  f"it saw): tlsgate-policyd {cpu['policyd']:.0f} µs, floor policy server {cpu.get('floor', 0):.0f} µs, "
                  f"tlsgate-milter {cpu['milter']:.0f} µs, no-op pymilter {cpu['noop']:.0f} µs."]
    return lines


def part3_md(data: dict[str, Any]) -> list[str]:
    lines = ["## 3. Scale of rules", "",
             f"{data['connectors']:,} inbound connectors, each with a sender domain and an address range "
             f"(plus one spare); median (min–max) of {data['runs']} loads, each in a fresh process "
             "loading as a daemon does (`tlsgate.store.load` with the reload cache, then the collection and freeze "
             "that follow a daemon's load); peak RSS from VmHWM in /proc/self/status, including the interpreter "
             "and libraries.", "",
             "| database | load s | peak RSS MB | RSS before load MB | change query µs |", "|---|---|---|---|---|"]
    for name, d in data["databases"].items():
        if "skipped" in d:
            lines.append(f"| {name} | skipped: {d['skipped']} | | | |")
            continue
        rows = d["load"]
        lines.append(f"| {name} | {_cell(rows, 'seconds', '{:.2f}')} | {_cell(rows, 'peak_rss_mb', '{:.0f}')} | "
                     f"{_cell(rows, 'rss_before_mb', '{:.0f}')} | {d['generation_query_us']:.0f} |")
    lines += ["", "Change applied (COMMIT of `UPDATE inbound_connector SET require_tls` to tlsgate-policyd answering by it, "
              "poll_interval 0.1 s, SQLite):", ""]
    for n, values in data["change_applied_s"].items():
        lines.append(f"- {int(n):,} connectors: {summarize(values).cell('{:.2f}')} s")
    return lines


def part4_md(data: dict[str, Any]) -> list[str]:
    lines = ["## 4. Socketmap (smtp_tls_policy_maps lookups)", "",
             f"Median (min–max) of {data['runs']} runs; unix socket, persistent connections.", "",
             "| outbound connectors | conns | lookups/s | p50 ms | p99 ms | client CPU % |", "|---|---|---|---|---|---|"]
    for count, by_conns in data["results"].items():
        for conns, rows in by_conns.items():
            lines.append(f"| {int(count):,} | {conns} | {_cell(rows, 'rate', '{:,.0f}')} | {_cell(rows, 'p50_ms', '{:.2f}')} | "
                         f"{_cell(rows, 'p99_ms', '{:.2f}')} | {_cell(rows, 'client_cpu_pct', '{:.0f}')} |")
    return lines


def _verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def targets_md(results: dict[str, Any]) -> list[str]:
    """The benchmark's targets, each against this run's medians: met or not, never by hand."""
    rows: list[tuple[str, str, bool]] = []
    p1 = results.get("1")
    if isinstance(p1, dict) and "servers" in p1:
        have = [s for s in p1["servers"] if s.get("valid") and s.get("results")]
        ours = sorted((s for s in have if s["kind"] == "tlsgate"), key=lambda s: s["connectors"])
        conns = "16" if ours and "16" in ours[0]["results"] else max((c for s in ours for c in s["results"]), key=int, default="")
        if ours and conns:
            base, most = ours[0], ours[-1]
            # The floor and the daemons take their runs in turn; postfwd runs on its own.
            interleaved = bool(p1.get("interleaved"))
            for kind, label, goal in (("floor", "the floor", 0.6), ("postfwd1", "postfwd1, 10 rules", 10.0),
                                      ("postfwd2", "postfwd2, 10 rules", 3.0)):
                peer = next((s for s in have if s["kind"] == kind and s["connectors"] <= 10 and conns in s["results"]), None)
                if peer is not None:
                    ratio, shown = _ratio(base["results"][conns], peer["results"][conns],
                                          paired=interleaved and kind == "floor", fmt="{:.2f}x")
                    rows.append((f"tlsgate-policyd ({base['connectors']:,} connectors) ≥ {goal:g}x {label}, {conns} conns",
                                 shown, ratio >= goal))
            if most is not base:
                ratios = {c: _ratio(most["results"][c], base["results"][c], paired=interleaved)
                          for c in base["results"] if c in most["results"]}
                others = ", ".join(f"{v:.2f} at {c}" for c, (v, _) in ratios.items() if c != conns)
                rows.append((f"{most['connectors']:,} connectors within 10% of {base['connectors']:,}, {conns} conns",
                             ratios[conns][1] + (f"; {others}" if others else ""), ratios[conns][0] >= 0.9))
            p99 = _median(base["results"][conns], "p99_ms")
            rows.append((f"p99 < 2 ms at {conns} conns", f"{p99:.2f} ms", p99 < 2.0))
    p2 = results.get("2")
    if isinstance(p2, dict) and "results" in p2:
        res = p2["results"]
        for ours_, peer, goal in (("tlsgate-policyd", "postfix alone", 0.97), ("tlsgate-milter", "no-op pymilter", 0.95)):
            if ours_ in res and peer in res:
                for k in res[ours_]:
                    ratio, shown = _ratio(res[ours_][k], res[peer][k], paired=True, fmt="{:.0%}")
                    if ours_ == "tlsgate-policyd" and "floor policy server" in res:
                        floor = _ratio(res["floor policy server"][k], res[peer][k], paired=True, fmt="{:.0%}")[1]
                        shown += f"; the do-nothing policy server: {floor}"
                    rows.append((f"{ours_} ≥ {goal:.0%} of {peer}, {k} per connection", shown, ratio >= goal))
    p3 = results.get("3")
    if isinstance(p3, dict) and "databases" in p3:
        for name, d in p3["databases"].items():
            if "load" in d:
                secs, mb = _median(d["load"], "seconds"), _median(d["load"], "peak_rss_mb")
                rows.append((f"load {p3['connectors']:,} connectors from {name} ≤ 3 s, < 300 MB",
                             f"{secs:.2f} s, {mb:.0f} MB", secs <= 3.0 and mb < 300))
        applied = p3.get("change_applied_s") or {}
        if applied:
            n = max(applied, key=int)
            secs = summarize(applied[n]).median
            rows.append((f"change applied ≤ 2 s at {int(n):,} connectors", f"{secs:.2f} s", secs <= 2.0))
    if not rows:
        return []
    return ["## Targets", "", "Each target of the benchmark against this run's medians. Where the two sides took "
            "their runs in turn, the range of the run-by-run ratios follows: a target inside that range is "
            "closer than this host can tell apart.", "",
            "| target | this run | met |", "|---|---|---|", *[f"| {t} | {v} | {_verdict(ok)} |" for t, v, ok in rows]]


def plots(results: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(matplotlib not installed: no plots)"]
    made = []
    p1 = results.get("1")
    if isinstance(p1, dict) and "servers" in p1:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        servers = [s for s in p1["servers"] if s.get("results")]
        conns = ["1", "16", "64"]
        width = 0.8 / max(1, len(servers))
        for i, s in enumerate(servers):
            values = [_median(s["results"][c], "rate") if c in s["results"] else 0 for c in conns]
            ax.bar([x + i * width for x in range(len(conns))], values, width, label=s["name"])
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(conns))], [f"{c} conn" for c in conns])
        ax.set_yscale("log")
        ax.set_ylabel("requests/s (median, log scale)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "policy_throughput.png", dpi=90)
        plt.close(fig)
        made.append("![policy throughput](policy_throughput.png)")
    p2 = results.get("2")
    if isinstance(p2, dict) and "results" in p2:
        fig, ax = plt.subplots(figsize=(8, 4))
        configs = list(p2["results"])
        modes = list(next(iter(p2["results"].values())))
        for j, k in enumerate(modes):
            ax.bar([x + j * 0.4 for x in range(len(configs))], [_median(p2["results"][c][k], "rate") for c in configs],
                   0.4, label=f"{k} msg/connection")
        ax.set_xticks([x + 0.2 for x in range(len(configs))], configs, fontsize=8)
        ax.set_ylabel("messages/s (median)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "postfix_throughput.png", dpi=90)
        plt.close(fig)
        made.append("![postfix throughput](postfix_throughput.png)")
    return made


def report(results: dict[str, Any], info: dict[str, str], out: Path, runs: int, elapsed: float) -> str:
    lines = ["# tlsgate benchmarks", "", "Generated by `make bench` (`python -m bench.run`); raw figures in results.json.", "",
             f"> {NOISE}", "", "## Machine and versions", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += [f"| runs per figure | {runs} |", f"| total bench time | {elapsed:.0f} s |", ""]
    for part, render in (("1", part1_md), ("2", part2_md), ("3", part3_md), ("4", part4_md)):
        data = results.get(part)
        if data is None:
            continue
        if isinstance(data, dict) and "error" in data:
            lines += [f"## {part}. failed", "", "```", data["error"], "```", ""]
            continue
        lines += [*render(data), ""]
    targets = targets_md(results)
    if targets:
        lines += [*targets, ""]
    lines += ["## Plots", "", *plots(results, out), ""]
    notes = HERE / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run of every code path")
    parser.add_argument("--parts", default="1,2,3,4")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-postgresql", action="store_true", help="part 3 on SQLite only")
    parser.add_argument("--report-only", action="store_true", help="rewrite REPORT.md from results.json")
    args = parser.parse_args(argv)
    quick = args.quick
    out = args.out or (Path(tempfile.mkdtemp(prefix="tlsgate-bench-out-")) if quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        saved = json.loads((out / "results.json").read_text())
        (out / "REPORT.md").write_text(report(saved["results"], saved["machine"], out, args.runs, saved.get("elapsed", 0)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="tlsgate-bench-"))
    runs = 1 if quick else args.runs
    parts = {p.strip() for p in args.parts.split(",")}
    began = time.monotonic()
    info = machine()
    info["yardstick at start"] = f"{yardstick():.2f} µs"
    results: dict[str, Any] = {}
    jobs = {
        "1": lambda: policy_bench.run(work / "p1", runs=runs, duration=0.3 if quick else 1.0,
                                      connector_counts=(10, 1000) if quick else (10, 10_000, 100_000),
                                      postfwd_counts=(10,) if quick else (10, 1000), conns=(1, 4) if quick else (1, 16, 64),
                                      sample=40 if quick else 200),
        "2": lambda: postfix_bench.run(work / "p2", runs=runs, messages=8 if quick else 500,
                                       processes=2 if quick else 4, per_session=(1, 4) if quick else (1, 10)),
        "3": lambda: scale_bench.run(work / "p3", runs=runs, connectors=500 if quick else 100_000,
                                     query_count=50 if quick else 2000, postgresql=not args.no_postgresql),
        "4": lambda: socketmap_bench.run(work / "p4", runs=runs, counts=(10, 500) if quick else (10, 100_000),
                                         conns=(1, 4) if quick else (1, 16), duration=0.3 if quick else 1.0),
    }
    try:
        for part, job in jobs.items():
            if part not in parts:
                continue
            print(f"part {part}", flush=True)
            try:
                results[part] = job()
            except Exception:  # one part failing must not lose the others' figures
                results[part] = {"error": traceback.format_exc()[-3000:]}
                print(results[part]["error"], flush=True)
            (out / "results.json").write_text(json.dumps({"machine": info, "results": results}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - began
    info["yardstick at end"] = f"{yardstick():.2f} µs"
    (out / "results.json").write_text(json.dumps({"machine": info, "results": results, "elapsed": elapsed}, indent=1))
    (out / "REPORT.md").write_text(report(results, info, out, runs, elapsed))
    print(f"wrote {out / 'REPORT.md'}")
    return 1 if any(isinstance(r, dict) and "error" in r for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
