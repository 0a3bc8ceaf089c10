"""Guest-only tests: kvmtrace's kprobe paths on a real stock kernel.

Run INSIDE a stock Debian kernel booted under QEMU/TCG by tests/vm/kernel_tier.py
(`make test-kernels`), next to the privileged tier. The file name does not match
test_*.py, so `make test` on the host never collects it; run anywhere else, every test
FAILS with the reason (this tier never skips).

seedsim (tests/vm/seedsim/) is a test-only SIMULATION of the call chain of the 2023 TDX
v12 patch series, which no stock kernel carries: kvm_is_vm_type_supported() calling the
vendor callback vmx_is_vm_type_supported() (DEFAULT only) or svm_is_vm_type_supported()
-> __kvm_is_vm_type_supported() (DEFAULT and PROTECTED_VM, type 1). It is triggered by
writing a type to /sys/kernel/debug/kvmtrace_seedsim/vm_type. kvmtrace's planner picks
these module functions up by name from kallsyms, like it would on a kernel with the patch.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import HERE, KVMTRACE, unique_comm
from tests.privileged.conftest import START_TIMEOUT

pytestmark = [pytest.mark.privileged, pytest.mark.core]

VMMAKER = [sys.executable, str(HERE / "vmmaker.py")]
TRIGGER = [sys.executable, str(HERE / "vm" / "seedsim_trigger.py")]
TYPES = [0, 1, 2, 5]
REPEAT = 3
QUERIES = 2
EINVAL = 22
SEED_CHAIN = ("kvm_is_vm_type_supported", "vmx_is_vm_type_supported",
              "svm_is_vm_type_supported", "__kvm_is_vm_type_supported")
CREATE_VM = "KVM_CREATE_VM"
VM_TYPES_QUERY = "KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)"
ARCH_INIT = "kvm_arch_init_vm"
IOCTL_FUNCTION = "kvm_dev_ioctl"


def _kallsyms() -> dict[str, list[str]]:
    """Function name -> the objects defining it ("vmlinux" or a module name)."""
    out: dict[str, list[str]] = {}
    for line in Path("/proc/kallsyms").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in "tT":
            out.setdefault(parts[2], []).append(parts[3].strip("[]") if len(parts) > 3
                                                 else "vmlinux")
    return out


@pytest.fixture(scope="module", autouse=True)
def seedsim():
    """This must be a stock-kernel guest with kprobes and KVM, the simulation loaded by
    tests/vm/guest.sh before pytest started: the session's shared kvmtrace processes (and
    doctor's report) plan their points once, at their start, from kallsyms."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    if not Path("/sys/bus/event_source/devices/kprobe").exists():
        problems.append("no kprobe PMU (this host kernel has no kprobes)")
    if not Path("/dev/kvm").exists():
        problems.append("no /dev/kvm")
    if not Path("/sys/module/kvm_amd").exists() and not Path("/sys/module/kvm_intel").exists():
        problems.append("no KVM vendor module loaded")
    if not Path("/sys/module/seedsim").exists():
        problems.append("the seedsim module is not loaded (tests/vm/guest.sh loads "
                        "$KVMTRACE_SEEDSIM_KO before pytest)")
    if not Path("/sys/kernel/debug/tracing").exists() and \
            not Path("/sys/kernel/tracing/events").exists():
        problems.append("tracefs not mounted")
    if problems:
        pytest.fail("the guest tier runs only inside a stock-kernel VM (make test-kernels): "
                    + "; ".join(problems))


def test_simulated_chain_is_in_kallsyms_once_each_in_the_module():
    syms = _kallsyms()
    for name in SEED_CHAIN:
        assert syms.get(name) == ["seedsim"], (
            f"{name}: defined by {syms.get(name)}; expected only the seedsim module (a name "
            "collision makes a bare-name kprobe fail: see PLATFORM.md, 'module:NAME')")
    for name in (ARCH_INIT, IOCTL_FUNCTION):
        assert syms.get(name) == ["kvm"], f"{name}: {syms.get(name)}"


