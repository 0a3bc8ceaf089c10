"""The planner is pure: hand it the facts of other kernels, check the plan."""

import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmtrace import contract, facts
from kvmtrace import plan as planmod
from kvmtrace.facts import Symbol, read_kallsyms
from tests.conftest import with_follow_points


def by_name(plan):
    return {p.name: p for p in plan.points}


def test_this_host_uses_syscall_tracepoints_and_names_every_missing_point(kernel_facts):
    plan = planmod.make_plan(kernel_facts("firecracker-6.18-no-kprobes"))
    pts = by_name(plan)
    assert [p.name for p in plan.points] == [
        "KVM_CREATE_VM", "KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)", "kvm_arch_init_vm",
        "KVM_MEMORY_ENCRYPT_OP", "process exit", "exit status", "fatal signal",
        "command line at exec", "failed KVM ioctl", "first KVM_RUN", "KVM_GET_API_VERSION",
        "VMM stderr (fd 2)", "kvm_is_vm_type_supported", "vmx_is_vm_type_supported",
        "svm_is_vm_type_supported",
        *facts.LAUNCH_FUNCTIONS]
    assert pts["KVM_CREATE_VM"].mechanism == planmod.Mechanism.TRACEPOINT
    assert pts["KVM_CREATE_VM"].target == "syscalls:sys_enter_ioctl+syscalls:sys_exit_ioctl"
    assert "CONFIG_KPROBES" in pts["KVM_CREATE_VM"].reason
    init = pts["kvm_arch_init_vm"]
    assert init.mechanism is None
    assert "CONFIG_KPROBES" in init.reason and "EPERM" in init.reason
    for name in ("kvm_is_vm_type_supported", "vmx_is_vm_type_supported"):
        assert pts[name].mechanism is None
        assert "absent from kallsyms" in pts[name].reason


def test_the_vmms_stderr_is_read_in_the_kernel_only_with_btf_offsets(kernel_facts):
    """No offsets (no BTF, or a member missing): the point says why and where the words
    come from instead; with them it rides the ioctl layer and the plan carries them."""
    base = with_follow_points(kernel_facts("firecracker-6.18-no-kprobes"))
    none = dataclasses.replace(base, stderr_offsets=None,
                               stderr_offsets_error="no BTF at /sys/kernel/btf/vmlinux")
    plan = planmod.make_plan(none)
    point = by_name(plan)["VMM stderr (fd 2)"]
    assert point.mechanism is None and point.optional and not plan.offsets
    assert point.reason.startswith("no BTF at /sys/kernel/btf/vmlinux; resolved from /proc")
    offsets = {k: 8 * i for i, k in enumerate(contract.STDERR_FIELDS)}
    plan = planmod.make_plan(dataclasses.replace(base, stderr_offsets=offsets))
    point = by_name(plan)["VMM stderr (fd 2)"]
    assert point.mechanism == planmod.Mechanism.TRACEPOINT
    assert point.target == by_name(plan)["KVM_CREATE_VM"].target
    assert dict(plan.offsets) == offsets


def test_debian_61_uses_kprobes_on_kvm_dev_ioctl_and_arch_init(kernel_facts):
    pts = by_name(planmod.make_plan(kernel_facts("debian-6.1-kprobes")))
    assert pts["KVM_CREATE_VM"].mechanism == planmod.Mechanism.KPROBE
    assert pts["KVM_CREATE_VM"].target == "kvm_dev_ioctl"
    assert pts["KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)"].target == "kvm_dev_ioctl"
    assert pts["kvm_arch_init_vm"].mechanism == planmod.Mechanism.KPROBE
    assert pts["vmx_is_vm_type_supported"].mechanism is None


def test_seed_patch_kernel_probes_the_whole_chain_including_found_callbacks(kernel_facts):
    plan = planmod.make_plan(kernel_facts("seed-tdx-v12-kprobes"))
    pts = by_name(plan)
    for name in ("kvm_arch_init_vm", "kvm_is_vm_type_supported", "vmx_is_vm_type_supported",
                 "__kvm_is_vm_type_supported"):
        assert pts[name].mechanism == planmod.Mechanism.KPROBE, name
        assert pts[name].returns == (planmod.RETURNS_INT if name == "kvm_arch_init_vm"
                                     else planmod.RETURNS_BOOL)
    # svm is absent (kvm_intel host) and reported, not dropped.
    assert pts["svm_is_vm_type_supported"].mechanism is None
    ids = [p.id for p in plan.points]
    assert ids == list(range(len(ids)))


