"""Throughput, CPU and latency of the pipeline against the best Python options, in one
run on one broker, with repeats whose ratios can be trusted.

``python bench/run.py [--quick] [--repeats 3] [--only ...]`` (or ``make bench``) starts
one embedded broker (Tansu), prepares a million simulated readings (~100-byte JSON)
and what each stage reads of them (landing; raw: ingest's output with its lineage
headers, ~250 bytes; parsed; enriched: each made by the stage's own engine,
in-process), and measures, each path on topics and groups of its own:

* one stage's worth of work (``single.py``): ``raw`` (a confluent-kafka consume →
  parse-like transform → produce → commit loop, the ceiling), ``quix`` (quixstreams
  pass-through with the same transform), ``naive_faust`` (a Faust agent, per event),
  and each of our stages alone (``pipeline run STAGE``); parse also with 2 and 4
  workers (``parse_x2``, ``parse_x4``);
* four stages end to end (``e2e.py``): ours (one worker per stage; 2 and 4 per stage
  in ``e2e_ours_x2``/``_x4``), the same four stages in quixstreams (``e2e_quix``)
  and as raw confluent-kafka loops (``e2e_raw``, the ceiling for four Python
  processes), on a backlog, with a count of the readings in the closed windows;
* latency (``latency.py``): our four workers at 10 %, 50 % and 90 % of the
  sustained rate, per hop.

Repeats are interleaved: every path once per round, ``--repeats`` rounds (A B C …
A B C …), so a machine that gets busier part-way hits every path. Each path runs long
enough that the commit interval (1 s) does not matter: ≥ 1M records for the one-stage
paths (naive Faust: ≥ 30 s), ≥ 30 s for the four-stage ones. The primary figure is
CPU µs per record of the path's processes and the broker (``/proc``), records/s beside
it; both as median (min to max) over the repeats, with how many cores the rest of the
machine used meanwhile.

Writes ``bench/results/latest.json`` (the issue's keys, as medians) and ``latest.md``.
Every process it starts is stopped at exit, also on error, timeout or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data import delete_topics, ingested, produce_all, run_config, simulated
from e2e import run_e2e
from latency import run_latency
from procs import BENCH, BenchError, BenchTimeout, broker_pid, log, stop_children
from report import environment, markdown, summarise, summarise_runs, write_results
from single import Bench, run_path, run_stage_alone

from pipeline.demo.simulator import SimRecord
from pipeline.engine.build import build_engine, load_stage
from pipeline.kafka.embedded import start_embedded
from pipeline.records import Record
from pipeline.settings import Settings
from stages.enrich import read_registry_csv

RESULTS = BENCH / "results"
ONE_STAGE = ("raw", "quix", "naive_faust", "parse", "ingest", "enrich", "aggregate")
SCALING_ONE = ("parse_x2", "parse_x4")
FOUR_STAGES = ("e2e_raw", "e2e_quix", "e2e_ours")
SCALING_FOUR = ("e2e_ours_x2", "e2e_ours_x4")
ALL = (*ONE_STAGE, *SCALING_ONE, *FOUR_STAGES, *SCALING_FOUR, "latency")
#: twins run only when named in ``--only``: our paths with each batch's outputs
#: acknowledged before the next batch starts (``runner.batches_in_flight: 1``)
TWINS = ("parse_inflight1", "e2e_ours_inflight1")
INFLIGHT1_ENV = {"PIPELINE_RUNNER__BATCHES_IN_FLIGHT": "1"}
#: the latency run's ``--latency-fetch100`` variant: a shorter Fetch wait (the default is 500)
FETCH100_ENV = {"PIPELINE_RUNNER__FETCH_MAX_WAIT_MS": "100"}


class Prepared:
    """The inputs every repeat reads: one topic per stage input, filled once."""

    def __init__(self, bench: Bench, records: list[SimRecord], naive: int, only: set[str]):
        t = time.monotonic()
        _, settings = run_config(bench.workdir, bench.bootstrap, f"prep{os.getpid()}")
        self.settings = settings
        stage_input = {s: settings.stage(s).inputs[0] for s in ("ingest", "parse", "enrich")}
        stage_input["aggregate"] = settings.stage("aggregate").inputs[0]
        self.inputs = stage_input
        self.naive = f"{stage_input['parse']}.naive"
        needs = set(only)
        produce_all(
            settings, stage_input["ingest"], ((r.key, r.value, None, None) for r in records)
        )
        raw = ingested(settings, records, stage_input["ingest"])
        self.record_bytes = {
            "value": statistics.fmean(len(v) for _, v, _, _ in raw),
            "headers": statistics.fmean(
                sum(len(k) + len(v) for k, v in h or ()) for _, _, h, _ in raw
            ),
        }
        produce_all(settings, stage_input["parse"], raw)
        if "naive_faust" in needs:
            from data import create_plain_topics

            create_plain_topics(bench.bootstrap, [self.naive], 4)
            produce_all(settings, self.naive, raw[:naive])
        if needs & {"enrich", "aggregate"}:
            parsed = through(settings, "parse", raw, stage_input["parse"])
            del raw
            produce_all(settings, stage_input["enrich"], parsed)
            if "aggregate" in needs:
                enriched = through(settings, "enrich", parsed, stage_input["enrich"])
                del parsed
                produce_all(settings, stage_input["aggregate"], enriched)
        self.seconds = time.monotonic() - t


def through(settings: Settings, stage: str, items: list[Any], topic: str) -> list[Any]:
    """What ``stage``'s engine makes of ``items`` (in-process, no broker)."""
    devices = read_registry_csv((BENCH.parent / "config" / "devices.csv").read_text())
    lookups = {"devices": {d.device_id.encode(): d.to_json() for d in devices}}
    spec = settings.stages[stage]
    engine = build_engine(
        stage, spec, load_stage(settings, stage), lookups if spec.lookups else None
    )
    now = int(time.time() * 1000)
    out: list[Any] = []
    for first in range(0, len(items), 2000):
        batch = [
            Record(topic, 0, i, ts or now, key, value, tuple(headers or ()))
            for i, (key, value, headers, ts) in enumerate(items[first : first + 2000], start=first)
        ]
        result = engine.process(0, batch)
        if result.dead:
            raise BenchError(f"in-process {stage} rejected prepared records")
        out += [(o.key, o.value, o.headers, o.timestamp_ms) for o in result.outputs]
    return out