@pytest.fixture(scope="module")
def doctor(doctor_report) -> dict:
    """The session's one `doctor --json` (tests/conftest.py), planned with seedsim loaded."""
    assert doctor_report["exit_status"] == 0, doctor_report["errors"]
    return doctor_report


@pytest.fixture(scope="module")
def facts() -> dict:
    """`doctor --dump-facts` once: the evidence the readiness chains read."""
    p = subprocess.run([*KVMTRACE, "doctor", "--dump-facts"], capture_output=True, text=True,
                       timeout=START_TIMEOUT, check=False)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["evidence"]


def test_doctor_attaches_kprobes_on_every_point(doctor):
    r = doctor
    assert r["ok"] and r["attach_tested"], r["errors"]
    assert r["kprobes"]["available"] is True, r["kprobes"]
    pts = {p["probe"]: p for p in r["points"]}
    not_attached = [f"{p['probe']} ({p['detail']})" for p in r["points"]
                    if p["mechanism"] != "none" and not p["attached"]]
    assert not not_attached, f"planned but not attached on {r['kernel']}: {not_attached}"
    for name in (CREATE_VM, VM_TYPES_QUERY):
        assert (pts[name]["mechanism"], pts[name]["target"], pts[name]["attached"]) == \
            ("kprobe", IOCTL_FUNCTION, True), pts[name]
    for name in (ARCH_INIT, *SEED_CHAIN):
        assert (pts[name]["mechanism"], pts[name]["target"], pts[name]["attached"]) == \
            ("kprobe", name, True), pts[name]


def test_doctor_names_the_layer_that_says_no_to_sev(doctor, facts):
    """TCG guest, kvm_amd loaded, no SEV: DEFAULT is ready from the mask; SEV, SEV-ES and
    SNP are not applicable (a guest: the hypervisor flag) and their first check names
    what the layers read: the cpuinfo flag absent and kvm_amd's parameter off. TDX is
    Intel's. The facts dumped carry that evidence (CPUID read through the cpuid module)."""
    types = {t["name"]: t for t in doctor["readiness"]["types"]}
    assert types["DEFAULT"]["verdict"] == "ready", types["DEFAULT"]
    for name, flag, param in (("SEV", "sev", "sev"), ("SEV_ES", "sev_es", "sev_es"),
                              ("SNP", "sev_snp", "sev_snp")):
        t = types[name]
        assert (t["verdict"], t["failed_check"]) == ("not_applicable",
                                                     f"{name.lower()}.platform"), t
        ev = t["checks"][0]["evidence"]
        assert "cpuinfo: hypervisor flag (running as a guest)" in ev, ev
        assert f"cpuinfo: no {flag} flag" in ev, ev
        assert any(e.startswith(f"/sys/module/kvm_amd/parameters/{param}") for e in ev), ev
        if f"kvm_amd.{param}" in facts["params"]:  # absent when the kernel has no SEV support built
            assert f"/sys/module/kvm_amd/parameters/{param} = N" in ev, ev
    assert types["TDX"]["failed_check"] == "tdx.platform"
    assert facts["cpu_vendor"] == "AuthenticAMD" and "svm" in facts["cpu_flags"]
    assert facts["cpuid_8000001f"] is not None, facts["cpuid_error"]  # modprobe cpuid
    # QEMU's -cpu max under TCG advertises the SEV, SEV-ES and SNP bits of CPUID
    # 0x8000001F (0x21f seen on 6.12) though it emulates none of them: a guest's CPUID
    # says nothing of its host, hence N/A from the hypervisor flag, not a CPUID PASS.
    assert not [c for t in ("SEV", "SEV_ES", "SNP") for c in types[t]["checks"]
                if c["status"] == "PASS"], types["SNP"]
    assert facts["modules"] and "kvm_amd" in facts["modules"]


