#!/usr/bin/env python3
"""Turns the outputs of benches/compare.sh into a markdown table and an SVG plot.

    report.py OUT_DIR                        writes OUT_DIR/summary.md and OUT_DIR/latency.svg
    report.py --pgbench LATENCIES PGBENCH_OUTPUT   prints a bench-style JSON report for a
                                             pgbench run (latencies: one microsecond value per line)
    report.py --wrk ROUNDS CONNECTIONS       the same for wrk runs (ROUNDS: the JSON lines of
                                             benches/wrk-report.lua, one per round)

Standard library only.
"""

import csv
import glob
import json
import math
import os
import re
import statistics
import sys

MB = 1024 * 1024


def quantile(sorted_values, q):
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[i])


def plot_quantiles():
    return [1.0 - 10 ** (-k / 10.0) for k in range(51)]


def pgbench_report(lat_path, out_path):
    with open(lat_path) as f:
        lat = sorted(float(line) for line in f if line.strip())
    text = open(out_path).read()
    tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", text)
    clients = re.search(r"number of clients: (\d+)", text)
    duration = re.search(r"duration: (\d+) s", text)
    elapsed = float(duration.group(1)) if duration else 0.0
    q = lambda p: quantile(lat, p)
    report = {
        "target": "pgbench",
        "concurrency": int(clients.group(1)) if clients else None,
        "requests": len(lat),
        "errors": 0,
        "elapsed_s": elapsed,
        "throughput_rps": float(tps.group(1)) if tps else (len(lat) / elapsed if elapsed else 0.0),
        "latency_us": {
            "min": lat[0] if lat else 0.0,
            "mean": statistics.fmean(lat) if lat else 0.0,
            "p50": q(0.50),
            "p90": q(0.90),
            "p95": q(0.95),
            "p99": q(0.99),
            "p999": q(0.999),
            "max": lat[-1] if lat else 0.0,
        },
        "distribution": [[p * 100, q(p)] for p in plot_quantiles()] + ([[100.0, lat[-1]]] if lat else []),
    }
    print(json.dumps(report))


def load(out_dir, name):
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def redis(out_dir, c):
    path = os.path.join(out_dir, f"redis-get-c{c}.csv")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("test") == "GET"]
    if not rows:
        return None
    r = rows[0]
    ms = lambda k: float(r[k]) * 1000.0
    return {
        "target": "redis",
        "throughput_rps": float(r["rps"]),
        "requests": None,
        "errors": 0,
        "latency_us": {"p50": ms("p50_latency_ms"), "p95": ms("p95_latency_ms"), "p99": ms("p99_latency_ms"),
                       "max": ms("max_latency_ms"), "p90": None, "p999": None},
        "distribution": [[50.0, ms("p50_latency_ms")], [95.0, ms("p95_latency_ms")], [99.0, ms("p99_latency_ms")],
                         [100.0, ms("max_latency_ms")]],
    }


def baselines(o):
    """{kind: (report, ratios, ratios_by_round)}: the baselines in their own processes
    (`compared`), or the in-process one."""
    out = {}
    for c in o.get("compared") or []:
        out[c["name"]] = (c["report"], c.get("ratios"), c.get("ratios_by_round") or [])
    if o.get("baseline"):
        out["in-process"] = (o["baseline"], o.get("ratios"), o.get("ratios_by_round") or [])
    return out


