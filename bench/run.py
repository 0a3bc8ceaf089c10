"""kvmtrace benchmarks: overhead side by side, storm exactness, cold start, scale.

    make bench          full run (several minutes): bench/results/latest.{json,md}
    make bench-quick    the same phases, shortened (well under a minute):
                        bench/results/quick.{json,md}

or directly, as root, with the project's venv (it has bcc and prometheus_client):

    .venv/bin/python bench/run.py [--quick] [--rounds N] [--seconds S]
                                  [--out DIR] [--name NAME] [--phases LIST]
                                  [--variants NAME,NAME]

Phases (all by default):
  overhead  five C workloads x five configurations, interleaved round by round
            (none, floor, kvmtrace, bpftrace, strace); medians and min-max
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
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
KVMTRACE = [str(ROOT / ".venv" / "bin" / "kvmtrace")]
PY = str(VENV_PY) if VENV_PY.exists() else sys.executable

WORKLOADS = {
    "fionread": "ioctl(FIONREAD) on a pipe (an unrelated ioctl)",
    "getppid": "getppid() (not an ioctl)",
    "create_rejected": "KVM_CREATE_VM type 1, rejected with EINVAL",
    "create_accepted": "KVM_CREATE_VM type 0 + close(vm fd)",
    "check_ext": "KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES=235) on /dev/kvm",
}
# Short codes for per-run comms ("kb<round><code>", at most 15 bytes).
CODES = {"fionread": "fio", "getppid": "ppid", "create_rejected": "rej",
         "create_accepted": "acc", "check_ext": "cap"}

# bpftrace 0.17: count KVM_CREATE_VM (0xae01) by comm, VM type and result, on the
# same two tracepoints kvmtrace uses here. Type is stored +1 so type 0 is not
# mistaken for "no entry"; a VM fd is counted as 0 like kvmtrace does.
BPFTRACE_PROG = (
    'BEGIN { printf("READY\\n"); } '
    "tracepoint:syscalls:sys_enter_ioctl /args->cmd == 0xae01/ "
    "{ @vmtype[tid] = args->arg + 1; } "
    "tracepoint:syscalls:sys_exit_ioctl /@vmtype[tid]/ "
    "{ @creates[comm, @vmtype[tid] - 1, args->ret < 0 ? args->ret : 0] = count(); "
    "delete(@vmtype[tid]); }"
)
STRACE = ["strace", "-f", "-qq", "-e", "trace=ioctl", "-o", "/dev/null"]

TRACING_PROG_TYPES = {"tracepoint", "raw_tracepoint", "raw_tracepoint_writable", "kprobe",
                      "tracing", "perf_event"}


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---- children: every process we start is tracked and ended on the way out ----

_CHILDREN: list[subprocess.Popen] = []


def spawn(cmd: list[str], **kw) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, **kw)
    _CHILDREN.append(proc)
    return proc


def end(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc in _CHILDREN:
        _CHILDREN.remove(proc)
    return proc.returncode


def end_all() -> None:
    for proc in list(_CHILDREN):
        end(proc, signal.SIGKILL, 10)


# ---- small helpers ----------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What Prometheus 2.x sends: prometheus_client then answers in OpenMetrics.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def scrape(url: str, timeout: float = 30, accept: str | None = None) -> tuple[float, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read().decode()
    return time.perf_counter() - t0, body


def samples(text: str, name: str) -> list[tuple[dict, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out.append((s.labels, s.value))
    return out


def metric_sum(text: str, name: str, **match) -> float:
    return sum(v for labels, v in samples(text, name)
               if all(labels.get(k) == want for k, want in match.items()))


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0])
    return out


def rss_breakdown(pid: int, top: int = 6) -> list[dict]:
    """The mappings holding most of the resident set (from /proc/PID/smaps)."""
    per: dict[str, int] = {}
    name = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+$", parts[0]):
                name = parts[5] if len(parts) > 5 else "[anon]"
            elif parts[0] == "Rss:":
                per[name] = per.get(name, 0) + int(parts[1])
    return [{"mapping": k, "rss_kib": v}
            for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:top]]


def foreign_tracing_progs() -> int | None:
    """Tracing BPF programs loaded right now (taken while none of ours is loaded)."""
    if not shutil.which("bpftool"):
        return None
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=False, timeout=30)
    if out.returncode != 0:
        return None
    try:
        return sum(1 for p in json.loads(out.stdout or "[]") if p.get("type") in TRACING_PROG_TYPES)
    except ValueError:
        return None


def foreign_tracing_progs_settled() -> int | None:
    """As above, retried a little: programs of a tracer we just stopped are freed lazily."""
    n = foreign_tracing_progs()
    for _ in range(10):
        if not n:
            break
        time.sleep(0.1)
        n = min(n, foreign_tracing_progs() or 0)
    return n


def qemu_processes() -> int:
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{d}/comm") as f:
                if f.read().startswith("qemu"):
                    n += 1
    return n


def cpu_times() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def steal_pct(before: list[int], after: list[int]) -> float | None:
    d = [a - b for a, b in zip(after, before, strict=False)]
    total = sum(d[:8])
    return round(100.0 * d[7] / total, 2) if total and len(d) > 7 else None


def tool_version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else None


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    # Not `import bcc` here: this process would map libLLVM/libclang too, share
    # their pages with the exporter and so change what the exporter's RSS means.
    bcc_version = tool_version(["dpkg-query", "-W", "-f=${Version}", "python3-bpfcc"])
    try:
        sys.path.insert(0, str(ROOT))
        import kvmtrace

        kv = kvmtrace.__version__
    except ImportError:
        kv = None
    osr = ""
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                osr = line.split("=", 1)[1].strip().strip('"')
    return {
        "nproc": os.cpu_count(), "kernel": platform.release(), "cpu_model": cpu,
        "mem_gib": round(mem_kib / 2**20, 1), "os": osr, "hostname": platform.node(),
        "kvmtrace": kv, "bcc": bcc_version,
        "bpftrace": tool_version(["bpftrace", "--version"]),
        "strace": tool_version(["strace", "-V"]), "gcc": tool_version(["gcc", "--version"]),
        "python": platform.python_version(),
    }


def build_drivers(outdir: Path) -> dict[str, str]:
    bins = {}
    for name in ("workload", "storm", "series"):
        src = BENCH / "drivers" / f"{name}.c"
        exe = outdir / f"kb-{name}"
        out = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(exe), str(src)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise BenchError(f"gcc {src.name} failed:\n{out.stderr}")
        bins[name] = str(exe)
    return bins


# ---- tracer configurations ---------------------------------------------------

@dataclass
class Config:
    """One configuration: start() attaches (and waits until attached), stop() detaches."""

    name: str
    desc: str
    command: str
    wrap: list[str] = field(default_factory=list)  # prefix for the driver (strace)

    def start(self) -> None:
        pass

    def stop(self) -> dict:
        return {}

    def counted(self, comm: str, workload: str) -> int | None:
        return None


class Serve(Config):
    """`kvmtrace serve -q` as shipped; attached once /metrics answers."""

    def __init__(self, extra: tuple[str, ...] = ()):
        super().__init__("kvmtrace", "kvmtrace serve -q (as shipped)",
                         "kvmtrace serve --web.listen-address 127.0.0.1:PORT -q "
                         + " ".join(extra))
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.cold_starts: list[float] = []
        self._stderr: IO[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def start(self) -> None:
        self.port = free_port()
        self._stderr = tempfile.TemporaryFile(mode="w+")
        t0 = time.perf_counter()
        self.proc = spawn([*KVMTRACE, "serve", "--web.listen-address",
                           f"127.0.0.1:{self.port}", "-q", *self.extra],
                          stdout=subprocess.DEVNULL, stderr=self._stderr)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._stderr.seek(0)
                raise BenchError(f"kvmtrace serve exited {self.proc.returncode}: "
                                 f"{self._stderr.read()[-2000:]}")
            try:
                _, text = scrape(self.url, timeout=60)
            except (OSError, urllib.error.URLError):
                time.sleep(0.02)
                continue
            if "kvmtrace_probe_attached" in text:
                self.cold_starts.append(time.perf_counter() - t0)
                return
        raise BenchError("kvmtrace serve did not answer /metrics within 120 s")

    def metrics(self) -> str:
        return scrape(self.url)[1]

    def counted(self, comm: str, workload: str) -> int | None:
        text = self.metrics()
        if workload == "check_ext":
            return int(metric_sum(text, "kvmtrace_vm_types_queries_total", comm=comm))
        if workload.startswith("create"):
            return int(metric_sum(text, "kvmtrace_vm_create_attempts_total", comm=comm))
        return None

    def stop(self) -> dict:
        health = {}
        with contextlib.suppress(OSError, urllib.error.URLError):
            text = self.metrics()
            for key in ("events_lost", "counts_dropped", "calls_dropped"):
                health[key] = int(metric_sum(text, f"kvmtrace_{key}_total"))
        assert self.proc is not None
        code = end(self.proc)
        if code != 0:
            self._stderr.seek(0)
            raise BenchError(f"kvmtrace serve exited {code} on SIGTERM: "
                             f"{self._stderr.read()[-2000:]}")
        self._stderr.close()
        return health


class ReadyLine(Config):
    """A tracer that prints a line containing READY once attached."""

    def __init__(self, name: str, desc: str, argv: list[str], stop_sig: int):
        super().__init__(name, desc, " ".join(argv))
        self.argv = argv
        self.stop_sig = stop_sig
        self.proc: subprocess.Popen | None = None
        self.out: list[str] = []
        self._reader: threading.Thread | None = None
        self._stderr: IO[str] | None = None

    def start(self) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = spawn(self.argv, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.out = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any("READY" in ln for ln in self.out):
                return
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited {self.proc.returncode}: {self.errors()}")
            time.sleep(0.01)
        raise BenchError(f"{self.name} did not attach within 120 s")

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.append(line)

    def errors(self) -> str:
        assert self._stderr is not None
        self._stderr.seek(0)
        return self._stderr.read()[-2000:]

    def stop(self) -> dict:
        assert self.proc is not None and self._reader is not None
        code = end(self.proc, self.stop_sig)
        self._reader.join(30)
        if code != 0:
            raise BenchError(f"{self.name} exited {code}: {self.errors()}")
        return {}


class Bpftrace(ReadyLine):
    def __init__(self):
        super().__init__("bpftrace", "bpftrace one-liner: count KVM_CREATE_VM by comm/type/ret",
                         ["bpftrace", "-e", BPFTRACE_PROG], signal.SIGINT)
        self.counts: dict[str, int] = {}

    def stop(self) -> dict:
        super().stop()  # the reader has drained the maps bpftrace printed
        for line in self.out:
            m = re.match(r"@creates\[(.*), (-?\d+), (-?\d+)\]: (\d+)", line.strip())
            if m:
                self.counts[m.group(1)] = self.counts.get(m.group(1), 0) + int(m.group(4))
        return {}

    def counted(self, comm: str, workload: str) -> int | None:
        return None  # known only at stop(): checked by the matrix afterwards


class Floor(ReadyLine):
    def __init__(self):
        super().__init__("floor", "empty BPF programs on sys_enter_ioctl/sys_exit_ioctl (bcc)",
                         [PY, str(BENCH / "bpfload.py"), "floor"], signal.SIGTERM)


class Variant(ReadyLine):
    """kvmtrace's BPF text with a bench/variants.py variant; NAME/nopoll: nobody drains events."""

    def __init__(self, variant: str):
        name, _, mode = variant.partition("/")
        poll = mode != "nopoll"
        super().__init__(f"v:{variant}", f"kvmtrace BPF text, variant {name!r}, ring buffer "
                         + ("drained by a no-op callback" if poll else "never drained")
                         + " (bench/bpfload.py)",
                         [PY, str(BENCH / "bpfload.py"), "variant", name,
                          *(["--poll"] if poll else [])], signal.SIGTERM)

    def stop(self) -> dict:
        super().stop()
        for line in reversed(self.out):
            with contextlib.suppress(ValueError):
                return json.loads(line)
        return {}