def test_doctor_sees_this_kernels_own_headers(doctor):
    """bcc compiles against the unpacked headers of exactly this kernel; doctor must say so."""
    release = os.uname().release
    build = Path(f"/lib/modules/{release}/build").resolve()
    uts = re.search(r'UTS_RELEASE\s+"([^"]+)"',
                    (build / "include/generated/utsrelease.h").read_text())
    assert uts and uts.group(1) == release, f"{build} is not a header tree for {release}"
    h = doctor["headers"]
    assert h["path"] == str(build), h
    assert h["matches_kernel"] and h["release"] == release, (
        f"doctor says the headers at {build} are for {h['release']!r}, but their UTS_RELEASE "
        f"is {release!r} (kvmtrace/facts.py _headers() trusts include/config/kernel.release: "
        f"{(build / 'include/config/kernel.release').read_text().strip()!r})")
    assert not [w for w in doctor["warnings"] if "headers" in w], doctor["warnings"]


# ---- the session's exporter and tracer watching real KVM and the simulation -----------

@dataclass
class Traced:
    kvm_comm: str
    seed_comm: str
    calls: list[dict]  # vmmaker's JSON lines
    seed_calls: list[dict]  # seedsim_trigger's JSON lines
    metrics: str
    events: list[dict]  # `kvmtrace trace --json` call records of the two comms

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        n = 0.0
        for fam in text_string_to_metric_families(self.metrics):
            for s in fam.samples:
                if s.name == name and want <= set(s.labels.items()):
                    n += s.value
        return n

    @property
    def kvm_types_mask(self) -> int:
        queries = [c for c in self.calls if c.get("query")]
        assert len(queries) == QUERIES and len({q["ret"] for q in queries}) == 1, queries
        return queries[0]["ret"]


@pytest.fixture(scope="module")
def traced(shared):
    """The session's `serve` and `trace --json` (tests/conftest.py: started once, after
    guest.sh loaded seedsim) watching this module's two workloads: the trace's records
    of their comms, once every call record is in, and the metrics after that."""
    serve, trace = shared.serve, shared.trace
    kvm_comm, seed_comm = unique_comm("kvmt-k"), unique_comm("kvmt-s")
    run = subprocess.run(
        [*VMMAKER, "--name", kvm_comm, "--types", ",".join(map(str, TYPES)),
         "--repeat", str(REPEAT), "--queries", str(QUERIES)],
        capture_output=True, text=True, check=True, timeout=120)
    calls = [json.loads(ln) for ln in run.stdout.splitlines()]
    seed_calls = []
    for vendor in ("vmx", "svm"):
        run = subprocess.run(
            [*TRIGGER, "--name", seed_comm, "--vendor", vendor,
             "--types", ",".join(map(str, TYPES)), "--repeat", str(REPEAT)],
            capture_output=True, text=True, check=True, timeout=120)
        seed_calls += [json.loads(ln) for ln in run.stdout.splitlines()]
    creates = len(TYPES) * REPEAT

    def calls_of(comm: str, *probes: str):
        return lambda r: r.get("comm") == comm and r.get("probe") in probes

    trace.wait(lambda r: r.get("comm") == kvm_comm and r["kind"] == "start")
    trace.wait(calls_of(kvm_comm, CREATE_VM), creates)
    trace.wait(calls_of(kvm_comm, ARCH_INIT), creates)
    trace.wait(calls_of(kvm_comm, VM_TYPES_QUERY), QUERIES)
    # Each write: the outer check and the vendor's (vmx) or two (svm).
    trace.wait(calls_of(seed_comm, *SEED_CHAIN), REPEAT * len(TYPES) * (2 + 3))
    time.sleep(2)  # the retirement pass folds the exited workload processes
    metrics = serve.metrics()
    events = [r for r in trace.records()
              if "probe" in r and r.get("comm") in (kvm_comm, seed_comm)]
    return Traced(kvm_comm, seed_comm, calls, seed_calls, metrics, events)