def wrk_report(path, connections):
    """A bench-style report from the JSON lines benches/wrk-report.lua prints, one per
    round: the round with the median throughput, with every round's throughput kept."""
    with open(path) as f:
        rounds = [json.loads(line) for line in f if line.startswith("{")]
    if not rounds:
        return None
    for r in rounds:
        r["throughput_rps"] = r["requests"] / (r["duration_us"] / 1e6)
    med = sorted(rounds, key=lambda r: r["throughput_rps"])[len(rounds) // 2]
    lat = {k: float(med[k]) for k in ("p50", "p90", "p95", "p99", "p999", "max")}
    lat["min"], lat["mean"] = float(med["min"]), float(med["mean"])
    return {
        "target": "openbao",
        "concurrency": connections,
        "requests": med["requests"],
        "errors": med["errors"],
        "throughput_rps": med["throughput_rps"],
        "rounds_rps": [r["throughput_rps"] for r in rounds],
        "latency_us": lat,
        "distribution": [[float(p), float(v)] for p, v in med["distribution"]],
    }


def fmt_us(v):
    if v is None:
        return "-"
    if v >= 10000:
        return f"{v / 1000:.1f} ms"
    if v >= 1000:
        return f"{v / 1000:.2f} ms"
    return f"{v:.0f} us"


def fmt_rps(v):
    return "-" if v is None else f"{v:,.0f}"


def fmt_ratio(v):
    return "-" if v is None else f"{v:.2f}x"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# (file, description, callers) in table order.
RUNS = [
    ("hit-memoize-c1", "credvault GetCredential, cache hit, memoized plaintext", "1 / 1 conn"),
    ("hit-per-read-c1", "credvault GetCredential, cache hit, decrypt per read", "1 / 1 conn"),
    ("hit-1worker-c1", "credvault cache hit (memoized), daemon on 1 worker thread", "1 / 1 conn"),
    ("hit-memoize-c64", "credvault GetCredential, cache hit, memoized plaintext", "64 / 4 conn"),
    ("hit-zipf-c64", "credvault cache hit (memoized), zipfian keys (s = 0.99)", "64 / 4 conn"),
    ("hit-per-read-c64", "credvault GetCredential, cache hit, decrypt per read", "64 / 4 conn"),
    ("hit-1worker-c64", "credvault cache hit (memoized), daemon on 1 worker thread", "64 / 4 conn"),
    ("rate-10k", "credvault cache hit at a fixed 10,000 req/s (open loop)", "64 / 4 conn"),
    ("miss-postgres-c1", "credvault miss on PostgreSQL (name not found: one query)", "1 / 1 conn"),
    ("load-postgres-c1", "credvault miss on PostgreSQL (cache off: load row + decrypt)", "1 / 1 conn"),
    ("put-postgres-c1", "credvault PutCredential with CAS on PostgreSQL", "1 / 1 conn"),
    ("put-postgres-c64", "credvault PutCredential with CAS on PostgreSQL", "64 / 4 conn"),
    ("miss-sqlite-c1", "credvault miss on SQLite (name not found: one query)", "1 / 1 conn"),
    ("load-sqlite-c1", "credvault miss on SQLite (cache off: load row + decrypt)", "1 / 1 conn"),
    ("put-sqlite-c1", "credvault PutCredential with CAS on SQLite", "1 / 1 conn"),
    ("put-sqlite-c64", "credvault PutCredential with CAS on SQLite", "64 / 4 conn"),
]


def summary(out_dir):
    runs = {name: load(out_dir, f"{name}.json") for name, _, _ in RUNS}
    lines = [
        "| run | callers | req/s | p50 | p90 | p95 | p99 | p99.9 | max | errors | raw HTTP/2 req/s | raw p95 "
        "| req/s vs raw | p95 vs raw (by round) | req/s vs tonic | p95 vs tonic (by round) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def by_rounds(by_round):
        return " (" + " / ".join(f"{x['p95']:.2f}" for x in by_round) + ")" if by_round else ""

    def row(label, callers, r, o=None):
        l = r["latency_us"]
        raw = baselines(o).get("raw") if o else None
        tonic = baselines(o).get("tonic") if o else None
        cells = ["-", "-", "-", "-", "-", "-"]
        if raw and raw[1]:
            cells[0:4] = [fmt_rps(raw[0]["throughput_rps"]), fmt_us(raw[0]["latency_us"]["p95"]),
                          fmt_ratio(raw[1]["throughput"]), fmt_ratio(raw[1]["p95"]) + by_rounds(raw[2])]
        if tonic and tonic[1]:
            cells[4:6] = [fmt_ratio(tonic[1]["throughput"]), fmt_ratio(tonic[1]["p95"]) + by_rounds(tonic[2])]
        lines.append(
            f"| {label} | {callers} | {fmt_rps(r['throughput_rps'])} | {fmt_us(l.get('p50'))} | {fmt_us(l.get('p90'))} "
            f"| {fmt_us(l.get('p95'))} | {fmt_us(l.get('p99'))} | {fmt_us(l.get('p999'))} | {fmt_us(l.get('max'))} "
            f"| {r.get('errors', 0) if r.get('requests') is not None else '-'} | " + " | ".join(cells) + " |"
        )

    labels = {"raw": "raw HTTP/2 baseline: hyper, one pre-encoded reply, own process",
              "tonic": "tonic baseline: tonic Server and Router, constant reply, own process",
              "in-process": "tonic baseline inside the load generator's process"}
    for name, c in (("hit-memoize-c1", "1 / 1 conn"), ("hit-memoize-c64", "64 / 4 conn"), ("rate-10k", "64 / 4 conn")):
        o = runs.get(name)
        for kind, (b, _, _) in (baselines(o) if o else {}).items():
            row(labels[kind] + (" at 10,000 req/s" if name == "rate-10k" else ""), c, b)
    for name, desc, c in RUNS:
        o = runs.get(name)
        if not o or not o.get("credvault"):
            continue
        row(f"{desc} (`{name}`)", c, o["credvault"], o)
    for c in (1, 64):
        r = load(out_dir, f"openbao-c{c}.json")
        if r:
            row("OpenBao KV v2 read, 256-byte value, HTTP/1.1 JSON, in-memory dev server (`wrk`)", f"{c} / {c} conn", r)
    for c in (1, 64):
        r = redis(out_dir, c)
        if r:
            row("Redis GET, 256-byte value (`redis-benchmark -t get`)", f"{c} / {c} conn", r)
    for c in (1, 64):
        r = load(out_dir, f"pgbench-c{c}.json")
        if r:
            row("PostgreSQL point select by primary key (`pgbench -S -M prepared`)", f"{c} / {c} conn", r)

    targets = []

    def verdict(ok):
        return "**met**" if ok else "**missed**"

    o = runs.get("hit-memoize-c1")
    for kind, (_, r, by_round) in (baselines(o) if o else {}).items():
        if r:
            med = median([x["p95"] for x in by_round])
            targets.append(f"| one caller: cache hit p95 <= 1.3x {kind} baseline p95 | {r['p95']:.2f}x pooled, "
                           f"{med:.2f}x median of rounds | {verdict(r['p95'] <= 1.3)} |")
    o = runs.get("hit-memoize-c64")
    for kind, (_, r, by_round) in (baselines(o) if o else {}).items():
        if r:
            rounds = " / ".join(f"{x['throughput'] * 100:.0f}%" for x in by_round)
            targets.append(f"| 64 callers / 4 connections: throughput >= 60% of {kind} baseline | "
                           f"{r['throughput'] * 100:.0f}% ({rounds}) | {verdict(r['throughput'] >= 0.6)} |")
            targets.append(f"| 64 callers / 4 connections: p95 <= 2x {kind} baseline | {r['p95']:.2f}x"
                           f"{by_rounds(by_round)} | {verdict(r['p95'] <= 2.0)} |")
    o = runs.get("rate-10k")
    if o and o.get("credvault"):
        l = o["credvault"]["latency_us"]
        targets.append(f"| 10,000 req/s open loop: p95 < 1 ms, p99 < 2 ms | p95 {fmt_us(l['p95'])}, p99 {fmt_us(l['p99'])} "
                       f"(at {fmt_rps(o['credvault']['throughput_rps'])} req/s) | {verdict(l['p95'] < 1000 and l['p99'] < 2000)} |")
    for name, what in (("load-postgres-c1", "row load + decrypt"), ("miss-postgres-c1", "not found")):
        o = runs.get(name)
        if o and o.get("credvault"):
            p95 = o["credvault"]["latency_us"]["p95"]
            targets.append(f"| cache miss on PostgreSQL ({what}), one caller: p95 < 5 ms | {fmt_us(p95)} | {verdict(p95 < 5000)} |")
    o = runs.get("put-postgres-c1")
    if o and o.get("credvault"):
        p95 = o["credvault"]["latency_us"]["p95"]
        targets.append(f"| put on PostgreSQL, one caller: p95 < 10 ms | {fmt_us(p95)} | {verdict(p95 < 10000)} |")
    mem = load(out_dir, "memory-100k.json")
    empty = load(out_dir, "memory-empty.json")
    writer = load(out_dir, "memory-writer.json")
    if mem and mem.get("server_rss_bytes"):
        rss = mem["server_rss_bytes"] / MB
        base = f" (a fresh daemon filled by reads; {empty['server_rss_bytes'] / MB:.1f} MiB before)" if empty else ""
        if writer and writer.get("server_rss_bytes"):
            base += f"; {writer['server_rss_bytes'] / MB:.1f} MiB for the daemon that also wrote them"
        targets.append(f"| 100,000 cached 256-byte credentials: < 100 MB RSS | {rss:.1f} MiB{base} | {verdict(mem['server_rss_bytes'] < 100e6)} |")

    settings = next((o["settings"] for o in runs.values() if o), None)
    md = ["## Results", ""]
    if settings:
        md.append(f"Each credvault run: {settings['rounds']} round(s) of {settings.get('duration_s')} s after "
                  f"{settings['warmup_s']} s of warm-up; with baselines, each round measures every baseline and "
                  "the daemon with the same client, the order rotating by round, and ratios compare them within "
                  "the same run. Latencies pool every round.")
        md.append("")
    md += lines
    if targets:
        md += ["", "### Targets", "", "| target | measured | |", "|---|---|---|"] + targets
    md.append("")
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(md))
    return runs


COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


def x_of(p):
    """Percentile to x: -log10(1 - q), the usual HDR plot axis; the maximum goes last."""
    if p >= 100.0:
        return 5.5
    q = p / 100.0
    return min(5.0, -math.log10(max(1e-9, 1.0 - q)))


def panel(title, series, x0, y0, w, h):
    out = [f'<text x="{x0 + w / 2}" y="{y0 - 12}" text-anchor="middle" font-size="14" font-weight="bold">{title}</text>']
    values = [v for _, pts in series for _, v in pts if v and v > 0]
    if not values:
        return out
    lo = 10 ** math.floor(math.log10(min(values)))
    hi = 10 ** math.ceil(math.log10(max(values)))
    ly0, ly1 = math.log10(lo), math.log10(hi)
    sx = lambda x: x0 + x / 5.5 * w
    sy = lambda v: y0 + h - (math.log10(v) - ly0) / (ly1 - ly0) * h
    out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#333"/>')
    for x, label in ((0, "0%"), (1, "90%"), (2, "99%"), (3, "99.9%"), (4, "99.99%"), (5, "99.999%"), (5.5, "max")):
        out.append(f'<line x1="{sx(x)}" y1="{y0}" x2="{sx(x)}" y2="{y0 + h}" stroke="#ddd"/>')
        out.append(f'<text x="{sx(x)}" y="{y0 + h + 16}" text-anchor="middle" font-size="11">{label}</text>')
    decade = ly0
    while decade <= ly1 + 1e-9:
        for m in (1, 2, 5):
            v = m * 10 ** decade
            if lo <= v <= hi:
                label = f"{v / 1000:g} ms" if v >= 1000 else f"{v:g} us"
                out.append(f'<line x1="{x0}" y1="{sy(v):.1f}" x2="{x0 + w}" y2="{sy(v):.1f}" stroke="{"#ccc" if m == 1 else "#eee"}"/>')
                out.append(f'<text x="{x0 - 6}" y="{sy(v) + 4:.1f}" text-anchor="end" font-size="11">{label}</text>')
        decade += 1
    out.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 34}" text-anchor="middle" font-size="12">percentile</text>')
    for i, (name, pts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        pts = [(x_of(p), v) for p, v in pts if v and v > 0]
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(v):.1f}" for j, (x, v) in enumerate(pts))
        dash = ' stroke-dasharray="5,3"' if name.startswith(("Redis", "PostgreSQL", "OpenBao")) else ""
        out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.8"{dash}/>')
        for x, v in pts[-1:]:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(v):.1f}" r="2.5" fill="{color}"/>')
        ly = y0 + 14 + i * 15
        out.append(f'<line x1="{x0 + 8}" y1="{ly - 4}" x2="{x0 + 26}" y2="{ly - 4}" stroke="{color}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{x0 + 30}" y="{ly}" font-size="11">{name}</text>')
    return out