def make_variant(name: str) -> Callable[[], Config]:
    """NAME or NAME/nopoll: kvmtrace's BPF text with that variant, loaded by bpfload.py."""
    return lambda: Variant(name)


def variant_names() -> set[str]:
    """The variants bench/variants.py defines (plain data: importing it loads no BPF)."""
    sys.path.insert(0, str(BENCH))
    import variants

    return set(variants.VARIANTS)


def none_config() -> Config:
    return Config("none", "no tracing", "")


def strace_config() -> Config:
    return Config("strace", "strace -f -e trace=ioctl on the driver (output to /dev/null)",
                  " ".join(STRACE) + " DRIVER", wrap=STRACE)


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
    for r in range(1, rounds + 1):
        for make in configs:
            cfg = make()
            foreign = foreign_tracing_progs_settled()
            cfg.start()
            comms = {}
            try:
                for wl in workloads:
                    comm = f"{comm_prefix}{r}{CODES[wl]}"
                    comms[wl] = comm
                    qemu = qemu_processes()
                    res = run_driver(bins, cfg.wrap, wl, seconds, comm)
                    counted = cfg.counted(comm, wl)
                    runs.append({"round": r, "config": cfg.name, "workload": wl,
                                 "ns_per_op": res["ns_per_op"], "ops": res["ops"],
                                 "calls": res["calls"], "traced": counted,
                                 "foreign_tracing_progs": foreign,
                                 "qemu_running": max(qemu, qemu_processes())})
                    log(f"round {r}/{rounds} {cfg.name:<10} {wl:<16} "
                        f"{res['ns_per_op']:>12,.1f} ns/op")
            finally:
                health = cfg.stop()
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
            "summary": summarize(runs, [c().name for c in configs], workloads)}


