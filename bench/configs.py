"""The tracer configurations the benchmarks compare: none, floor (empty programs), kvmtrace
serve, bpftrace, strace, and variants of kvmtrace's BPF (bench/variants.py, applied by
bench/overlay.py)."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from common import (
    BENCH,
    KVMTRACE,
    PY,
    BenchError,
    TracerHung,
    end,
    free_port,
    log,
    metric_sum,
    scrape,
    spawn,
)

BPFTRACE_PROG = (
    'BEGIN { printf("READY\\n"); } '
    "tracepoint:syscalls:sys_enter_ioctl /args->cmd == 0xae01/ "
    "{ @vmtype[tid] = args->arg + 1; } "
    "tracepoint:syscalls:sys_exit_ioctl /@vmtype[tid]/ "
    "{ @creates[comm, @vmtype[tid] - 1, args->ret < 0 ? args->ret : 0] = count(); "
    "delete(@vmtype[tid]); }"
)
STRACE = ["strace", "-f", "-qq", "-e", "trace=ioctl", "-o", "/dev/null"]

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

    stop_timeout = 30.0  # seconds from the stop signal to SIGKILL

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
        code = end(self.proc, self.stop_sig, self.stop_timeout)
        self._reader.join(30)
        if code != 0:
            raise BenchError(f"{self.name} exited {code}: {self.errors()}")
        return {}


class Bpftrace(ReadyLine):
    # bpftrace 0.17 once (a CI run, 2026-12-01) did not exit within 30 s of SIGINT.
    stop_timeout = 90.0

    def __init__(self):
        super().__init__("bpftrace", "bpftrace one-liner: count KVM_CREATE_VM by comm/type/ret",
                         ["bpftrace", "-e", BPFTRACE_PROG], signal.SIGINT)
        self.counts: dict[str, int] = {}

    def stop(self) -> dict:
        try:
            super().stop()  # the reader has drained the maps bpftrace printed
        except BenchError as exc:
            # Printed its maps, then hung on the way out: the counts are complete.
            if not any(line.startswith("@creates[") for line in self.out):
                if self.proc is not None and self.proc.returncode == -signal.SIGKILL:
                    raise TracerHung(exc.args[0]) from None  # killed after stop_timeout
                raise
            log(f"bpftrace: {exc.args[0].splitlines()[0]} after printing its maps; "
                "its counts are kept")
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
    """The variants bench/variants.py defines, each checked to apply to the product's C
    (bench/overlay.py; a one-line BenchError before anything runs when one no longer
    does). Pure text: loads no BPF."""
    sys.path.insert(0, str(BENCH))
    from kvmtrace import loader

    import overlay
    import variants

    source = loader.bpf_source()
    for name in variants.VARIANTS:
        try:
            variants.apply(name, source)
        except overlay.OverlayError as exc:
            raise BenchError(str(exc)) from None
    return set(variants.VARIANTS)


def none_config() -> Config:
    return Config("none", "no tracing", "")


def strace_config() -> Config:
    return Config("strace", "strace -f -e trace=ioctl on the driver (output to /dev/null)",
                  " ".join(STRACE) + " DRIVER", wrap=STRACE)