def plot(out_dir, runs):
    def s(name, target, label):
        o = runs.get(name)
        if o and o.get(target) and o[target].get("distribution"):
            return [(label, o[target]["distribution"])]
        return []

    def ext(report, label):
        return [(label, report["distribution"])] if report and report.get("distribution") else []

    def cmp(name, kind, label):
        o = runs.get(name)
        b = baselines(o).get(kind) if o else None
        return [(label, b[0]["distribution"])] if b and b[0].get("distribution") else []

    one = (cmp("hit-memoize-c1", "raw", "raw HTTP/2 baseline")
           + cmp("hit-memoize-c1", "tonic", "tonic baseline")
           + s("hit-memoize-c1", "credvault", "credvault hit (memoized)")
           + s("hit-per-read-c1", "credvault", "credvault hit (decrypt per read)")
           + s("load-postgres-c1", "credvault", "credvault miss, PostgreSQL (load+decrypt)")
           + s("put-postgres-c1", "credvault", "credvault put (CAS), PostgreSQL")
           + ext(load(out_dir, "openbao-c1.json"), "OpenBao KV v2 read (HTTP/1.1)")
           + ext(redis(out_dir, 1), "Redis GET")
           + ext(load(out_dir, "pgbench-c1.json"), "PostgreSQL point select"))
    many = (cmp("hit-memoize-c64", "raw", "raw HTTP/2 baseline")
            + cmp("hit-memoize-c64", "tonic", "tonic baseline")
            + s("hit-memoize-c64", "credvault", "credvault hit (memoized)")
            + s("hit-per-read-c64", "credvault", "credvault hit (decrypt per read)")
            + cmp("rate-10k", "raw", "raw HTTP/2 baseline at 10k req/s")
            + s("rate-10k", "credvault", "credvault hit at 10k req/s")
            + s("put-postgres-c64", "credvault", "credvault put (CAS), PostgreSQL")
            + ext(load(out_dir, "openbao-c64.json"), "OpenBao KV v2 read (HTTP/1.1)")
            + ext(redis(out_dir, 64), "Redis GET")
            + ext(load(out_dir, "pgbench-c64.json"), "PostgreSQL point select"))
    w, h = 470, 380
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w + 200}" height="{h + 110}" '
           'font-family="sans-serif" style="background:#fff">',
           f'<rect width="{2 * w + 200}" height="{h + 110}" fill="#fff"/>']
    svg += panel("One caller (closed loop): latency by percentile", one, 80, 40, w, h)
    svg += panel("64 callers over 4 connections: latency by percentile", many, 80 + w + 100, 40, w, h)
    svg.append("</svg>")
    with open(os.path.join(out_dir, "latency.svg"), "w") as f:
        f.write("\n".join(svg) + "\n")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--pgbench":
        pgbench_report(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--wrk":
        print(json.dumps(wrk_report(sys.argv[2], int(sys.argv[3]))))
        return
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out_dir = sys.argv[1]
    runs = summary(out_dir)
    plot(out_dir, runs)


if __name__ == "__main__":
    main()
