"""The privileged tier's shared fixtures and helpers: real bcc, real /dev/kvm.

Every test here needs root, bcc and a real /dev/kvm and never skips: CI runs as root on
a host with /dev/kvm, so a test that cannot run there is a failure (pytest.fail with the
reason). The autouse fixture checks that once per module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
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


class Lines:
    """A stream read line by line by a thread as it comes, so that a long-lived process
    never blocks on (or drops lines into) a full pipe; ``text()`` is what came so far."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in iter(stream.readline, ""):
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def join(self, timeout: float = 30) -> None:
        self._thread.join(timeout)


class Serve:
    def __init__(self, *extra, preexec_fn=None, drain: bool = False):
        """``drain``: read its stdout and stderr as they come (``stop`` then returns what
        was read), for a serve that lives long and writes its live view."""
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*KVMTRACE, "serve", "--web.listen-address", f"127.0.0.1:{self.port}", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
        self.out = Lines(self.proc.stdout) if drain else None
        self.err = Lines(self.proc.stderr) if drain else None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self.err is not None:
                    self.err.join()
                err = self.err.text() if self.err is not None else self.proc.stderr.read()
                pytest.fail(f"serve exited {self.proc.returncode}: {err}")
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
        if self.out is None:
            out, err = self.proc.communicate(timeout=30)
            return self.proc.returncode, out, err
        self.proc.wait(timeout=30)
        self.out.join()
        self.err.join()
        return self.proc.returncode, self.out.text(), self.err.text()


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


class Watch:
    """One `kvmtrace trace --json` or `explain --json` for the whole session, unfiltered:
    its JSON lines read as they come; each test takes the records of its own processes
    (a busy host's other VMs never disturb it)."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc = start_attached(*args, "--json")
        self.out = Lines(self.proc.stdout)
        self.err = Lines(self.proc.stderr)

    def records(self) -> list[dict]:
        return [json.loads(line) for line in list(self.out.lines)]

    def wait(self, want, count: int = 1, timeout: float | None = None) -> list[dict]:
        """The records ``want`` accepts, once there are ``count`` of them."""
        deadline = time.monotonic() + (timeout or START_TIMEOUT)
        while True:
            got = [r for r in self.records() if want(r)]
            if len(got) >= count:
                return got
            if self.proc.poll() is not None:
                pytest.fail(f"kvmtrace {self.args[0]} exited {self.proc.returncode}: "
                            f"{self.err.text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"kvmtrace {self.args[0]} --json: {len(got)} of the {count} "
                            "records waited for")
            time.sleep(0.2)

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        self.out.join()
        self.err.join()
        return self.proc.returncode, self.err.text()


class Shared:
    """One `serve`, one `trace --json` and one `explain --json` shared by the privileged
    modules that only watch what their own processes do, each started when a test first
    asks for it: every kvmtrace start is a bcc compile (25-60 s under the kernel tier's
    emulation). Tests that need other flags, or stop a kvmtrace, start their own."""

    SERVE = ("--retire-interval", "0.5", "--rejections", "1000")

    def __init__(self) -> None:
        self._serve: Serve | None = None
        self._watches: dict[str, Watch] = {}

    @property
    def serve(self) -> Serve:
        if self._serve is None:
            self._serve = Serve(*self.SERVE, drain=True)
        return self._serve

    def watch(self, command: str) -> Watch:
        if command not in self._watches:
            self._watches[command] = Watch(command)
        return self._watches[command]

    @property
    def trace(self) -> Watch:
        return self.watch("trace")

    @property
    def explain(self) -> Watch:
        return self.watch("explain")

    def close(self) -> list[str]:
        """Stop what was started (once); what went wrong (a non-zero exit, a traceback)."""
        problems = []
        for name, w in self._watches.items():
            code, err = w.stop()
            if code != 0 or "Traceback" in err:
                problems.append(f"{name} --json stopped with {code}: {err[-2000:]}")
        if self._serve is not None:
            code, _, err = self._serve.stop()
            if code != 0 or "Traceback" in err:
                problems.append(f"serve stopped with {code}: {err[-2000:]}")
        self._watches, self._serve = {}, None
        return problems


def held_bpf(pid: int) -> tuple[set[int], list[str]]:
    """The BPF map ids process ``pid`` holds fds of, and what its other fds are."""
    ids, kinds = set(), []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            kinds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        ids.update(int(ln.split()[1]) for ln in info.splitlines() if ln.startswith("map_id:"))
    return ids, kinds


def maps_alive(map_ids: set[int]) -> set[int]:
    """Those of ``map_ids`` the kernel still has."""
    import ctypes

    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_map_get_fd_by_id.argtypes = [ctypes.c_uint32]
    alive = set()
    for i in map_ids:
        fd = lib.bpf_map_get_fd_by_id(i)
        if fd >= 0:
            os.close(fd)
            alive.add(i)
    return alive


def host_has_kprobes() -> bool:
    return Path("/sys/bus/event_source/devices/kprobe").exists()