def test_fentry_when_kprobes_missing_but_tracing_programs_load(kernel_facts):
    pts = by_name(planmod.make_plan(kernel_facts("fentry-only-constructed")))
    assert pts["KVM_CREATE_VM"].mechanism == planmod.Mechanism.FENTRY
    assert pts["kvm_arch_init_vm"].mechanism is None  # not in available_filter_functions
    assert "notrace" in pts["kvm_arch_init_vm"].reason
    svm = pts["svm_is_vm_type_supported"]
    assert svm.mechanism is None and "module" in svm.reason and "kvm_amd" in svm.reason


def test_no_tracefs_and_no_kprobes_leaves_ioctl_layer_unplanned(kernel_facts):
    facts = dataclasses.replace(kernel_facts("firecracker-6.18-no-kprobes"),
                                tracefs=None, tracepoints=[])
    plan = planmod.make_plan(facts)
    assert plan.ioctl_mechanism is None
    assert "tracefs not mounted" in plan.points[0].reason
    assert len(plan.missing) == len(plan.points)


def test_kprobe_blacklist_and_compiler_clones_are_reported(kernel_facts):
    facts = kernel_facts("seed-tdx-v12-kprobes")
    syms = dict(facts.symbols)
    del syms["kvm_is_vm_type_supported"]
    facts = dataclasses.replace(facts, symbols=syms, kprobe_blacklist=["kvm_arch_init_vm"],
                                clones={"kvm_is_vm_type_supported":
                                        ["kvm_is_vm_type_supported.isra.0"]})
    pts = by_name(planmod.make_plan(facts))
    assert pts["kvm_arch_init_vm"].mechanism is None
    assert "blacklist" in pts["kvm_arch_init_vm"].reason
    assert "kvm_is_vm_type_supported.isra.0" in pts["kvm_is_vm_type_supported"].reason


def test_plan_is_a_pure_function_of_the_facts(kernel_facts):
    facts = kernel_facts("seed-tdx-v12-kprobes")
    assert planmod.make_plan(facts) == planmod.make_plan(facts)


def test_facts_round_trip_through_json(kernel_facts):
    from kvmtrace.facts import HostFacts

    facts = kernel_facts("seed-tdx-v12-kprobes")
    assert HostFacts.from_json(facts.to_json()) == facts


def test_read_kallsyms_keeps_relevant_names_modules_and_clones():
    text = "\n".join([
        "ffffffff81284030 t kvm_dev_ioctl",
        "ffffffff812011a5 t kvm_dev_ioctl.cold",
        "ffffffffc0a00000 t vmx_is_vm_type_supported\t[kvm_intel]",
        "ffffffffc0a00100 t tdx_is_vm_type_supported\t[kvm_intel]",
        "ffffffffc0b00000 t kvm_is_vm_type_supported.isra.0\t[kvm]",
        "ffffffffc0a00000 t __pfx_vmx_is_vm_type_supported\t[kvm_intel]",
        "ffffffffc0a00000 t __cfi_vmx_is_vm_type_supported\t[kvm_intel]",
        "ffffffff81284020 t __pfx_kvm_dev_ioctl",
        "ffffffff81000000 T unrelated_function",
        "ffffffff81000000 d kvm_arch_init_vm_data",
    ])
    symbols, clones = read_kallsyms(text)
    assert symbols == {
        "kvm_dev_ioctl": Symbol("kvm_dev_ioctl", None),
        "vmx_is_vm_type_supported": Symbol("vmx_is_vm_type_supported", "kvm_intel"),
        "tdx_is_vm_type_supported": Symbol("tdx_is_vm_type_supported", "kvm_intel"),
    }
    assert clones == {"kvm_is_vm_type_supported": ["kvm_is_vm_type_supported.isra.0"]}


