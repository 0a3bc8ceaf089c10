"""Where a /metrics scrape of N live series spends its time, stage by stage.

    .venv/bin/python bench/profile_scrape.py [--series 10000] [--repeat 5] [--cprofile]

Loads kvmtrace's real BPF program in this process (kvmtrace.loader, as `serve`
does), has the series driver make N rejected KVM_CREATE_VM of distinct VM
types, then times each stage of a scrape separately, on the live map and after
the retirement pass has folded the exited driver into Python state:

  read_counts   Session.read_counts(): the BPF map into raw tuples
  decode        Decoder.count() on every raw tuple
  totals        Runtime.totals(): read + decode + Aggregator.totals
  exposition    prometheus_client.generate_latest(registry): the whole scrape body
  exposition_openmetrics   the same in OpenMetrics (what Prometheus asks for)
  exposition_proposed      bench/proposals.py fast_scrape(): memoized classify()
                           and fast_generate_latest (checked byte-identical)

Prints one JSON object; --cprofile adds the top functions of one exposition.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))


def timed(fn, repeat: int) -> dict:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median_ms": round(statistics.median(ts) * 1e3, 2),
            "min_ms": round(min(ts) * 1e3, 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cprofile", action="store_true")
    args = ap.parse_args()

    from kvmtrace import facts as factsmod
    from kvmtrace import kvmdev, loader
    from kvmtrace import plan as planmod
    from kvmtrace.collector import KvmtraceCollector
    from kvmtrace.decode import Decoder
    from kvmtrace.runtime import Runtime
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as om_latest

    import proposals

    facts = factsmod.gather()
    plan = planmod.make_plan(facts)
    session = loader.load(plan, loader.Options(self_tgid=os.getpid(), use_ringbuf=facts.ringbuf))
    tmp = Path(tempfile.mkdtemp(prefix="kvmtrace-prof-"))
    exe = tmp / "kb-series"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(BENCH / "drivers" / "series.c")],
                   check=True)
    try:
        decoder = Decoder(plan, facts.arch)
        runtime = Runtime(session, decoder)
        registry = CollectorRegistry()
        registry.register(KvmtraceCollector(runtime, session.attachments, kvmdev.query,
                                            facts.arch, {"version": "bench"}))
        drv = subprocess.Popen([str(exe), "kbprof", str(args.series), "1000"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        drv.stdout.readline()
        raws = session.read_counts()
        out = {"entries": len(raws), "live": {}, "folded": {}}
        out["live"]["read_counts"] = timed(session.read_counts, args.repeat)
        out["live"]["decode"] = timed(lambda: [decoder.count(r) for r in raws], args.repeat)
        out["live"]["totals"] = timed(runtime.totals, args.repeat)
        out["live"]["exposition"] = timed(lambda: generate_latest(registry), args.repeat)
        out["live"]["exposition_openmetrics"] = timed(lambda: om_latest(registry), args.repeat)
        stock = generate_latest(registry)
        proposals.fast_scrape()
        out["live"]["exposition_proposed"] = timed(
            lambda: proposals.fast_generate_latest(registry), args.repeat)
        fast = proposals.fast_generate_latest(registry)
        # The kvm query mask and health can differ between two scrapes: compare
        # the per-series families only.
        mask = kvmdev.query().vm_types_mask
        proposals.render_create_families(runtime.totals(), mask)  # fill the cache
        out["live"]["cached_render_create_families"] = timed(
            lambda: proposals.render_create_families(runtime.totals(), mask), args.repeat)
        cached = proposals.render_create_families(runtime.totals(), mask)
        out["cached_render_identical"] = sorted(cached) == sorted(
            ln.decode() + "\n" for ln in stock.splitlines()
            if ln.startswith(b"kvmtrace_vm_create_attempts_total{")
            or ln.startswith(b"kvmtrace_vm_create_rejected_total{"))
        out["proposed_identical"] = ([ln for ln in stock.splitlines() if b"vm_create" in ln]
                                     == [ln for ln in fast.splitlines() if b"vm_create" in ln])
        if args.cprofile:
            prof = cProfile.Profile()
            prof.enable()
            generate_latest(registry)
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
            out["live"]["cprofile"] = s.getvalue()
        drv.stdin.close()
        drv.wait()
        t0 = time.perf_counter()
        out["retire_entries"] = runtime.retire_exited()
        out["retire_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        out["folded"]["totals"] = timed(runtime.totals, args.repeat)
        out["folded"]["exposition"] = timed(lambda: generate_latest(registry), args.repeat)
        out["folded"]["cached_render_create_families"] = timed(
            lambda: proposals.render_create_families(runtime.totals(), mask), args.repeat)
        out["folded"]["exposition_proposed"] = timed(
            lambda: proposals.fast_generate_latest(registry), args.repeat)
        if args.cprofile:
            prof = cProfile.Profile()
            prof.enable()
            generate_latest(registry)
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(20)
            out["folded"]["cprofile"] = s.getvalue()
    finally:
        session.close()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    cp = {k: out[k].pop("cprofile", None) for k in ("live", "folded")}
    print(json.dumps(out, indent=1))
    for k, v in cp.items():
        if v:
            print(f"\n---- cProfile, {k} ----\n{v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
