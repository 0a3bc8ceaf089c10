"""The privileged tier's shared fixtures and helpers: real bcc, real /dev/kvm.

Every test here needs root, bcc and a real /dev/kvm and never skips: CI runs as root on
a host with /dev/kvm, so a test that cannot run there is a failure (pytest.fail with the
reason). The autouse fixture checks that once per module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import HERE, KVMTRACE, free_port

VMMAKER = [sys.executable, str(HERE / "vmmaker.py")]
# Under emulation (make test-kernels) bcc compiles take 25-60 s; the guest raises this.
START_TIMEOUT = float(os.environ.get("KVMTRACE_TEST_START_TIMEOUT", "60"))


@pytest.fixture(scope="module", autouse=True)
def privileged_host():
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    if not os.path.exists("/dev/kvm"):
        problems.append("no /dev/kvm")
    try:
        import bcc  # noqa: F401
    except ImportError:
        problems.append("bcc not importable (python3-bpfcc, .venv --system-site-packages)")
    if problems:
        pytest.fail("privileged tier cannot run here: " + ", ".join(problems))


class Serve:
    def __init__(self, *extra, preexec_fn=None):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*KVMTRACE, "serve", "--web.listen-address", f"127.0.0.1:{self.port}", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                self.metrics()
                if "kvmtrace_probe_attached" in self.metrics():
                    return
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"serve did not answer /metrics within {START_TIMEOUT:.0f} s")

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return r.read().decode()

    def metrics(self) -> str:
        return self.get("/metrics")

    def stop(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, out, err


def samples(text: str, name: str) -> dict[frozenset, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[frozenset(s.labels.items())] = s.value
    return out


def start_attached(*args: str) -> subprocess.Popen:
    """Start a kvmtrace command; return once it printed its banner (probes attached)."""
    proc = subprocess.Popen([*KVMTRACE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + START_TIMEOUT
    banner = ""
    while "Hit Ctrl-C" not in banner and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            pytest.fail(f"kvmtrace {args[0]} exited early: {proc.wait()}")
        banner += line
    if "Hit Ctrl-C" not in banner:
        proc.kill()
        pytest.fail(f"kvmtrace {args[0]} did not attach within {START_TIMEOUT:.0f} s")
    return proc


def host_has_kprobes() -> bool:
    return Path("/sys/bus/event_source/devices/kprobe").exists()