def _kallsyms_line_by_line(text: str) -> tuple[dict, dict]:
    """The specification read_kallsyms is held to: every line split, as it was read
    before one regex picked the candidates (kept here, written for clarity, not speed)."""
    wanted = {facts.IOCTL_FUNCTION, facts.ARCH_INIT_FUNCTION, *facts.TYPE_CHECK_FUNCTIONS,
              facts.GROUP_EXIT_FUNCTION, *facts.VM_IOCTL_FUNCTIONS, facts.VCPU_IOCTL_FUNCTION,
              *facts.LAUNCH_FUNCTIONS, *facts.EXEC_FUNCTIONS}
    symbols: dict = {}
    clones: dict = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[1] not in "tTwW" or parts[2].startswith(("__pfx_", "__cfi_")):
            continue
        name, module = parts[2], parts[3].strip("[]") if len(parts) > 3 else None
        clone = re.match(r"^(?P<base>[^.]+)\.(?:isra|constprop|part|cold|lto_priv)(?:\.\d+)*$",
                         name)
        base = clone.group("base") if clone else name
        if base not in wanted and not re.match(r"^\w+_is_vm_type_supported$", base):
            continue
        if clone:
            if not name.endswith(".cold"):
                clones.setdefault(base, []).append(name)
        else:
            symbols.setdefault(name, Symbol(name, module))
    return symbols, clones


def _kallsyms_line(addr: str, kind: str, pre: str, base: str, suf: str, mod: str,
                   sep: str) -> str:
    return f"{addr} {kind} {pre}{base}{suf}{sep}{mod}"


_KALLSYMS_LINE = st.builds(
    _kallsyms_line,
    st.sampled_from(["ffffffff81284030", "0000000000000000"]),
    st.sampled_from(list("tTwWdDbr")),
    st.sampled_from(["", "", "__pfx_", "__cfi_", "x"]),
    st.sampled_from(["kvm_dev_ioctl", "kvm_arch_init_vm", "do_exit", "svm_vm_init",
                     "kvm_vm_ioctl", "tdx_is_vm_type_supported", "_is_vm_type_supported",
                     "kvm_is_vm_type_supported", "unrelated", "kvm_dev_ioctl_x"]),
    st.sampled_from(["", "", ".isra.0", ".cold", ".constprop.0.isra.1", ".llvm.1234", ".part",
                     "X", "$x"]),
    st.sampled_from(["", "[kvm]", "[kvm_amd]", "[bpf]"]),
    st.sampled_from(["\t", " ", "\t  "]))


@given(st.lists(_KALLSYMS_LINE, max_size=30))
def test_read_kallsyms_keeps_what_reading_every_line_would(lines):
    text = "\n".join(lines)
    assert read_kallsyms(text) == _kallsyms_line_by_line(text)


def test_any_other_is_vm_type_supported_callback_is_planned(kernel_facts):
    facts = kernel_facts("seed-tdx-v12-kprobes")
    syms = {**facts.symbols,
            "tdx_is_vm_type_supported": Symbol("tdx_is_vm_type_supported", "kvm_intel")}
    pts = by_name(planmod.make_plan(dataclasses.replace(facts, symbols=syms)))
    assert pts["tdx_is_vm_type_supported"].mechanism == planmod.Mechanism.KPROBE


CAPTURED = sorted(p.stem for p in (Path(__file__).parent / "kernels").glob("*-guest-captured.json"))


@pytest.mark.parametrize("name", CAPTURED)
def test_stock_debian_kernels_captured_in_the_kernel_tier_plan_kprobes(kernel_facts, name):
    """`kvmtrace doctor --dump-facts` of each stock kernel the kernel tier booted: the
    ioctl layer and kvm_arch_init_vm by kprobe, the 2023 callbacks reported absent."""
    pts = by_name(planmod.make_plan(kernel_facts(name)))
    for point in ("KVM_CREATE_VM", "KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)"):
        assert (pts[point].mechanism, pts[point].target) == (planmod.Mechanism.KPROBE,
                                                             "kvm_dev_ioctl")
    assert pts["kvm_arch_init_vm"].mechanism == planmod.Mechanism.KPROBE
    for fn in ("kvm_is_vm_type_supported", "vmx_is_vm_type_supported",
               "svm_is_vm_type_supported"):
        assert pts[fn].mechanism is None and "absent from kallsyms" in pts[fn].reason