def plan(args: argparse.Namespace) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """The paths of one round, in order."""
    bench: Bench = args.bench
    prep: Prepared = args.prepared
    e2e = args.e2e_records_list
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "raw": lambda: run_path(bench, "raw", "raw", prep.inputs["parse"]),
        "quix": lambda: run_path(bench, "quix", "quix", prep.inputs["parse"]),
        "naive_faust": lambda: run_path(bench, "naive_faust", "naive", prep.naive),
        "parse": lambda: run_stage_alone(bench, "parse", prep.inputs["parse"]),
        "ingest": lambda: run_stage_alone(bench, "ingest", prep.inputs["ingest"]),
        "enrich": lambda: run_stage_alone(bench, "enrich", prep.inputs["enrich"]),
        "aggregate": lambda: run_stage_alone(bench, "aggregate", prep.inputs["aggregate"]),
        "parse_x2": lambda: run_stage_alone(bench, "parse", prep.inputs["parse"], 2, "parse_x2"),
        "parse_x4": lambda: run_stage_alone(bench, "parse", prep.inputs["parse"], 4, "parse_x4"),
        "e2e_raw": lambda: run_e2e(bench, "raw", args.records_list[: args.e2e_raw_records]),
        "e2e_quix": lambda: run_e2e(bench, "quix", e2e),
        "e2e_ours": lambda: run_e2e(bench, "ours", e2e),
        "e2e_ours_x2": lambda: run_e2e(bench, "ours", e2e, workers=2),
        "e2e_ours_x4": lambda: run_e2e(bench, "ours", e2e, workers=4),
        "parse_inflight1": lambda: run_stage_alone(
            bench, "parse", prep.inputs["parse"], 1, "parse_inflight1", INFLIGHT1_ENV
        ),
        "e2e_ours_inflight1": lambda: run_e2e(bench, "ours", e2e, extra=INFLIGHT1_ENV),
    }
    return [(key, fn) for key, fn in steps.items() if key in args.only]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: small, 1 repeat")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (3; --quick 1)")
    parser.add_argument("--records", type=int, default=None, help="one-stage paths (1,000,000)")
    parser.add_argument("--naive-records", type=int, default=None, help="naive Faust (150,000)")
    parser.add_argument("--e2e-records", type=int, default=None, help="four stages (600,000)")
    parser.add_argument("--latency-s", type=float, default=None, help="per load level (30 s)")
    parser.add_argument(
        "--latency-fetch100",
        action="store_true",
        help="also run the latency levels with fetch_max_wait_ms=100 (default 500)",
    )
    parser.add_argument(
        "--latency-variant",
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE[,KEY=VALUE]",
        help="also run the latency levels with these worker settings (repeatable), e.g. "
        "commit02=PIPELINE_RUNNER__COMMIT_INTERVAL_S=0.2",
    )
    parser.add_argument("--only", default=",".join(ALL), help=f"comma list of {','.join(ALL)}")
    parser.add_argument("--skip", default="", help="comma list of paths to leave out")
    parser.add_argument("--timeout", type=float, default=3600, help="give up after (s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the workers' logs (kept anyway on errors)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy each one-process path (OUT/profile-*.txt)"
    )
    args = parser.parse_args()
    quick = args.quick
    args.repeats = args.repeats or (1 if quick else 3)
    args.records = args.records or (60_000 if quick else 1_000_000)
    args.naive_records = min(args.records, args.naive_records or (5_000 if quick else 150_000))
    args.e2e_records = min(args.records, args.e2e_records or (30_000 if quick else 600_000))
    args.e2e_raw_records = min(args.records, 2 * args.e2e_records)
    args.latency_s = args.latency_s or (8.0 if quick else 30.0)
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    skip = {p.strip() for p in args.skip.split(",") if p.strip()}
    unknown = sorted((set(only) | skip) - set(ALL) - set(TWINS))
    if unknown:
        parser.error(f"unknown path(s) {unknown}; choose from {','.join(ALL)}")
    args.only = [p for p in only if p not in skip]

    def on_alarm(signum: int, frame: Any) -> None:
        raise BenchTimeout(f"the benchmark ran past --timeout {args.timeout:.0f}s")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(int(args.timeout))

    started = time.monotonic()
    results: dict[str, Any] = {
        "environment": environment(),
        "settings": {
            "repeats": args.repeats,
            "records": args.records,
            "naive_records": args.naive_records,
            "e2e_records": args.e2e_records,
            "e2e_raw_records": args.e2e_raw_records,
            "latency_s": args.latency_s,
            "command": " ".join(["bench/run.py", *sys.argv[1:]]),
        },
        "records": args.records,
        "naive_records": args.naive_records,
        "runs": {},
        "summary": {},
        "errors": [],
    }
    workdir = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    broker = None
    code = 0
    runs: dict[str, list[dict[str, Any]]] = results["runs"]
    try:
        broker = start_embedded()
        log(f"broker at {broker.bootstrap}; logs in {workdir}")
        bench = Bench(broker.bootstrap, broker_pid(), workdir, args.out if args.profile else None)
        args.bench = bench
        records = simulated(args.records)
        args.records_list = records
        args.e2e_records_list = records[: args.e2e_records]
        prep = Prepared(bench, records, args.naive_records, set(args.only))
        args.prepared = prep
        results["record_bytes"] = prep.record_bytes
        results["prepare_s"] = prep.seconds
        log(f"{len(records):,} records prepared in {prep.seconds:.0f}s")

        steps = plan(args)
        for round_no in range(1, args.repeats + 1):
            for key, fn in steps:
                log(f"round {round_no}/{args.repeats}: {key} …")
                t = time.monotonic()
                load = os.getloadavg()[0]
                try:
                    result = fn()
                except BenchError as exc:
                    log(f"{key} failed: {exc}")
                    result = {"error": str(exc)}
                    results["errors"].append(
                        f"{key} (round {round_no}): {str(exc).splitlines()[0]}"
                    )
                    stop_children()
                result["round"] = round_no
                result["wall_s"] = time.monotonic() - t
                result["loadavg"] = [load, os.getloadavg()[0]]
                runs.setdefault(key, []).append(result)
                if result.get("records_per_s"):
                    log(
                        f"{key}: {result['records_per_s']:,.0f} records/s, "
                        f"{result.get('total_cpu_us_per_record', 0):.1f} µs CPU/record "
                        f"(others {result.get('others_cores', 0):.2f} cores)"
                    )
        results["summary"] = {key: summarise_runs(r) for key, r in runs.items()}
        delete_topics(broker.bootstrap, [*prep.inputs.values(), prep.naive])

        if "latency" in args.only:
            sustained = results["summary"].get("e2e_ours", {}).get("records_per_s")
            max_rate = sustained or (3000.0 if quick else 10_000.0)
            try:
                results["latency"] = run_latency(bench, max_rate, args.latency_s)
                variants = [("fetch100", FETCH100_ENV)] if args.latency_fetch100 else []
                for spec in args.latency_variant:
                    name, _, pairs = spec.partition("=")
                    env = dict(p.split("=", 1) for p in pairs.split(",") if p)
                    variants.append((name, env))
                for name, env in variants:
                    results[f"latency_{name}"] = run_latency(
                        bench, max_rate, args.latency_s, extra=env, variant=name
                    )
            except BenchError as exc:
                log(f"latency failed: {exc}")
                results["latency"] = {"error": str(exc)}
                results["errors"].append(f"latency: {str(exc).splitlines()[0]}")
    except (BenchError, BenchTimeout) as exc:
        log(f"benchmark failed: {exc}")
        results["errors"].append(str(exc).splitlines()[0])
        code = 1
    except Exception as exc:
        log(f"benchmark failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        results["errors"].append(f"{type(exc).__name__}: {exc}")
        code = 1
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        results["errors"].append("interrupted")
        code = 130
    finally:
        signal.alarm(0)
        stop_children()
        if broker is not None:
            broker.stop()
    results["environment"]["loadavg_end"] = os.getloadavg()
    results["duration_s"] = time.monotonic() - started
    results.setdefault("record_bytes", {"value": 0, "headers": 0})
    if not results["summary"]:
        results["summary"] = {key: summarise_runs(r) for key, r in runs.items()}
    summarise(results)
    json_path, md_path = write_results(results, args.out)
    print(markdown(results))
    log(f"wrote {json_path} and {md_path} in {results['duration_s']:.0f}s")
    if results["errors"] and code == 0:
        code = 1
    if code == 0 and not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        log(f"worker and path logs kept in {workdir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