def _accepted(t: int, mask: int) -> bool:
    # KVM_CAP_VM_TYPES: 0 before 6.8 (unknown capability: only DEFAULT works).
    return t == 0 if mask == 0 else bool(mask >> t & 1)


def test_workload_saw_what_stock_kvm_does(traced):
    mask = traced.kvm_types_mask
    assert mask in (0, 1), f"KVM_CAP_VM_TYPES={mask:#x}: only DEFAULT expected under TCG"
    creates = [c for c in traced.calls if "vm_type" in c]
    assert len(creates) == len(TYPES) * REPEAT
    for c in creates:
        if c["vm_type"] == 0:
            assert c["ret"] >= 0, c
        else:
            assert (c["ret"], c["errno"]) == (-1, EINVAL), c


def test_every_point_is_attached_with_a_kprobe(traced):
    for probe in (CREATE_VM, VM_TYPES_QUERY, ARCH_INIT, *SEED_CHAIN):
        assert traced.total("kvmtrace_probe_attached", probe=probe, mechanism="kprobe") == 1, \
            probe


def test_the_process_following_points_attach_without_syscall_tracepoints(traced):
    """A kprobe kernel follows VMMs with kprobes and non-syscall tracepoints only."""
    for probe, mechanism in (("KVM_MEMORY_ENCRYPT_OP", "kprobe"), ("exit status", "kprobe"),
                             ("command line at exec", "kprobe"),
                             ("process exit", "tracepoint"), ("fatal signal", "tracepoint"),
                             ("sev_mem_enc_ioctl", "kprobe"), ("svm_vm_init", "kprobe")):
        assert traced.total("kvmtrace_probe_attached", probe=probe,
                            mechanism=mechanism) == 1, probe
    # svm_vm_init runs inside every KVM_CREATE_VM that passes the type check (type 0).
    assert traced.total("kvmtrace_vm_type_checks_total", probe="svm_vm_init",
                        comm=traced.kvm_comm) == REPEAT


def test_ioctl_layer_counts_are_exact(traced):
    c = traced.kvm_comm
    for t in TYPES:
        assert traced.total("kvmtrace_vm_create_attempts_total", comm=c,
                            vm_type=str(t)) == REPEAT, t
        rejected = traced.total("kvmtrace_vm_create_rejected_total", comm=c, vm_type=str(t))
        assert rejected == (0 if t == 0 else REPEAT), t
        if t:
            assert traced.total("kvmtrace_vm_create_rejected_total", comm=c, vm_type=str(t),
                                errno="EINVAL") == REPEAT, t
    assert traced.total("kvmtrace_vm_types_queries_total", comm=c) == QUERIES
    queries = [e for e in traced.events if e["probe"] == VM_TYPES_QUERY and e["comm"] == c]
    assert [q["result"] for q in queries] == [traced.kvm_types_mask] * QUERIES


def test_kvm_arch_init_vm_verdicts_are_exact(traced):
    c, mask = traced.kvm_comm, traced.kvm_types_mask
    for t in TYPES:
        checks = traced.total("kvmtrace_vm_type_checks_total", probe=ARCH_INIT, comm=c,
                              vm_type=str(t))
        rejected = traced.total("kvmtrace_vm_type_check_rejected_total", probe=ARCH_INIT,
                                comm=c, vm_type=str(t))
        assert checks == REPEAT, (t, checks)
        assert rejected == (0 if _accepted(t, mask) else REPEAT), (t, rejected)
    assert [t for t in TYPES if _accepted(t, mask)] == [0]  # types 1, 2, 5: rejected
    results = {(e["vm_type"], e["result"]) for e in traced.events
               if e["probe"] == ARCH_INIT and e["comm"] == c}
    assert results == {(0, 0), (1, -EINVAL), (2, -EINVAL), (5, -EINVAL)}


