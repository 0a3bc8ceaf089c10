"""serve --metrics.labels: the per-process families and the failed starts by owner (vm,
unit, pod, namespace), under the same series budget as comm, folds counted. Pure: a
recorded source, and cgroup paths and command lines handed in (paths shaped like
tests/test_owners.py's published ones, built by hand here). The privileged tier runs the
real thing (tests/privileged/test_privileged_owners.py)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from kvmtrace import contract, vmm
from kvmtrace import plan as planmod
from kvmtrace.aggregate import Aggregator, NameBudget
from kvmtrace.catalogue import family
from kvmtrace.collector import KvmtraceCollector
from kvmtrace.decode import Decoder
from kvmtrace.families import label_names
from kvmtrace.kvmdev import KvmInfo
from kvmtrace.plan import Attachment
from kvmtrace.runtime import Runtime
from tests.recorded import RecordedSource

C = contract
ALL = ("vm", "unit", "pod", "namespace")
POD = "1e597579-417e-482f-bf65-5fe170c3aebd"
CTR = "ab" * 32
# Built by hand, in the shapes of tests/test_owners.py's published paths.
LIBVIRT = "/machine.slice/machine-qemu\\x2d3\\x2dweb\\x2d1.scope/libvirt/emulator"
LAUNCHER = (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{POD.replace('-', '_')}.slice/cri-containerd-{CTR}.scope")
SERVICE = "/system.slice/fc-vm.service"
SNP_ARGV = ["qemu-system-x86_64", "-accel", "kvm", "-machine",
            "q35,confidential-guest-support=cgs0", "-object",
            "sev-snp-guest,id=cgs0,cbitpos=51,reduced-phys-bits=1"]


def make(kernel_facts, raws, cgroups, names=None, live=(), labels=ALL, max_series=10_000):
    """A runtime over ``raws`` whose processes are in ``cgroups`` (pid -> path) and whose
    command lines name VM ``names`` (pid -> name), and its collector's registry."""
    names = names or {}
    plan = planmod.make_plan(kernel_facts("seed-tdx-v12-kprobes"))
    source = RecordedSource(raws)

    def request(pid):
        argv = [*SNP_ARGV, *(["-name", f"guest={names[pid]}"] if pid in names else [])]
        return vmm.parse_argv(argv)

    rt = Runtime(source, Decoder(plan, "x86_64"), Aggregator(NameBudget(max_series)),
                 live_pids=lambda: set(live), request=request,
                 resolve_stderr=lambda pid, hold: "none",
                 cgroup_of=lambda pid, cid: cgroups.get(pid), owner_labels=labels)
    reg = CollectorRegistry()
    reg.register(KvmtraceCollector(
        rt, [Attachment(p, True) for p in plan.points], lambda: KvmInfo(True, 12, 0x1),
        "x86_64", {"version": "t", "bcc_version": "x", "kernel": "k"}, owner_labels=labels))
    return reg, rt, source


def series(reg, name: str) -> dict[tuple, float]:
    """``name``'s samples: (comm, vm, unit, pod, namespace, ...the rest) -> value."""
    out = {}
    for fam in reg.collect():
        for s in fam.samples:
            if s.name == name:
                head = tuple(s.labels.get(k, "-") for k in ("comm", *ALL))
                rest = tuple(v for k, v in sorted(s.labels.items()) if k not in ("comm", *ALL))
                out[head + rest] = s.value
    return out


def create(pid, comm, vm_type=0, result=0, count=1):
    return (pid, C.PROBE_CREATE_VM, vm_type, result, 0, 0, comm, count)


def test_each_live_process_is_exported_under_its_owner(kernel_facts):
    raws = [create(10, b"qemu-system-x86", count=2), create(11, b"qemu-system-x86"),
            create(12, b"qemu-system-x86", 2, -22), create(13, b"firecracker"),
            create(14, b"qemu-system-x86")]
    reg, _, _ = make(kernel_facts, raws, {10: LIBVIRT, 11: LAUNCHER, 12: LAUNCHER,
                                          13: SERVICE},
                     names={10: "web-1", 11: "prod_db", 14: "plain"}, live={10, 11, 12, 13, 14})
    got = series(reg, "kvmtrace_vm_create_attempts_total")
    assert got == {
        # libvirt's domain from the scope (its \x2d undone), and the scope as the unit
        ("qemu-system-x86", "web-1", "machine-qemu-3-web-1.scope", "", "", "0", "DEFAULT"): 2,
        # a virt-launcher pod: KubeVirt's namespace and VM from -name guest=NS_NAME
        ("qemu-system-x86", "db", f"cri-containerd-{CTR}.scope", POD, "prod", "0",
         "DEFAULT"): 1,
        # the same pod, a process whose command line names no VM
        ("qemu-system-x86", "", f"cri-containerd-{CTR}.scope", POD, "", "2", "SEV"): 1,
        ("firecracker", "", "fc-vm.service", "", "", "0", "DEFAULT"): 1,
        # no cgroup known: the command line's name only
        ("qemu-system-x86", "plain", "", "", "", "0", "DEFAULT"): 1,
    }
    (rejected,) = series(reg, "kvmtrace_vm_create_rejected_total")
    assert rejected[:5] == ("qemu-system-x86", "", f"cri-containerd-{CTR}.scope", POD, "")


