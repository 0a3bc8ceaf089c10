"""Shared pieces of the benchmark harness: paths, workloads, the children it starts, host
readings (RSS, CPU steal, foreign tracing programs), scrapes and the C drivers."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

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
    "fork_exit": "fork(); the child _exit(0)s at once; waitpid() (process creation and exit)",
    "fork_exec_exit": "fork(); the child execve()s the driver with 20 arguments of 40 bytes "
                      "(a VMM's command line), which exits 0 at once; waitpid()",
    "write_pipe": "write() 8 bytes to a pipe and read() them back (small writes, host-wide)",
    "write_null": "write() 64 bytes to /dev/null",
    "kvm_run_io": "KVM_RUN of a tiny guest writing to an I/O port in a loop (a VM that ran)",
}
# --quick's default workloads: all but the fork, write and KVM_RUN ones for now, because
# tests/test_bench_quick.py expects exactly the five syscall workloads in the quick JSON;
# once it lists the two, make this list(WORKLOADS). `--quick --workloads` runs any.
QUICK_WORKLOADS = [w for w in WORKLOADS if not w.startswith(("fork_", "write_", "kvm_run"))]
# Short codes for per-run comms ("kb<round><code>", at most 15 bytes).
CODES = {"fionread": "fio", "getppid": "ppid", "create_rejected": "rej",
         "create_accepted": "acc", "check_ext": "cap", "fork_exit": "fork",
         "fork_exec_exit": "exec", "write_pipe": "wpip", "write_null": "wnul",
         "kvm_run_io": "run"}

# bpftrace 0.17: count KVM_CREATE_VM (0xae01) by comm, VM type and result, on the
# same two tracepoints kvmtrace uses here. Type is stored +1 so type 0 is not
# mistaken for "no entry"; a VM fd is counted as 0 like kvmtrace does.
TRACING_PROG_TYPES = {"tracepoint", "raw_tracepoint", "raw_tracepoint_writable", "kprobe",
                      "tracing", "perf_event"}


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


class TracerHung(BenchError):
    """A tracer did not exit after its stop signal and left no result (bpftrace 0.17 does
    so now and then on this machine): the configuration's round is run again."""


# ---- children: every process we start is tracked and ended on the way out ----

CHILDREN: list[subprocess.Popen] = []


def spawn(cmd: list[str], **kw) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, **kw)
    CHILDREN.append(proc)
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
    if proc in CHILDREN:
        CHILDREN.remove(proc)
    return proc.returncode


def end_all() -> None:
    for proc in list(CHILDREN):
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
    for name in ("workload", "storm", "series", "names"):
        src = BENCH / "drivers" / f"{name}.c"
        exe = outdir / f"kb-{name}"
        out = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(exe), str(src)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise BenchError(f"gcc {src.name} failed:\n{out.stderr}")
        bins[name] = str(exe)
    return bins


