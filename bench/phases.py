"""The benchmark phases: the overhead matrix, the storm, the 10,000-series scale run,
concurrent scrapes, hostile names."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from common import (
    CHILDREN,
    CODES,
    PROMETHEUS_ACCEPT,
    BenchError,
    TracerHung,
    end,
    foreign_tracing_progs_settled,
    log,
    metric_sum,
    qemu_processes,
    rss_breakdown,
    rss_kib,
    samples,
    scrape,
    spawn,
)
from configs import Bpftrace, Config, Serve

# ---- phase: overhead matrix ---------------------------------------------------

PIN: list[str] = []  # --pin-driver: ["taskset", "-c", CPU]


def run_driver(bins: dict, wrap: list[str], workload: str, seconds: float, comm: str) -> dict:
    cmd = [*PIN, *wrap, bins["workload"], workload, str(seconds), comm]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 40 + 60,
                         check=False)
    if out.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def overhead(bins: dict, configs: list[Callable[[], Config]], workloads: list[str],
             rounds: int, seconds: float, comm_prefix: str = "kb") -> dict:
    runs, tracer_health = [], []
    cold: list[float] = []
    retried = []

    def one_config(r: int, make: Callable[[], Config]) -> tuple[Config, list[dict], dict,
                                                                 dict]:
        cfg = make()
        foreign = foreign_tracing_progs_settled()
        cfg.start()
        comms, mine = {}, []
        try:
            for wl in workloads:
                comm = f"{comm_prefix}{r}{CODES[wl]}"
                comms[wl] = comm
                qemu = qemu_processes()
                res = run_driver(bins, cfg.wrap, wl, seconds, comm)
                counted = cfg.counted(comm, wl)
                mine.append({"round": r, "config": cfg.name, "workload": wl,
                             "ns_per_op": res["ns_per_op"], "ops": res["ops"],
                             "calls": res["calls"], "traced": counted,
                             "foreign_tracing_progs": foreign,
                             "qemu_running": max(qemu, qemu_processes())})
                log(f"round {r}/{rounds} {cfg.name:<10} {wl:<16} "
                    f"{res['ns_per_op']:>12,.1f} ns/op")
        finally:
            health = cfg.stop()
        return cfg, mine, health, comms

    for r in range(1, rounds + 1):
        for make in configs:
            for attempt in range(3):
                try:
                    cfg, mine, health, comms = one_config(r, make)
                    break
                except TracerHung as exc:  # its round is measured again, from the start
                    retried.append({"round": r, "attempt": attempt + 1, "why": str(exc)[:200]})
                    log(f"round {r}: {exc.args[0].splitlines()[0]}; running it again")
            else:
                raise BenchError(f"round {r}: the tracer hung on exit three times")
            runs.extend(mine)
            if health:
                tracer_health.append({"round": r, "config": cfg.name, **health})
            if isinstance(cfg, Serve):
                cold.extend(cfg.cold_starts)
            if isinstance(cfg, Bpftrace):
                for run in runs:
                    if run["round"] == r and run["config"] == "bpftrace" \
                            and run["workload"].startswith("create"):
                        run["traced"] = cfg.counts.get(comms[run["workload"]], 0)
    for run in runs:
        run["verified"] = None if run["traced"] is None else run["traced"] == run["calls"]
    return {"runs": runs, "tracer_health": tracer_health, "cold_starts_s": cold,
            "rounds_rerun": retried,
            "summary": summarize(runs, [c().name for c in configs], workloads)}


def summarize(runs: list[dict], configs: list[str], workloads: list[str]) -> dict:
    """Per workload and config: median, min, max of ns/op; added = median over rounds
    of (config - none) in the same round (interleaving makes the pairs comparable);
    ratio_kvmtrace_to_none = median over rounds of kvmtrace / none in the same round."""
    out: dict = {}
    for wl in workloads:
        row: dict = {}
        base = {r["round"]: r["ns_per_op"] for r in runs
                if r["workload"] == wl and r["config"] == "none"}
        for c in configs:
            vals = {r["round"]: r["ns_per_op"] for r in runs
                    if r["workload"] == wl and r["config"] == c}
            if not vals:
                continue
            v = list(vals.values())
            cell = {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
            diffs = [vals[k] - base[k] for k in vals if k in base]
            if c != "none" and diffs:
                cell["added_ns"] = statistics.median(diffs)
                cell["added_min"], cell["added_max"] = min(diffs), max(diffs)
            row[c] = cell
        k = row.get("kvmtrace", {}).get("added_ns")
        for other in ("floor", "bpftrace"):
            o = row.get(other, {}).get("added_ns")
            if k is not None and o:
                row[f"ratio_kvmtrace_to_{other}"] = k / o
        kv = {r["round"]: r["ns_per_op"] for r in runs
              if r["workload"] == wl and r["config"] == "kvmtrace"}
        ratios = [kv[rd] / base[rd] for rd in kv if base.get(rd)]
        if ratios:
            row["ratio_kvmtrace_to_none"] = statistics.median(ratios)
        out[wl] = row
    return out


# ---- phase: storm -------------------------------------------------------------

def storm(bins: dict, per_process: int, scrape_every: float) -> dict:
    serve = Serve()
    serve.start()
    tag = f"{os.getpid() % 10000}"
    comms = [f"kbstorm{tag}a", f"kbstorm{tag}b"]
    procs = [spawn([bins["storm"], c, str(per_process)], stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in comms]
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise BenchError(f"storm driver did not start: {p.stderr.read()}")
        lat: list[float] = []
        errors: list[str] = []
        done = threading.Event()

        def scraper() -> None:
            deadline = time.monotonic() + 600
            while not done.is_set() and time.monotonic() < deadline:
                try:
                    lat.append(scrape(serve.url, timeout=30)[0])
                except (OSError, urllib.error.URLError) as exc:
                    errors.append(str(exc))
                done.wait(scrape_every)

        th = threading.Thread(target=scraper, daemon=True)
        th.start()
        t0 = time.perf_counter()
        for p in procs:  # go: one byte each, as close together as we can
            assert p.stdin is not None
            p.stdin.write("g")
            p.stdin.flush()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=600)
            CHILDREN.remove(p)
            if p.returncode != 0:
                raise BenchError(f"storm driver exited {p.returncode}: {err}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        wall = time.perf_counter() - t0
        done.set()
        th.join(60)
        text = serve.metrics()
        exported = {c: int(metric_sum(text, "kvmtrace_vm_create_attempts_total", comm=c))
                    for c in comms}
        rejected = {c: int(metric_sum(text, "kvmtrace_vm_create_rejected_total", comm=c,
                                      errno="EINVAL")) for c in comms}
        health = {k: int(metric_sum(text, f"kvmtrace_{k}_total"))
                  for k in ("events_lost", "counts_dropped", "calls_dropped")}
        issued = sum(r["calls"] for r in results)
    finally:
        for p in procs:
            if p.poll() is None:
                end(p, signal.SIGKILL)
        serve.stop()
    total = sum(exported.values())
    return {
        "per_process": per_process, "comms": comms, "drivers": results,
        "issued_total": issued, "exported": exported, "exported_total": total,
        "exported_rejected_einval": rejected, "exact": total == issued == 2 * per_process
        and all(exported[c] == per_process == rejected[c] for c in comms),
        "events_lost_total": health["events_lost"], "counts_dropped_total":
        health["counts_dropped"], "calls_dropped_total": health["calls_dropped"],
        "storm_wall_s": wall,
        "ns_per_call": [r["ns"] / r["calls"] for r in results],
        "scrapes_during_storm": len(lat), "scrape_errors": len(errors),
        "scrape_error_examples": errors[:3], "scrape_every_s": scrape_every,
        "scrape_latency_max_ms": max(lat) * 1e3 if lat else None,
        "scrape_latency_median_ms": statistics.median(lat) * 1e3 if lat else None,
        "cold_starts_s": serve.cold_starts,
    }


# ---- phase: scale (10,000 series) ---------------------------------------------

OWNER_LABELS = ("--metrics.labels", "vm,unit,pod,namespace")


def scale(bins: dict, n_types: int, scrapes: int, retire_interval: float | None) -> dict:
    """One process with ``n_types`` rejected creates (a series each) under two exporters
    attached at once, measured in turns: the defaults, and with every owner label
    (--metrics.labels: each series also by the process's VM, unit, pod and namespace;
    the result's "owner_labels" part, side by side with the default's)."""
    extra = ("--retire-interval", str(retire_interval)) if retire_interval else ()
    serve, labelled = Serve(extra), Serve((*extra, *OWNER_LABELS))
    serve.start()
    labelled.start()
    comm = f"kbseries{os.getpid() % 10000}"
    out: dict = {"vm_types": n_types, "comm": comm, "retire_interval_s": retire_interval or 10.0,
                 "cold_starts_s": serve.cold_starts + labelled.cold_starts,
                 "owner_labels": {"flags": " ".join(OWNER_LABELS)}}
    driver = None
    try:
        def measure(label: str) -> None:
            out[label] = _scale_point(serve, scrapes, comm)
            out["owner_labels"][label] = _scale_point(labelled, scrapes, comm)
            for name, p in (("", out[label]), (" (owner labels)", out["owner_labels"][label])):
                log(f"scale {label}{name}: median {p['median_ms']:.1f} ms, max "
                    f"{p['max_ms']:.1f} ms, RSS {p['rss_kib']['VmRSS']} KiB")

        measure("empty")
        driver = spawn([bins["series"], comm, str(n_types), "1000"], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert driver.stdout is not None
        line = driver.stdout.readline()
        if not line:
            raise BenchError(f"series driver failed: {driver.stderr.read()}")
        out["driver"] = json.loads(line)
        measure("live")  # 10,000 entries in the kernel map, read at every scrape
        assert driver.stdin is not None
        driver.stdin.close()
        driver.wait(30)
        CHILDREN.remove(driver)
        # Wait for both exporters' retirement passes to fold the exited process out.
        deadline = time.monotonic() + (retire_interval or 10.0) * 3 + 30
        waiting = [serve, labelled]
        while waiting and time.monotonic() < deadline:
            waiting = [s for s in waiting if [p for p in json.loads(scrape(
                s.url.replace("/metrics", "/api/processes"))[1]) if p["comm"] == comm]]
            time.sleep(0.5)
        if waiting:
            raise BenchError("the series driver's counts were never folded")
        measure("folded")  # the same series, now held by the exporter in Python
    finally:
        if driver is not None and driver.poll() is None:
            end(driver, signal.SIGKILL)
        serve.stop()
        labelled.stop()
    return out


def _scale_point(serve: Serve, scrapes: int, comm: str) -> dict:
    """``scrapes`` scrapes of ``serve`` (and a third as many in OpenMetrics): latency,
    body, samples, ``comm``'s series, and the exporter's memory after them."""
    assert serve.proc is not None
    lat, text = [], ""
    for _ in range(scrapes):
        t, text = scrape(serve.url, timeout=120)
        lat.append(t)
    om = [scrape(serve.url, timeout=120, accept=PROMETHEUS_ACCEPT)[0]
          for _ in range(max(1, scrapes // 3))]
    return {
        "scrapes": len(lat), "latency_ms": [round(x * 1e3, 2) for x in lat],
        "median_ms": statistics.median(lat) * 1e3, "max_ms": max(lat) * 1e3,
        "body_bytes": len(text),
        "exported_samples": sum(1 for ln in text.splitlines() if ln and not ln.startswith("#")),
        "openmetrics_median_ms": statistics.median(om) * 1e3,
        "series": {"attempts": len([1 for lb, _ in samples(text,
                   "kvmtrace_vm_create_attempts_total") if lb.get("comm") == comm]),
                   "rejected": len([1 for lb, _ in samples(text,
                   "kvmtrace_vm_create_rejected_total") if lb.get("comm") == comm])},
        "rss_kib": rss_kib(serve.proc.pid), "rss_top_mappings": rss_breakdown(serve.proc.pid),
    }


# ---- phase: concurrent scrapes, idle and during a storm -----------------------

def concurrent_scrapes(url: str, n: int, timeout: float = 30) -> list[dict]:
    """N scrapes of URL at once (curl --parallel-immediate: every connection opened
    together, a C client, so the client adds no GIL queue of its own): per request its
    HTTP status, seconds from its start to its last byte, body size and curl's exit code
    (0, or 28 for a timeout, 7 for a refused connection ...)."""
    args: list[str] = []
    for _ in range(n):
        args += ["-o", "/dev/null", url]
    out = subprocess.run(
        ["curl", "-s", "-Z", "--parallel-immediate", "--parallel-max", str(n), "--max-time",
         str(timeout), "-w", "%{http_code} %{time_total} %{size_download} %{exitcode}\\n",
         *args], capture_output=True, text=True, timeout=timeout * 3 + 30, check=False)
    rows = []
    for line in out.stdout.splitlines():
        code, t, size, rc = line.split()
        rows.append({"status": int(code), "s": float(t), "bytes": int(size), "curl": int(rc)})
    if len(rows) != n:
        raise BenchError(f"curl reported {len(rows)} of {n} transfers: {out.stderr[-500:]}")
    return rows


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of xs."""
    s = sorted(xs)
    return s[min(len(s), max(1, math.ceil(q / 100 * len(s)))) - 1]