def test_a_process_gone_before_any_scrape_keeps_its_owner(kernel_facts):
    """Retired before the first scrape (the kernel's cgroup id resolved to its path):
    the exited residual carries its owner labels, and its failed start too."""
    raws = [(20, C.PROBE_VM_TYPES_QUERY, 0, 1, 0, 0, b"qemu-a", 1),
            (20, C.PROBE_PROCESS_END, 1, 256, C.PROC_QUERIED | C.PROC_EXIT_CODE, 0,
             b"qemu-a", 1)]
    reg, rt, source = make(kernel_facts, raws, {20: LIBVIRT}, names={20: "web-1"},
                           labels=("vm", "pod"))
    assert rt.retire_exited() == 2 and source.raws == []
    assert series(reg, "kvmtrace_vm_types_queries_total") == {
        ("qemu-a", "web-1", "-", "", "-"): 1}
    assert series(reg, "kvmtrace_vm_start_failures_total") == {
        ("qemu-a", "web-1", "-", "", "-", "type_not_offered", "vmm_refused_type", "SNP",
         "before_create"): 1}


def test_an_owner_is_fixed_once_asked_for(kernel_facts):
    """A process's series never moves between label sets: its owner as first seen."""
    cgroups = {30: SERVICE}
    reg, _, source = make(kernel_facts, [create(30, b"vmm")], cgroups, live={30})
    assert list(series(reg, "kvmtrace_vm_create_attempts_total")) == [
        ("vmm", "", "fc-vm.service", "", "", "0", "DEFAULT")]
    cgroups[30] = LIBVIRT  # moved (systemd-run --scope, a re-parented cgroup)
    source.raws = [create(30, b"vmm", count=5)]
    assert series(reg, "kvmtrace_vm_create_attempts_total") == {
        ("vmm", "", "fc-vm.service", "", "", "0", "DEFAULT"): 5}


def test_owners_past_the_series_budget_fold_into_other_and_are_counted(kernel_facts):
    """One comm in 40 VMs, each one rejected create (2 samples), a budget of 20 samples:
    10 VMs get series of their own, 30 fold into comm="other" with empty owner labels,
    the fold counted per (name, owner); sums stay exact, also once they exit."""
    raws = [create(100 + i, b"qemu-system-x86", 2, -22, 3) for i in range(40)]
    cgroups = {100 + i: LIBVIRT.replace("web\\x2d1", f"vm{i:02d}") for i in range(40)}
    live = set(cgroups)
    reg, rt, _ = make(kernel_facts, raws, cgroups, live=live, max_series=20)
    got = series(reg, "kvmtrace_vm_create_attempts_total")
    assert sum(got.values()) == 120
    own = [k for k in got if k[0] != "other"]
    assert len(own) == 10 and all(k[1].startswith("vm") for k in own)
    assert got[("other", "", "", "", "", "2", "SEV")] == 90
    assert reg.get_sample_value("kvmtrace_names_folded_total") == 30
    live.clear()
    assert rt.retire_exited() == 40
    assert series(reg, "kvmtrace_vm_create_attempts_total") == got


def test_the_owner_labels_follow_comm_and_pid_in_their_families():
    attempts, failures = family("kvmtrace_vm_create_attempts"), family(
        "kvmtrace_vm_start_failures")
    assert label_names(attempts, True, ("vm", "pod")) == (
        "comm", "pid", "vm", "pod", "vm_type", "vm_type_name")
    assert label_names(failures, True, ("unit",)) == (
        "comm", "unit", "stage", "reason", "cause", "requested_type")
    assert label_names(family("kvmtrace_probe_calls"), True, ALL) == family(
        "kvmtrace_probe_calls").labels
    assert label_names(attempts) == attempts.labels


@pytest.mark.parametrize("labels", [(), ("vm",)])
def test_without_owner_labels_no_cgroup_is_asked_for(kernel_facts, labels):
    """The default costs nothing: no process's owner is looked up for the metrics."""
    asked = []
    reg, rt, _ = make(kernel_facts, [create(40, b"vmm")], {}, live={40}, labels=labels)
    rt._cgroup_of = lambda pid, cid: asked.append(pid)
    series(reg, "kvmtrace_vm_create_attempts_total")
    assert asked == ([40] if labels else [])


def test_a_pid_used_again_after_its_process_exited_gets_its_new_owner(kernel_facts):
    cgroups = {50: SERVICE}
    live = {50}
    reg, rt, source = make(kernel_facts, [create(50, b"vmm")], cgroups, live=live)
    series(reg, "kvmtrace_vm_create_attempts_total")
    live.clear()
    assert rt.retire_exited() == 1
    cgroups[50] = LIBVIRT  # the pid wrapped around: another process, another VM
    live.add(50)
    source.raws = [create(50, b"vmm")]
    assert series(reg, "kvmtrace_vm_create_attempts_total") == {
        ("vmm", "", "fc-vm.service", "", "", "0", "DEFAULT"): 1,
        ("vmm", "web-1", "machine-qemu-3-web-1.scope", "", "", "0", "DEFAULT"): 1}