# The SIMULATED chain: what each probe must have counted for REPEAT rounds of TYPES
# with the VMX callback, then REPEAT rounds with the SVM one.
VMX_OK = {0}
SVM_OK = {0, 1}  # __kvm_is_vm_type_supported: DEFAULT and PROTECTED_VM
EXPECTED_SEED = {
    # probe: {type: (checks, rejected)}
    "kvm_is_vm_type_supported": {t: (2 * REPEAT, REPEAT * ((t not in VMX_OK) + (t not in SVM_OK)))
                                 for t in TYPES},
    "vmx_is_vm_type_supported": {t: (REPEAT, REPEAT * (t not in VMX_OK)) for t in TYPES},
    "svm_is_vm_type_supported": {t: (REPEAT, REPEAT * (t not in SVM_OK)) for t in TYPES},
    "__kvm_is_vm_type_supported": {t: (REPEAT, REPEAT * (t not in SVM_OK)) for t in TYPES},
}


def test_simulated_writes_got_the_patch_verdicts(traced):
    got = [(c["vendor"], c["vm_type"], c["ok"], c["errno"]) for c in traced.seed_calls]
    want = [(v, t, t in ok, 0 if t in ok else EINVAL)
            for v, ok in (("vmx", VMX_OK), ("svm", SVM_OK))
            for _ in range(REPEAT) for t in TYPES]
    assert got == want


def test_simulated_chain_verdicts_are_exact_per_probe_and_type(traced):
    c = traced.seed_comm
    got = {probe: {t: (traced.total("kvmtrace_vm_type_checks_total", probe=probe, comm=c,
                                    vm_type=str(t)),
                       traced.total("kvmtrace_vm_type_check_rejected_total", probe=probe,
                                    comm=c, vm_type=str(t)))
                   for t in TYPES}
           for probe in EXPECTED_SEED}
    assert got == EXPECTED_SEED


def test_simulated_chain_nests_in_call_order(traced):
    """kretprobes fire innermost first: each write shows the whole chain, in order."""
    events = [e for e in traced.events if e["comm"] == traced.seed_comm]
    assert {e["probe"] for e in events} <= set(SEED_CHAIN), "seed writes reached KVM itself?"
    want = []
    for call in traced.seed_calls:
        t, r = call["vm_type"], int(call["ok"])
        inner = (["vmx_is_vm_type_supported"] if call["vendor"] == "vmx"
                 else ["__kvm_is_vm_type_supported", "svm_is_vm_type_supported"])
        want += [(p, t, r) for p in [*inner, "kvm_is_vm_type_supported"]]
    assert [(e["probe"], e["vm_type"], e["result"]) for e in events] == want
    # Entry seen for every call, and an outer call lasts at least as long as its callee.
    i = 0
    for call in traced.seed_calls:
        n = 2 if call["vendor"] == "vmx" else 3
        durations = [e["duration_ns"] for e in events[i:i + n]]
        assert all(d > 0 for d in durations) and durations == sorted(durations), durations
        i += n


def test_real_kvm_and_the_simulation_do_not_mix(traced):
    for probe in SEED_CHAIN:
        assert traced.total("kvmtrace_vm_type_checks_total", probe=probe,
                            comm=traced.kvm_comm) == 0, probe
    for probe in (ARCH_INIT,):
        assert traced.total("kvmtrace_vm_type_checks_total", probe=probe,
                            comm=traced.seed_comm) == 0
    assert traced.total("kvmtrace_vm_create_attempts_total", comm=traced.seed_comm) == 0


def test_no_loss(traced):
    for name in ("kvmtrace_events_lost_total", "kvmtrace_counts_dropped_total",
                 "kvmtrace_calls_dropped_total", "kvmtrace_decode_errors_total"):
        assert traced.total(name) == 0, name