def wave_summary(rows: list[dict]) -> dict:
    ok = [r["s"] for r in rows if r["status"] == 200]
    every = [r["s"] for r in rows]
    statuses: dict[str, int] = {}
    for r in rows:
        key = str(r["status"]) if r["curl"] == 0 else f"curl:{r['curl']}"
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "requests": len(rows), "statuses": statuses,
        "answered": sum(1 for r in rows if r["curl"] == 0 and r["status"] in (200, 503)),
        "complete_bodies": sum(1 for r in rows if r["status"] == 200 and r["bytes"] > 0),
        "p50_ms": percentile(every, 50) * 1e3, "p99_ms": percentile(every, 99) * 1e3,
        "max_ms": max(every) * 1e3,
        "ok_p99_ms": percentile(ok, 99) * 1e3 if ok else None,
    }


def scrapes(bins: dict, clients: int, waves: int, storm_calls: int) -> dict:
    """`clients` scrapes at once, `waves` times, against one exporter: idle, then while
    two storm drivers issue rejected creates as fast as they can. Twice: with the
    default --web.max-requests (40: the excess gets a quick 503, as node_exporter) and
    with no cap (every request collected; concurrent ones share one collection)."""
    out: dict = {"clients": clients, "waves": waves, "runs": {}}
    for label, extra in (("default_cap", ()), ("no_cap", ("--web.max-requests", "0"))):
        serve = Serve(extra)
        serve.start()
        run: dict = {"flags": " ".join(extra) or "(defaults)", "cold_starts_s": serve.cold_starts}
        procs: list[subprocess.Popen] = []
        try:
            for cond in ("idle", "storm"):
                if cond == "storm":
                    tag = f"{os.getpid() % 10000}"
                    procs = [spawn([bins["storm"], f"kbsc{tag}{c}", str(storm_calls)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for c in "ab"]
                    for p in procs:
                        assert p.stdout is not None and p.stdin is not None
                        if p.stdout.readline().strip() != "ready":
                            raise BenchError(f"storm driver did not start: {p.stderr.read()}")
                    for p in procs:
                        assert p.stdin is not None
                        p.stdin.write("g")
                        p.stdin.flush()
                    time.sleep(0.5)  # the storm is under way
                rows: list[dict] = []
                during = True
                for _ in range(waves):
                    rows += concurrent_scrapes(serve.url, clients)
                    during = during and all(p.poll() is None for p in procs)
                run[cond] = {**wave_summary(rows), "storm_ran_throughout": during
                             if cond == "storm" else None}
                log(f"scrapes {label} {cond}: {run[cond]['statuses']}, p50 "
                    f"{run[cond]['p50_ms']:.0f} ms, p99 {run[cond]['p99_ms']:.0f} ms")
            if run["idle"]["p99_ms"]:
                run["storm_to_idle_p99"] = run["storm"]["p99_ms"] / run["idle"]["p99_ms"]
        finally:
            for p in procs:
                end(p, signal.SIGKILL)
            serve.stop()
        out["runs"][label] = run
    return out


# ---- phase: names (hostile renames, short-lived names) -----------------------

def names(bins: dict, rename_counts: list[int], fork_burst: int, fork_rounds: list[int],
          retire_interval: float | None) -> dict:
    """One exporter with its defaults (--max-series 10,000) against a hostile user:
    processes renaming themselves through many names (one rejected create under each)
    while another process makes 300 creates, then bursts of short-lived children each
    under a name of its own. After every step: VmRSS/VmHWM, series, body size, the
    exact host-wide totals against what the drivers issued, the 300 creates exported,
    names folded, counts dropped."""
    extra = ("--retire-interval", str(retire_interval)) if retire_interval else ()
    settle = (retire_interval or 10.0) * 1.2 + 0.5  # one retirement pass after each step
    serve = Serve(extra)
    serve.start()
    assert serve.proc is not None
    pid = serve.proc.pid
    tag = f"{os.getpid() % 1000:03d}"
    # One VM type per run, at most 255 (above that the host totals have one "other"
    # bucket); others on the host rarely use it.
    vm_type = 100 + 2 * (os.getpid() % 70)
    issued = other_issued = 0
    steps: list[dict] = []
    out: dict = {"vm_type": vm_type, "other_vm_type": vm_type + 1, "steps": steps,
                 "retire_interval_s": retire_interval or 10.0, "cold_starts_s": serve.cold_starts}
    alive: list[subprocess.Popen] = []

    def measure(label: str, other_comm: str | None = None) -> None:
        t, text = scrape(serve.url, timeout=120)
        fam = ("kvmtrace_vm_create_attempts_total", "kvmtrace_vm_create_rejected_total")
        series = sum(1 for ln in text.splitlines() if ln.startswith(fam))
        totals = metric_sum(text, "kvmtrace_probe_calls_total", probe="KVM_CREATE_VM",
                            vm_type=str(vm_type))
        step = {"step": label, "issued_total": issued, "host_total": int(totals),
                "totals_exact": int(totals) == issued, "series": series,
                "body_bytes": len(text), "scrape_ms": t * 1e3,
                "names_folded": int(metric_sum(text, "kvmtrace_names_folded_total")),
                "counts_dropped": int(metric_sum(text, "kvmtrace_counts_dropped_total")),
                "live_entries_folded": int(metric_sum(text,
                                                      "kvmtrace_live_entries_folded_total")),
                "rss_kib": rss_kib(pid)}
        if other_comm:  # 300 creates of the next VM type under one name of its own
            got = int(metric_sum(text, "kvmtrace_vm_create_attempts_total", comm=other_comm))
            host = int(metric_sum(text, "kvmtrace_probe_calls_total", probe="KVM_CREATE_VM",
                                  vm_type=str(vm_type + 1)))
            step["other_process"] = {"comm": other_comm, "issued": 300, "exported": got,
                                     "host_total": host, "host_issued": other_issued,
                                     "exact": got == 300 and host == other_issued}
        steps.append(step)
        log(f"names {label}: series {series:,}, RSS {step['rss_kib']['VmRSS']:,} KiB, host "
            f"total {int(totals):,} of {issued:,}")

    try:
        measure("empty")
        for i, n in enumerate(rename_counts):
            d = spawn([bins["names"], f"kbr{tag}{i}", str(n), str(vm_type), "rename"],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True)
            alive.append(d)
            assert d.stdout is not None
            line = d.stdout.readline()
            if not line:
                raise BenchError(f"names driver failed: {d.stderr.read()}")
            issued += json.loads(line)["rejected"]
            # While it lives (its entries in the map), another process makes 300 creates.
            other = f"kbo{tag}{i}"
            r = subprocess.run([bins["names"], other, "300", str(vm_type + 1), "repeat"],
                               capture_output=True, text=True, timeout=120, check=False)
            if r.returncode != 0:
                raise BenchError(f"names driver exited {r.returncode}: {r.stderr}")
            other_issued += 300
            time.sleep(settle)
            measure(f"{n:,} names, one live process", other)
        for d in alive:
            assert d.stdin is not None
            d.stdin.close()
            end(d)
        alive.clear()
        for n in [fork_burst, *fork_rounds]:
            r = subprocess.run([bins["names"], f"kbf{tag}{len(steps)}", str(n), str(vm_type),
                                "fork"], capture_output=True, text=True, timeout=600,
                               check=False)
            if r.returncode != 0:
                raise BenchError(f"names driver exited {r.returncode}: {r.stderr}")
            issued += json.loads(r.stdout)["rejected"]
            time.sleep(settle)
            measure(f"{n:,} short-lived children")
    finally:
        for d in alive:
            end(d, signal.SIGKILL)
        serve.stop()
    base = steps[0]["rss_kib"]["VmRSS"]
    out["rss_max_kib"] = max(s["rss_kib"]["VmRSS"] for s in steps)
    out["rss_max_to_empty"] = out["rss_max_kib"] / base if base else None
    out["series_max"] = max(s["series"] for s in steps)
    out["totals_exact"] = all(s["totals_exact"] for s in steps)
    out["other_process_exact"] = all(s["other_process"]["exact"] for s in steps
                                     if "other_process" in s)
    return out