def test_without_tracefs_nothing_is_compiled_and_the_fix_is_named(kernel_facts):
    """No kprobes, no fentry and tracefs not mounted: the loader does not hand bcc a
    program with nothing to attach (bcc said only 'Failed to compile BPF module')."""
    from kvmtrace import loader

    facts = dataclasses.replace(kernel_facts("firecracker-6.18-no-kprobes"), tracefs=None,
                                tracepoints=[])
    plan = planmod.make_plan(facts)
    problem = loader.preflight(facts, plan)
    assert problem and problem.startswith("no probe point can attach here")
    assert "tracefs not mounted (mount -t tracefs nodev /sys/kernel/tracing)" in problem
    unreadable = dataclasses.replace(facts, tracefs_error="/sys/kernel/debug/tracing is not "
                                     "readable: permission denied")
    assert "permission denied" in loader.preflight(unreadable, planmod.make_plan(unreadable))
    assert loader.preflight(kernel_facts("firecracker-6.18-no-kprobes"),
                            planmod.make_plan(kernel_facts("firecracker-6.18-no-kprobes"))) \
        is None


def test_following_processes_on_a_kprobe_host_stays_off_the_syscall_tracepoints(kernel_facts):
    """A kprobe host: the exit status from do_exit, KVM_MEMORY_ENCRYPT_OP from
    kvm_arch_*_ioctl and argv from the execve syscall's entry, all kprobes: no syscall
    tracepoint (each would put every syscall on the slow path)."""
    f = with_follow_points(kernel_facts("seed-tdx-v12-kprobes"))
    pts = by_name(planmod.make_plan(f))
    assert pts["KVM_CREATE_VM"].mechanism == planmod.Mechanism.KPROBE
    assert (pts["process exit"].mechanism, pts["process exit"].target) == \
        (planmod.Mechanism.TRACEPOINT, "sched:sched_process_exit")
    assert (pts["exit status"].mechanism, pts["exit status"].target) == \
        (planmod.Mechanism.KPROBE, "do_exit")
    assert (pts["KVM_MEMORY_ENCRYPT_OP"].mechanism, pts["KVM_MEMORY_ENCRYPT_OP"].target) == \
        (planmod.Mechanism.KPROBE, "kvm_vm_ioctl+kvm_arch_vcpu_ioctl")
    # A start's failed KVM ioctls share those kprobes; its first KVM_RUN is kvm's own
    # tracepoint (no syscall tracepoint either).
    assert (pts["failed KVM ioctl"].mechanism, pts["failed KVM ioctl"].target) == \
        (planmod.Mechanism.KPROBE, "kvm_vm_ioctl+kvm_arch_vcpu_ioctl")
    assert "every VM ioctl" in pts["failed KVM ioctl"].reason
    assert (pts["first KVM_RUN"].mechanism, pts["first KVM_RUN"].target) == \
        (planmod.Mechanism.TRACEPOINT, "kvm:kvm_userspace_exit")
    # Without kvm_vm_ioctl: kvm_arch_vm_ioctl, and the reason says what is not seen.
    old = dataclasses.replace(f, symbols={n: s for n, s in f.symbols.items()
                                          if n != "kvm_vm_ioctl"})
    calls = by_name(planmod.make_plan(old))["failed KVM ioctl"]
    assert calls.target == "kvm_arch_vm_ioctl+kvm_arch_vcpu_ioctl"
    assert "the architecture's VM ioctls only (kvm_vm_ioctl is absent)" in calls.reason
    assert (pts["command line at exec"].mechanism, pts["command line at exec"].target) == \
        (planmod.Mechanism.KPROBE, "__x64_sys_execve+__x64_sys_execveat")
    no_entry = dataclasses.replace(f, symbols={
        n: s for n, s in f.symbols.items() if "_sys_execve" not in n})
    exec_point = by_name(planmod.make_plan(no_entry))["command line at exec"]
    assert exec_point.mechanism is None and "slow path" in exec_point.reason
    assert pts["sev_mem_enc_ioctl"].mechanism == planmod.Mechanism.KPROBE
    assert pts["snp_launch_start"].mechanism is None
    assert "absent from kallsyms" in pts["snp_launch_start"].reason


