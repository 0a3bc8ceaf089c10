import functools
import os
import socket
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from kvmtrace import contract
from kvmtrace import plan as planmod
from kvmtrace.collector import KvmtraceCollector
from kvmtrace.decode import Decoder
from kvmtrace.facts import HostFacts
from kvmtrace.kvmdev import KvmInfo
from kvmtrace.plan import Attachment
from kvmtrace.runtime import Runtime
from tests.recorded import RecordedSource

HERE = Path(__file__).parent
KERNELS = HERE / "kernels"
KVMTRACE = [sys.executable, "-m", "kvmtrace"]


@pytest.fixture
def kernel_facts():
    from kvmtrace.facts import HostFacts

    def load(name: str) -> HostFacts:
        return HostFacts.load(KERNELS / f"{name}.json")

    return load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique_comm(prefix: str = "kvmt") -> str:
    """A comm no other process on the host has (15 bytes max)."""
    return f"{prefix}-{os.getpid() % 100000}-{os.urandom(2).hex()}"[:15]


# Raw counts (tgid, probe, vm type, result, verdicts, detail, comm, count) of one recorded
# host: every per-series family, two processes, an odd comm and a type past 32 bits.
RECORDED_RAWS = [
    (100, contract.PROBE_CREATE_VM, 0, 0, 0, 0, b"qemu-system-x86", 4),
    (100, contract.PROBE_CREATE_VM, 2, -22, 0, 0, b"qemu-system-x86", 3),
    (101, contract.PROBE_CREATE_VM, 2, -22, 0, 0, b"qemu-system-x86", 1),
    (101, contract.PROBE_CREATE_VM, 2**32 + 1, -22, 0, 0, b"fuzz\x07er", 1),
    (100, contract.PROBE_VM_TYPES_QUERY, 0, 1, 0, 0, b"qemu-system-x86", 2),
    (100, contract.PROBE_ARCH_INIT_VM, 2, -22, 0, 0, b"qemu-system-x86", 3),
    (100, contract.FIRST_TYPE_CHECK + 1, 2, 0, 0, 0, b"qemu-system-x86", 3),
    (100, contract.FIRST_TYPE_CHECK + 1, 0, 1, 0, 0, b"qemu-system-x86", 4),
]


def _recorded_collector(kernel_facts, raws=RECORDED_RAWS, kvm=None, fail=False, with_pid=False,
                        live=None, evidence=None):
    plan = planmod.make_plan(kernel_facts("seed-tdx-v12-kprobes"))
    source = RecordedSource(raws, fail=fail)
    rt = Runtime(source, Decoder(plan, "x86_64"),
                 live_pids=lambda: live if live is not None else {100, 101})
    attachments = [Attachment(p, p.mechanism is not None) for p in plan.points]
    reg = CollectorRegistry()
    reg.register(KvmtraceCollector(
        rt, attachments, lambda: kvm or KvmInfo(True, 12, 0x1), "x86_64",
        {"version": "t", "bcc_version": "0.26.0", "kernel": "6.3"}, with_pid=with_pid,
        evidence_query=lambda: evidence))
    return reg, rt, source


@pytest.fixture
def recorded_collector(kernel_facts):
    """A factory: (registry, runtime, source) of a KvmtraceCollector over a recorded
    source (RECORDED_RAWS by default) on the seed kernel's plan, in a fresh registry."""
    return functools.partial(_recorded_collector, kernel_facts)


def with_follow_points(f: HostFacts) -> HostFacts:
    """A captured kprobe host's facts plus the symbols and tracepoints the process-
    following points need (added by hand: the captures predate those points)."""
    import dataclasses

    from kvmtrace.facts import Symbol

    syms = {**f.symbols, **{n: Symbol(n, None) for n in (
        "do_exit", "kvm_arch_vm_ioctl", "__x64_sys_execve", "__x64_sys_execveat")},
        "kvm_arch_vcpu_ioctl": Symbol("kvm_arch_vcpu_ioctl", "kvm"),
        "kvm_vm_ioctl": Symbol("kvm_vm_ioctl", "kvm"),
        "sev_mem_enc_ioctl": Symbol("sev_mem_enc_ioctl", "kvm_amd")}
    return dataclasses.replace(f, symbols=syms, tracepoints=[
        *f.tracepoints, "sched:sched_process_exit", "signal:signal_deliver",
        "syscalls:sys_enter_exit_group", "syscalls:sys_enter_execve",
        "kvm:kvm_userspace_exit"])


# ---- The privileged kvmtrace processes a session shares (tests/privileged/, tests/vm/) ----
# Every kvmtrace start is a bcc compile: seconds here, minutes under the kernel tier's
# emulation, so the privileged modules and the guest-only tests share one `serve`, one
# `trace --json`, one `explain --json` and one `doctor --json` report. Defined here, the
# root of both directories, so a guest's session starts each of them once.

@pytest.fixture(scope="session")
def shared():
    from tests.privileged.conftest import Shared

    s = Shared()
    yield s
    problems = s.close()
    assert not problems, problems


@pytest.fixture(scope="session")
def doctor_report() -> dict:
    """One `doctor --json` of this host (its attach test is a bcc compile) for the session;
    its exit status is the one the report states, and it never prints a traceback."""
    import json
    import subprocess

    from tests.privileged.conftest import START_TIMEOUT

    if os.geteuid() != 0:
        pytest.fail("doctor's attach test runs as root (the privileged tiers)")
    proc = subprocess.run([*KVMTRACE, "doctor", "--json"], capture_output=True, text=True,
                          timeout=max(180, START_TIMEOUT), check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"doctor --json exited {proc.returncode} without a report: {proc.stderr}")
    assert proc.returncode == report["exit_status"], (proc.returncode, proc.stderr)
    return report


# The session's kvmtrace processes cost CPU while they idle (under the kernel tier's
# emulation a tenth of a guest each): the tests that use them run first, one after
# another, and they stop after the last of them.
LAST_SHARED = pytest.StashKey[str]()


def pytest_collection_modifyitems(config, items):
    users = [i for i in items if "shared" in getattr(i, "fixturenames", ())]
    if users:
        ids = {id(i) for i in users}
        items[:] = users + [i for i in items if id(i) not in ids]
        config.stash[LAST_SHARED] = users[-1].nodeid


@pytest.fixture(autouse=True)
def _shared_stops_after_its_last_user(request):
    yield
    if request.node.nodeid == request.config.stash.get(LAST_SHARED, None):
        problems = request.getfixturevalue("shared").close()
        assert not problems, problems
