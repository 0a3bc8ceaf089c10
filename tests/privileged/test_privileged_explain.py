"""Privileged tier for rejected-attempt explanations (real kernel, real /dev/kvm).

Never skips: see tests/privileged/conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from kvmtrace import kvmdev, tables
from tests.privileged.conftest import (
    VMMAKER,
    host_has_kprobes,
    samples,
)

pytestmark = pytest.mark.privileged

TYPES = [0, 1, 2, 3, 4, 5, 99, 2**32 + 1]
THREAD_REPEAT = 5


def vmmaker(*args) -> list[dict]:
    proc = subprocess.run([*VMMAKER, *args], capture_output=True, text=True, check=True,
                          timeout=60)
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.fixture(scope="module")
def explained(shared):
    """The session's exporter and `explain --json` watching this module's rejected
    creations (every one of them: each rejected create is one explained attempt)."""
    prefix = f"kx{os.getpid() % 10000}{os.urandom(1).hex()}"
    serve, explain = shared.serve, shared.explain
    calls = {
        "types": vmmaker("--name", f"{prefix}-t", "--types", ",".join(map(str, TYPES))),
        "fds": vmmaker("--name", f"{prefix}-f", "--types", "0", "--exhaust-fds"),
        "threads": vmmaker("--name", f"{prefix}-m", "--types", "2,5", "--threads", "2",
                           "--repeat", str(THREAD_REPEAT)),
    }
    rejected = sum(c.get("ret", 0) < 0 for cs in calls.values() for c in cs if "vm_type" in c)
    assert rejected == len(TYPES) - 1 + 1 + 2 * THREAD_REPEAT, calls
    attempts = explain.wait(lambda a: a.get("comm", "").startswith(prefix), rejected)
    time.sleep(1.0)  # one more poll: nothing beyond what was waited for
    attempts = [a for a in explain.records() if a.get("comm", "").startswith(prefix)]
    text = serve.metrics()
    rejections = json.loads(serve.get("/api/rejections"))
    yield prefix, calls, attempts, text, rejections


def mine(attempts, comm):
    return [a for a in attempts if a["comm"] == comm]


def test_every_unsupported_type_is_type_unsupported_with_names_and_mask(explained):
    prefix, _calls, attempts, _, _ = explained
    mask = kvmdev.query().vm_types_mask
    got = mine(attempts, f"{prefix}-t")
    assert [a["vm_type"] for a in got] == [t for t in TYPES if t != 0]  # type 0 not reported
    for a in got:
        name = tables.vm_type_name(a["vm_type"], "x86_64")
        assert (a["reason"], a["errno"], a["vm_type_name"]) == ("type_unsupported", "EINVAL",
                                                                name)
        assert f"KVM_CAP_VM_TYPES={mask:#x}" in a["explanation"]
        assert f"asked for VM type {a['vm_type']} ({name}" in a["explanation"]
        assert a["hint"]
        assert a["result"] == -22 and a["latency_ns"] > 0
        ioctl = a["steps"][0]
        assert (ioctl["probe"], ioctl["observed"]) == ("KVM_CREATE_VM", True)


def test_chain_marks_unobserved_steps_or_shows_arch_init_verdict(explained):
    prefix, _, attempts, _, _ = explained
    threads = mine(attempts, f"{prefix}-t")
    assert threads, f"no attempt of {prefix}-t was explained"
    for a in threads:
        init = next(s for s in a["steps"] if s["probe"] == "kvm_arch_init_vm")
        if host_has_kprobes():
            assert init["observed"] and init["mechanism"] == "kprobe"
            assert (init["result"], init["rejected"]) == (-22, True)
            assert "kvm_arch_init_vm" in a["explanation"]
        else:
            assert not init["observed"] and init["note"]
            assert "not observable here" in a["explanation"]


def test_fd_exhaustion_is_fd_exhausted(explained):
    prefix, calls, attempts, _, _ = explained
    assert [(c["ret"], c["errno"]) for c in calls["fds"]] == [(-1, 24)]
    [a] = mine(attempts, f"{prefix}-f")
    assert (a["reason"], a["errno"], a["vm_type"]) == ("fd_exhausted", "EMFILE", 0)
    assert "ulimit" in a["hint"]


def test_two_threads_get_their_own_chains(explained):
    prefix, calls, attempts, _, _ = explained
    got = mine(attempts, f"{prefix}-m")
    assert len(got) == 2 * THREAD_REPEAT
    tid_type = {c["tid"]: c["vm_type"] for c in calls["threads"]}
    assert len(tid_type) == 2 and set(tid_type.values()) == {2, 5}
    for a in got:
        assert tid_type[a["tid"]] == a["vm_type"]
        assert all(s["vm_type"] == a["vm_type"] for s in a["steps"] if s["observed"])


def test_exporter_reason_label_rejections_api_and_latency(explained):
    prefix, _, attempts, text, rejections = explained
    rej = samples(text, "kvmtrace_vm_create_rejected_total")
    sev = frozenset({("comm", f"{prefix}-t"), ("vm_type", "2"), ("vm_type_name", "SEV"),
                     ("errno", "EINVAL"), ("reason", "type_unsupported")})
    assert rej[sev] == 1
    fd = frozenset({("comm", f"{prefix}-f"), ("vm_type", "0"), ("vm_type_name", "DEFAULT"),
                    ("errno", "EMFILE"), ("reason", "fd_exhausted")})
    assert rej[fd] == 1
    # Failed VM starts come first (none of ours: the children exit 0), then attempts.
    kinds = [r["kind"] for r in rejections]
    assert kinds == sorted(kinds, key=["start", "attempt"].index)
    rejections = [r for r in rejections if r["kind"] == "attempt"]
    ours = [r for r in rejections if r["comm"].startswith(prefix)]
    assert len(ours) == len(attempts)
    ends = [r["end_ns"] for r in rejections]
    assert ends == sorted(ends, reverse=True)  # newest first
    count = samples(text, "kvmtrace_vm_create_duration_seconds_count")
    assert count[frozenset({("outcome", "rejected")})] >= len(attempts)