def test_without_sched_process_exit_nothing_is_followed_and_each_point_says_why(kernel_facts):
    f = kernel_facts("firecracker-6.18-no-kprobes")  # captured before these points existed
    pts = by_name(planmod.make_plan(f))
    assert pts["process exit"].mechanism is None
    assert "sched:sched_process_exit missing" in pts["process exit"].reason
    for name in ("exit status", "fatal signal", "KVM_MEMORY_ENCRYPT_OP", "failed KVM ioctl",
                 "first KVM_RUN"):
        assert pts[name].mechanism is None and "needs process exit" in pts[name].reason


def test_this_host_follows_processes_on_the_syscall_tracepoints(kernel_facts):
    f = kernel_facts("firecracker-6.18-no-kprobes")
    f = dataclasses.replace(f, tracepoints=[*f.tracepoints, *facts.FOLLOW_TRACEPOINTS])
    pts = by_name(planmod.make_plan(f))
    for name, target in (("process exit", "sched:sched_process_exit"),
                         ("exit status", "syscalls:sys_enter_exit_group"),
                         ("fatal signal", "signal:signal_deliver"),
                         ("command line at exec",
                          "syscalls:sys_enter_execve+syscalls:sys_enter_execveat"),
                         ("KVM_MEMORY_ENCRYPT_OP",
                          "syscalls:sys_enter_ioctl+syscalls:sys_exit_ioctl")):
        assert (pts[name].mechanism, pts[name].target) == (planmod.Mechanism.TRACEPOINT,
                                                           target), name


def test_a_launch_function_left_only_as_a_clone_that_keeps_its_return_is_traced(kernel_facts):
    f = with_follow_points(kernel_facts("seed-tdx-v12-kprobes"))
    f = dataclasses.replace(f, clones={**f.clones, "snp_launch_start": [
        "snp_launch_start.constprop.0"], "tdx_td_init": ["tdx_td_init.part.0"]})
    pts = by_name(planmod.make_plan(f))
    snp = pts["snp_launch_start"]
    assert (snp.mechanism, snp.target) == (planmod.Mechanism.KPROBE,
                                           "snp_launch_start.constprop.0")
    assert "compiler clone" in snp.reason
    td = pts["tdx_td_init"]  # a .part clone is only a part of the function: not traced
    assert td.mechanism is None and "tdx_td_init.part.0" in td.reason


def test_a_starts_calls_ride_on_the_ioctl_tracepoints_and_its_first_run_on_kvms(kernel_facts):
    """A syscall-tracepoint host (this one): the failed KVM ioctls of a start come from
    the ioctl tracepoints already attached (the loader attaches them once), the first
    KVM_RUN from kvm:kvm_userspace_exit; without that tracepoint (kvm.ko not loaded)
    the point is reported missing by name."""
    f = with_follow_points(kernel_facts("firecracker-6.18-no-kprobes"))
    pts = by_name(planmod.make_plan(f))
    ioctl = pts["KVM_CREATE_VM"]
    calls, run = pts["failed KVM ioctl"], pts["first KVM_RUN"]
    assert (calls.mechanism, calls.target) == (ioctl.mechanism, ioctl.target)
    assert calls.layer == run.layer == planmod.Layer.START
    assert (run.mechanism, run.target) == (planmod.Mechanism.TRACEPOINT,
                                           "kvm:kvm_userspace_exit")
    no_kvm = dataclasses.replace(f, tracepoints=[t for t in f.tracepoints
                                                 if not t.startswith("kvm:")])
    run = by_name(planmod.make_plan(no_kvm))["first KVM_RUN"]
    assert run.mechanism is None and run.reason == "tracepoint kvm:kvm_userspace_exit missing"
