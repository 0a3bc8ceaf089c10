"""kvmtrace benchmarks: overhead side by side, storm exactness, cold start, scale.

    make bench          full run (several minutes): bench/results/latest.{json,md}
    make bench-quick    the same phases, shortened (well under a minute):
                        bench/results/quick.{json,md}

or directly, as root, with the project's venv (it has bcc and prometheus_client):

    .venv/bin/python bench/run.py [--quick] [--rounds N] [--seconds S]
                                  [--out DIR] [--name NAME] [--phases LIST]
                                  [--variants NAME,NAME]

Phases (all by default):
  overhead  seven C workloads (five syscalls, fork+exit, fork+exec+exit) x five
            configurations, interleaved round by round (none, floor, kvmtrace,
            bpftrace, strace); medians and min-max
  storm     two processes issue 1,000,000 rejected KVM_CREATE_VM each while
            `kvmtrace serve` runs and is scraped in a loop; counts must be exact
  scale     10,000 live series: scrape latency and exporter RSS
  cold      (from every `kvmtrace serve` start above) Popen -> first /metrics
  variants  only with --variants NAME,...: none, floor, kvmtrace serve and
            bpftrace, then kvmtrace's BPF text with each named variant's knobs from
            bench/variants.py (NAME/nopoll: ring buffer never drained), loaded
            alone by bench/bpfload.py; interleaved like overhead

Benchmarks are not tests: targets are reported as met / not met, never
asserted. The JSON has every raw sample; the Markdown is derived from it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    BENCH,
    QUICK_WORKLOADS,
    WORKLOADS,
    BenchError,
    build_drivers,
    cpu_times,
    end_all,
    foreign_tracing_progs,
    log,
    machine,
    qemu_processes,
    steal_pct,
)
from configs import (
    BPFTRACE_PROG,
    Bpftrace,
    Config,
    Floor,
    Serve,
    make_variant,
    none_config,
    strace_config,
    variant_names,
)
from phases import PIN, names, overhead, scale, scrapes, storm
from report import markdown, targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds, not minutes (CI)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 7; quick 1)")
    ap.add_argument("--seconds", type=float, help="seconds per driver run (0.5; quick 0.05)")
    ap.add_argument("--storm-calls", type=int,
                    help="rejected creates per storm process (1,000,000; quick 100,000)")
    ap.add_argument("--series", type=int, default=10000, help="distinct VM types (10,000)")
    ap.add_argument("--phases", default="overhead,storm,scale,scrapes,names",
                    help="comma-separated: overhead, storm, scale, scrapes, names")
    ap.add_argument("--variants", default="",
                    help="comma-separated bench/variants.py names (NAME or NAME/nopoll) to "
                         "measure after none, floor, kvmtrace, bpftrace (extra phase)")
    ap.add_argument("--workloads",
                    help="comma-separated subset of the workloads (overhead, variants; "
                         "default all; quick: all but fork_exit, fork_exec_exit)")
    ap.add_argument("--pin-driver", metavar="CPU", default="last",
                    help="run the overhead drivers on this CPU only (taskset), in every "
                         "config: 'last' (default: the highest-numbered CPU) or 'none'")
    ap.add_argument("--render", metavar="JSON",
                    help="only re-render the Markdown of an earlier run's JSON (to stdout)")
    ap.add_argument("--out", default=str(BENCH / "results"), help="output directory")
    ap.add_argument("--name", help="output file stem (default latest; quick: quick)")
    args = ap.parse_args(argv)
    pin = str(os.cpu_count() - 1) if args.pin_driver == "last" else args.pin_driver
    if pin != "none":
        PIN[:] = ["taskset", "-c", pin]
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())), end="")
        return 0
    if os.geteuid() != 0:
        print("bench: must run as root (BPF, /dev/kvm)", file=sys.stderr)
        return 1
    q = args.quick
    rounds = args.rounds or (1 if q else 7)
    seconds = args.seconds or (0.05 if q else 0.5)
    storm_calls = args.storm_calls or (100_000 if q else 1_000_000)
    phases = [p for p in args.phases.split(",") if p]
    workloads = ([w for w in args.workloads.split(",") if w] if args.workloads
                 else list(QUICK_WORKLOADS if q else WORKLOADS))
    if set(workloads) - set(WORKLOADS):
        print(f"bench: unknown workloads {set(workloads) - set(WORKLOADS)}", file=sys.stderr)
        return 1
    variant_list = [v for v in args.variants.split(",") if v]
    known = variant_names() if variant_list else set()
    unknown = {v for v in variant_list
               if v.partition("/")[0] not in known or v.partition("/")[2] not in ("", "nopoll")}
    if unknown:
        print(f"bench: unknown variants {unknown} (see bench/variants.py)", file=sys.stderr)
        return 1
    name = args.name or ("quick" if q else "latest")
    for tool in ("gcc", "bpftrace", "strace", "curl"):
        if not shutil.which(tool):
            print(f"bench: {tool} missing: run bench/setup.sh (make bench does)", file=sys.stderr)
            return 1

    started = dt.datetime.now(dt.UTC)
    t_start = time.perf_counter()
    cpu0 = cpu_times()
    res: dict = {"schema": 1, "mode": "quick" if q else "full",
                 "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine()}
    noise = {"loadavg_start": open("/proc/loadavg").read().split()[:3],
             "qemu_processes_max": qemu_processes(),
             "foreign_tracing_progs_max": foreign_tracing_progs()}
    configs = [none_config, Floor, Serve, Bpftrace, strace_config]
    res["settings"] = {"rounds": rounds, "seconds": seconds, "storm_calls": storm_calls,
                       "series": args.series, "phases": phases,
                       "configs": [c().name for c in configs], "workloads": workloads,
                       "order": "per round: configs in this order, each running every "
                                "workload in order",
                       "driver_cpu": PIN[-1] if PIN else None}
    res["workloads"] = WORKLOADS
    res["configs"] = {c().name: {"desc": c().desc, "command": c().command} for c in configs}
    res["configs"]["bpftrace"]["program"] = BPFTRACE_PROG
    tmp = Path(tempfile.mkdtemp(prefix="kvmtrace-bench-"))
    cold: list[float] = []
    try:
        bins = build_drivers(tmp)
        if "overhead" in phases:
            log(f"overhead: {rounds} rounds x {len(configs)} configs x {len(workloads)} "
                f"workloads, {seconds} s each")
            res["overhead"] = overhead(bins, configs, workloads, rounds, seconds)
            cold += res["overhead"]["cold_starts_s"]
            noise["qemu_processes_max"] = max(noise["qemu_processes_max"], qemu_processes())
        if "storm" in phases:
            log(f"storm: 2 x {storm_calls:,} rejected creates")
            res["storm"] = storm(bins, storm_calls, scrape_every=0.1)
            cold += res["storm"]["cold_starts_s"]
            log(f"storm: exported {res['storm']['exported_total']:,} of "
                f"{res['storm']['issued_total']:,}, events lost "
                f"{res['storm']['events_lost_total']:,}")
        if "scale" in phases:
            log(f"scale: {args.series:,} series")
            res["scale"] = scale(bins, args.series, 3 if q else 15, 1.0 if q else None)
            cold += res["scale"]["cold_starts_s"]
        if "scrapes" in phases:
            log("scrapes: 200 at once, idle and during a storm")
            res["scrapes"] = scrapes(bins, 200, 1 if q else 5, storm_calls * 50)
            cold += [c for r in res["scrapes"]["runs"].values() for c in r["cold_starts_s"]]
        if "names" in phases:
            counts = [2_000, 10_000] if q else [20_000, 100_000]
            forks = (3_000, [1_000] * 3) if q else (12_000, [5_000] * 3)
            log(f"names: renames through {counts}, short-lived children {forks}")
            res["names"] = names(bins, counts, forks[0], forks[1], 1.0 if q else None)
            cold += res["names"]["cold_starts_s"]
        if variant_list:
            vcfgs: list[Callable[[], Config]] = [none_config, Floor, Serve, Bpftrace]
            vcfgs += [make_variant(n) for n in variant_list]
            log(f"variants: {variant_list}")
            v = overhead(bins, vcfgs, workloads, rounds, seconds, comm_prefix="kv")
            res["variants"] = {"names": variant_list, "rounds": rounds, **v}
    finally:
        end_all()
        shutil.rmtree(tmp, ignore_errors=True)
    if cold:
        res["cold_start"] = {"samples_s": cold, "median_s": statistics.median(cold),
                             "min_s": min(cold), "max_s": max(cold)}
    noise["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    noise["steal_pct"] = steal_pct(cpu0, cpu_times())
    noise["qemu_processes_max"] = max(noise["qemu_processes_max"], qemu_processes())
    runs = res.get("overhead", {}).get("runs", [])
    seen = [r["foreign_tracing_progs"] for r in runs if r["foreign_tracing_progs"] is not None]
    if seen or noise["foreign_tracing_progs_max"] is not None:
        noise["foreign_tracing_progs_max"] = max([*seen, noise["foreign_tracing_progs_max"] or 0])
    all_runs = runs + res.get("variants", {}).get("runs", [])
    noise["runs_with_qemu"] = sum(1 for r in all_runs if r.get("qemu_running"))
    noise["runs"] = len(all_runs)
    res["noise"] = noise
    res["targets"] = targets(res)
    res["duration_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(res)
    tmp_json = out / f"{name}.json.tmp"
    tmp_json.write_text(json.dumps(res, indent=1) + "\n")
    tmp_json.replace(out / f"{name}.json")
    (out / f"{name}.md").write_text(md)
    print(md)
    log(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        end_all()
        print(f"bench: ERROR: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        end_all()
        sys.exit(130)