def summarize(runs: list[dict], configs: list[str], workloads: list[str]) -> dict:
    """Per workload and config: median, min, max of ns/op; added = median over rounds
    of (config - none) in the same round (interleaving makes the pairs comparable)."""
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
            _CHILDREN.remove(p)
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

def scale(bins: dict, n_types: int, scrapes: int, retire_interval: float | None) -> dict:
    extra = ("--retire-interval", str(retire_interval)) if retire_interval else ()
    serve = Serve(extra)
    serve.start()
    comm = f"kbseries{os.getpid() % 10000}"
    out: dict = {"vm_types": n_types, "comm": comm, "retire_interval_s": retire_interval or 10.0,
                 "cold_starts_s": serve.cold_starts}
    driver = None
    try:
        assert serve.proc is not None
        pid = serve.proc.pid

        def measure(label: str) -> None:
            lat, size, n_samples = [], 0, 0
            for _ in range(scrapes):
                t, text = scrape(serve.url, timeout=120)
                lat.append(t)
                size = len(text)
            n_samples = sum(1 for ln in text.splitlines() if ln and not ln.startswith("#"))
            om = [scrape(serve.url, timeout=120, accept=PROMETHEUS_ACCEPT)[0]
                  for _ in range(max(1, scrapes // 3))]
            out[label] = {
                "scrapes": len(lat), "latency_ms": [round(x * 1e3, 2) for x in lat],
                "median_ms": statistics.median(lat) * 1e3, "max_ms": max(lat) * 1e3,
                "body_bytes": size, "exported_samples": n_samples,
                "openmetrics_median_ms": statistics.median(om) * 1e3,
                "series": {"attempts": len([1 for lb, _ in samples(text,
                           "kvmtrace_vm_create_attempts_total") if lb.get("comm") == comm]),
                           "rejected": len([1 for lb, _ in samples(text,
                           "kvmtrace_vm_create_rejected_total") if lb.get("comm") == comm])},
                "rss_kib": rss_kib(pid), "rss_top_mappings": rss_breakdown(pid),
            }
            log(f"scale {label}: median {out[label]['median_ms']:.1f} ms, max "
                f"{out[label]['max_ms']:.1f} ms, RSS {out[label]['rss_kib']['VmRSS']} KiB")

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
        _CHILDREN.remove(driver)
        # Wait for the retirement pass to fold the exited process out of the map.
        deadline = time.monotonic() + (retire_interval or 10.0) * 3 + 30
        while time.monotonic() < deadline:
            if metric_sum(serve.metrics(), "kvmtrace_exited_processes_total") >= 1:
                break
            time.sleep(0.5)
        else:
            raise BenchError("the series driver's counts were never folded")
        measure("folded")  # the same series, now held by the exporter in Python
    finally:
        if driver is not None and driver.poll() is None:
            end(driver, signal.SIGKILL)
        serve.stop()
    return out


# ---- targets and report --------------------------------------------------------

def targets(res: dict) -> list[dict]:
    t = []
    s = res.get("overhead", {}).get("summary", {})

    def added(wl: str, cfg: str) -> float | None:
        return s.get(wl, {}).get(cfg, {}).get("added_ns")

    k, f = added("fionread", "kvmtrace"), added("fionread", "floor")
    if k is not None and f:
        t.append({"name": "unrelated ioctl (FIONREAD): kvmtrace added <= 1.1x floor's added",
                  "value": f"{k:.0f} ns vs {f:.0f} ns ({k / f:.2f}x)", "met": k <= 1.1 * f})
    k, f = added("getppid", "kvmtrace"), added("getppid", "floor")
    if k is not None and f is not None:
        t.append({"name": "getppid: kvmtrace added <= floor's added + 10 ns",
                  "value": f"{k:.0f} ns vs {f:.0f} ns ({k - f:+.0f} ns)", "met": k <= f + 10})
    k, b = added("create_rejected", "kvmtrace"), added("create_rejected", "bpftrace")
    if k is not None and b:
        t.append({"name": "rejected KVM_CREATE_VM: kvmtrace added <= 0.5x bpftrace's added",
                  "value": f"{k:.0f} ns vs {b:.0f} ns ({k / b:.2f}x)", "met": k <= 0.5 * b})
    st = res.get("storm")
    if st:
        t.append({"name": "storm counts exact",
                  "value": f"{st['exported_total']:,} exported of {st['issued_total']:,} issued",
                  "met": st["exact"]})
    cold = res.get("cold_start")
    if cold and cold.get("samples_s"):
        t.append({"name": "cold start (Popen to first /metrics) <= 3 s",
                  "value": f"median {cold['median_s']:.2f} s, max {cold['max_s']:.2f} s",
                  "met": cold["max_s"] <= 3.0})
    sc = res.get("scale")
    if sc:
        worst = max(sc["live"]["max_ms"], sc["folded"]["max_ms"])
        t.append({"name": f"scrape of {sc['vm_types']:,} series <= 100 ms",
                  "value": f"live map: median {sc['live']['median_ms']:.0f} ms, max "
                           f"{sc['live']['max_ms']:.0f} ms; folded: median "
                           f"{sc['folded']['median_ms']:.0f} ms", "met": worst <= 100})
        rss = max(sc[p]["rss_kib"]["VmRSS"] for p in ("empty", "live", "folded")) / 1024
        t.append({"name": "exporter RSS <= 60 MB",
                  "value": f"{rss:.0f} MiB (VmRSS, max over the scale phase)",
                  "met": rss * 1.048576 <= 60})
    return t


def fmt_ns(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# kvmtrace benchmarks ({res['mode']})", "",
             f"Machine: nproc {m['nproc']}, kernel {m['kernel']}, CPU {m['cpu_model']}, "
             f"{m['mem_gib']} GiB, {m['os']}; kvmtrace {m['kvmtrace']}, bcc {m['bcc']}, "
             f"{m['bpftrace']}, {m['strace']}.", "",
             f"Run {res['started']} ({res['duration_s']:.0f} s). Noise: load average "
             f"{res['noise']['loadavg_start']} at start, {res['noise']['loadavg_end']} at end; "
             f"CPU steal {res['noise']['steal_pct']}%; another engineer's QEMU was running "
             f"during {res['noise'].get('runs_with_qemu', '?')} of "
             f"{res['noise'].get('runs', '?')} driver runs (max "
             f"{res['noise']['qemu_processes_max']} qemu processes seen); foreign tracing BPF "
             f"programs seen {res['noise']['foreign_tracing_progs_max']}.", ""]
    ov = res.get("overhead")
    if ov:
        cfgs = res["settings"]["configs"]
        lines += [f"## Overhead: ns per call, median (min–max) of {res['settings']['rounds']} "
                  f"interleaved rounds, {res['settings']['seconds']} s per run"
                  + (f", drivers pinned to CPU {res['settings']['driver_cpu']}"
                     if res["settings"].get("driver_cpu") is not None else ""), "",
                  "| workload | " + " | ".join(cfgs) + " |",
                  "|---|" + "---:|" * len(cfgs)]
        for wl, row in ov["summary"].items():
            cells = [f"{fmt_ns(row[c]['median'])} ({fmt_ns(row[c]['min'])}–"
                     f"{fmt_ns(row[c]['max'])})" if c in row else "—" for c in cfgs]
            lines.append(f"| {wl} | " + " | ".join(cells) + " |")
        added_cfgs = [c for c in cfgs if c != "none"]
        lines += ["", "## Added ns per call over none (median of per-round differences) "
                  "and kvmtrace's ratios", "",
                  "| workload | " + " | ".join(added_cfgs)
                  + " | kvmtrace ÷ floor | kvmtrace ÷ bpftrace |",
                  "|---|" + "---:|" * (len(added_cfgs) + 2)]
        noisy = False
        for wl, row in ov["summary"].items():
            # Within noise: smaller than half the spread of "none" over the rounds.
            spread = (row["none"]["max"] - row["none"]["min"]) / 2 if "none" in row else 0

            def mark(x: float, spread: float = spread) -> str:
                return "†" if abs(x) < spread else ""

            cells = [f"{row[c]['added_ns']:+,.0f}{mark(row[c]['added_ns'])}"
                     if "added_ns" in row.get(c, {}) else "—" for c in added_cfgs]
            for other in ("floor", "bpftrace"):
                r = row.get(f"ratio_kvmtrace_to_{other}")
                dubious = any(mark(row.get(c, {}).get("added_ns", 1e18))
                              for c in ("kvmtrace", other))
                cells.append(f"{r:.2f}×{'†' if dubious else ''}" if r is not None else "—")
                noisy |= dubious
            lines.append(f"| {wl} | " + " | ".join(cells) + " |")
        if noisy:
            lines += ["", "† within noise: smaller than half the min–max spread of \"none\" "
                      "over the rounds, so the sign and ratio mean little."]
        bad = [r for r in ov["runs"] if r["verified"] is False]
        checked = [r for r in ov["runs"] if r["verified"] is not None]
        lines += ["", f"Tracer counts checked against the drivers' calls: {len(checked)} runs, "
                  f"{len(bad)} mismatches."
                  + "".join(f" {r['config']}/{r['workload']}/round {r['round']}: "
                            f"{r['traced']} of {r['calls']};" for r in bad)]
        for h in ov["tracer_health"]:
            if h.get("events_lost"):
                lines.append(f"kvmtrace round {h['round']}: {h['events_lost']:,} live-view events "
                             "lost (ring buffer full; counts are exact regardless).")
                break
    st = res.get("storm")
    if st:
        lines += ["", "## Storm", "",
                  f"2 processes x {st['per_process']:,} rejected KVM_CREATE_VM as fast as "
                  f"they can, under `kvmtrace serve -q`: {st['storm_wall_s']:.2f} s, "
                  + ", ".join(f"{x:,.0f}" for x in st["ns_per_call"]) + " ns per call.", "",
                  "| comm | issued | exported attempts | exported rejected (EINVAL) |",
                  "|---|---:|---:|---:|"]
        for d in st["drivers"]:
            c = d["comm"]
            lines.append(f"| {c} | {d['calls']:,} | {st['exported'][c]:,} | "
                         f"{st['exported_rejected_einval'][c]:,} |")
        lines += [f"| total | {st['issued_total']:,} | {st['exported_total']:,} | |", "",
                  f"Exact: **{'yes' if st['exact'] else 'NO'}**. kvmtrace_events_lost_total "
                  f"{st['events_lost_total']:,}, counts_dropped {st['counts_dropped_total']}, "
                  f"calls_dropped {st['calls_dropped_total']}. Scrapes during the storm "
                  f"(one every {st['scrape_every_s']} s): {st['scrapes_during_storm']}, errors "
                  f"{st['scrape_errors']}, latency median "
                  f"{st['scrape_latency_median_ms'] or 0:.1f} ms, max "
                  f"{st['scrape_latency_max_ms'] or 0:.1f} ms."]
    cold = res.get("cold_start")
    if cold and cold.get("samples_s"):
        lines += ["", "## Cold start", "",
                  f"Popen of `kvmtrace serve` to first successful /metrics, "
                  f"{len(cold['samples_s'])} starts: median {cold['median_s']:.2f} s, "
                  f"min {cold['min_s']:.2f} s, max {cold['max_s']:.2f} s "
                  f"(first start of the run {cold['samples_s'][0]:.2f} s)."]
    sc = res.get("scale")
    if sc:
        lines += ["", f"## Scale: {sc['vm_types']:,} series", "",
                  f"One process ({sc['comm']}) makes one rejected KVM_CREATE_VM for each of "
                  f"{sc['vm_types']:,} distinct VM types (1000..{999 + sc['vm_types']}): "
                  f"{sc['vm_types']:,} kernel map entries, exported as {sc['vm_types']:,} "
                  "attempts + as many rejected series. \"live\": the process is alive, its "
                  "entries are read from the BPF map at every scrape; \"folded\": it exited "
                  "and the retirement pass (--retire-interval "
                  f"{sc['retire_interval_s']:g} s) moved its counts into the exporter's Python "
                  "state.", "",
                  "| state | series (attempts / rejected) | samples | body | scrape median | "
                  "scrape max | OpenMetrics median | VmRSS | VmHWM |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label in ("empty", "live", "folded"):
            p = sc[label]
            lines.append(
                f"| {label} | {p['series']['attempts']:,} / {p['series']['rejected']:,} | "
                f"{p['exported_samples']:,} | {p['body_bytes'] / 1024:,.0f} KiB | "
                f"{p['median_ms']:.1f} ms | {p['max_ms']:.1f} ms | "
                f"{p['openmetrics_median_ms']:.1f} ms | "
                f"{p['rss_kib']['VmRSS'] / 1024:.1f} MiB | "
                f"{p['rss_kib']['VmHWM'] / 1024:.1f} MiB |")
        top = ", ".join(f"{x['mapping'].rsplit('/', 1)[-1]} {x['rss_kib'] / 1024:.0f} MiB"
                        for x in sc["live"]["rss_top_mappings"])
        lines += ["", f"Largest resident mappings (live): {top}."]
    var = res.get("variants")
    if var:
        cfgs = list(next(iter(var["summary"].values())).keys())
        cfgs = [c for c in cfgs if not c.startswith("ratio")]
        lines += ["", "## BPF variants: added ns per call over none (median of per-round "
                  f"differences, {var['rounds']} rounds)", "",
                  "| workload | " + " | ".join(c for c in cfgs if c != "none") + " |",
                  "|---|" + "---:|" * (len(cfgs) - 1)]
        for wl, row in var["summary"].items():
            lines.append(f"| {wl} | " + " | ".join(
                f"{row[c]['added_ns']:+,.0f}" for c in cfgs if c != "none") + " |")
    if res.get("targets"):
        lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
        for t in res["targets"]:
            lines.append(f"| {t['name']} | {t['value']} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds, not minutes (CI)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 7; quick 1)")
    ap.add_argument("--seconds", type=float, help="seconds per driver run (0.5; quick 0.05)")
    ap.add_argument("--storm-calls", type=int,
                    help="rejected creates per storm process (1,000,000; quick 100,000)")
    ap.add_argument("--series", type=int, default=10000, help="distinct VM types (10,000)")
    ap.add_argument("--phases", default="overhead,storm,scale",
                    help="comma-separated: overhead, storm, scale")
    ap.add_argument("--variants", default="",
                    help="comma-separated bench/variants.py names (NAME or NAME/nopoll) to "
                         "measure after none, floor, kvmtrace, bpftrace (extra phase)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help="comma-separated subset of the workloads (overhead, variants)")
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
    workloads = [w for w in args.workloads.split(",") if w]
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
    for tool in ("gcc", "bpftrace", "strace"):
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
