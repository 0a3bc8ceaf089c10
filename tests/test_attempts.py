"""The classifier and the stitcher over recorded chains (pure)."""

import pytest

from kvmtrace import attempts as at
from kvmtrace import plan as planmod
from kvmtrace.contract import (
    EVENT,
    VERDICT_ARCH_INIT_FAILED,
    VERDICT_ARCH_INIT_SEEN,
    VERDICT_TYPE_CHECK_REJECTED,
    VERDICT_TYPE_CHECK_SEEN,
)
from kvmtrace.decode import Decoder
from kvmtrace.plan import Attachment

SEED = "seed-tdx-v12-kprobes"
HOST = "firecracker-6.18-no-kprobes"
REJECTED_CHAIN = (VERDICT_TYPE_CHECK_SEEN | VERDICT_TYPE_CHECK_REJECTED | VERDICT_ARCH_INIT_SEEN
                  | VERDICT_ARCH_INIT_FAILED)


class Kernel:
    """Builds the events a kernel with ``facts`` would emit, through the real decoder."""

    def __init__(self, kernel_facts, name, host_mask=0x1, vendor=("kvm_intel",)):
        self.plan = planmod.make_plan(kernel_facts(name))
        self.decoder = Decoder(self.plan, "x86_64")
        self.ids = {p.name: p.id for p in self.plan.points}
        atts = [Attachment(p, p.mechanism is not None) for p in self.plan.points]
        self.stitcher = at.Stitcher(atts, "x86_64", host_mask=host_mask, vendor_modules=vendor)

    def ev(self, probe, vm_type, result, ts, dur, tid=500, pid=500, comm=b"qemu-system-x86",
           verdicts=0):
        raw = EVENT.pack(ts, dur, vm_type, result, pid, tid, self.ids[probe], verdicts, 0,
                         2**32 - 1, 0, comm)
        return self.decoder.event(raw)

    def feed(self, *events):
        out = []
        for e in events:
            out.extend(self.stitcher.feed(e))
        return out


def seed_chain(k, vm_type, tid=500, t0=1_000_000, verdict=False):
    """Returns in kernel order: vmx (innermost) → kvm_is → kvm_arch_init_vm → ioctl."""
    ok = int(verdict)
    return [
        k.ev("vmx_is_vm_type_supported", vm_type, ok, t0 + 400, 100, tid),
        k.ev("kvm_is_vm_type_supported", vm_type, ok, t0 + 500, 300, tid),
        k.ev("kvm_arch_init_vm", vm_type, 0 if verdict else -22, t0 + 900, 800, tid),
        k.ev("KVM_CREATE_VM", vm_type, 7 if verdict else -22, t0 + 1000, 1000, tid,
             verdicts=0 if verdict else REJECTED_CHAIN),
    ]


def test_seed_chain_rejection_names_every_layer_innermost_last(kernel_facts):
    k = Kernel(kernel_facts, SEED)
    [a] = k.feed(*seed_chain(k, 5))
    assert (a.rejected, a.reason, a.errno, a.vm_type_name) == (True, "type_unsupported",
                                                               "EINVAL", "TDX")
    assert a.basis.startswith("observed")
    assert a.latency_ns == 1000
    assert ("KVM rejected it in kvm_arch_init_vm → kvm_is_vm_type_supported → "
            "vmx_is_vm_type_supported → EINVAL") in a.explanation
    assert "asked for VM type 5 (TDX" in a.explanation
    assert "supports only DEFAULT (KVM_CAP_VM_TYPES=0x1)" in a.explanation
    assert "kvm_intel" in a.hint and "tdx=1" in a.hint
    steps = {s.probe: s for s in a.steps}
    assert steps["vmx_is_vm_type_supported"].rejected is True
    assert steps["kvm_arch_init_vm"].result == -22
    # svm is absent on this kernel: reported unobserved with its reason, not invented.
    assert steps["svm_is_vm_type_supported"].observed is False
    assert "absent" in steps["svm_is_vm_type_supported"].note


def test_accepted_attempt_has_no_reason(kernel_facts):
    k = Kernel(kernel_facts, SEED)
    [a] = k.feed(*seed_chain(k, 0, verdict=True))
    assert not a.rejected and a.reason is None and a.explanation is None


@pytest.mark.parametrize(("vm_type", "name", "hint_word"), [
    (2, "SEV", "kvm_amd"), (3, "SEV_ES", "kvm_amd"), (4, "SNP", "kvm_amd"),
    (1, "SW_PROTECTED", "CONFIG_KVM_SW_PROTECTED_VM"), (99, "unknown:99", "VMM"),
])
def test_host_mask_alone_classifies_without_function_probes(kernel_facts, vm_type, name,
                                                            hint_word):
    k = Kernel(kernel_facts, HOST, vendor=())
    [a] = k.feed(k.ev("KVM_CREATE_VM", vm_type, -22, 10_000, 2_000))
    assert a.reason == "type_unsupported"
    assert "KVM_CAP_VM_TYPES mask 0x1" in a.basis
    assert a.vm_type_name == name and hint_word in a.hint
    assert "not observable here: kvm_arch_init_vm" in a.explanation
    unobserved = [s for s in a.steps if not s.observed]
    assert {s.probe for s in unobserved} >= {"kvm_arch_init_vm", "vmx_is_vm_type_supported"}


def test_sev_on_an_intel_host_says_so(kernel_facts):
    k = Kernel(kernel_facts, SEED, vendor=("kvm_intel",))
    [a] = k.feed(*seed_chain(k, 2))
    assert a.hint.startswith("this host runs kvm_intel, not kvm_amd: SEV cannot work here")


@pytest.mark.parametrize(("errno", "reason"), [
    (24, "fd_exhausted"), (23, "fd_exhausted"), (12, "no_memory"),
    (16, "virtualization_busy"), (4, "interrupted"), (1, "other"),
])
def test_errno_reasons(kernel_facts, errno, reason):
    k = Kernel(kernel_facts, HOST)
    [a] = k.feed(k.ev("KVM_CREATE_VM", 0, -errno, 10_000, 2_000))
    assert a.reason == reason and a.hint == at.hint(reason, "DEFAULT")


def test_supported_type_failing_in_arch_init_is_arch_init_failed():
    c = at.classify("EINVAL", 0, VERDICT_ARCH_INIT_SEEN | VERDICT_ARCH_INIT_FAILED, 0x1)
    assert c.reason == "arch_init_failed" and c.basis.startswith("observed")
    assert at.classify("EINVAL", 0, 0, 0x1).reason == "other"
    assert at.classify("EINVAL", 0, 0, None).reason == "other"


def test_pre_68_kernel_without_the_cap_supports_only_default():
    # KVM_CHECK_EXTENSION returns 0 for a capability the kernel does not know.
    assert at.supported_types(0) == [0]
    assert at.classify("EINVAL", 2, 0, 0).reason == "type_unsupported"


def test_two_threads_interleaved_get_their_own_chains(kernel_facts):
    k = Kernel(kernel_facts, SEED)
    a_chain = seed_chain(k, 2, tid=601, t0=1_000_000)
    b_chain = seed_chain(k, 5, tid=602, t0=1_000_050)
    interleaved = [x for pair in zip(a_chain, b_chain, strict=True) for x in pair]
    done = k.feed(*interleaved)
    assert [(a.tid, a.vm_type) for a in done] == [(601, 2), (602, 5)]
    for a in done:
        assert {s.vm_type for s in a.steps if s.observed} == {a.vm_type}
        assert len([s for s in a.steps if s.observed]) == 4


def test_chain_without_an_ioctl_is_flushed_as_an_orphan(kernel_facts):
    k = Kernel(kernel_facts, SEED)
    # The simulation module's path: kvm_is → vmx, triggered from debugfs, twice.
    for t0 in (1_000, 5_000):
        assert k.feed(k.ev("vmx_is_vm_type_supported", 2, 0, t0 + 200, 100),
                      k.ev("kvm_is_vm_type_supported", 2, 0, t0 + 300, 250)) == []
    assert k.stitcher.flush(now_ns=6_000) == []  # too young
    orphans = k.stitcher.flush()
    assert len(orphans) == 2
    a = orphans[0]
    assert a.result is None and a.rejected and a.reason == "type_unsupported"
    assert "kvm_is_vm_type_supported → vmx_is_vm_type_supported → rejected" in a.explanation
    assert next(s for s in a.steps if s.probe == "KVM_CREATE_VM").observed is False


def test_stale_events_before_a_call_do_not_join_it(kernel_facts):
    k = Kernel(kernel_facts, SEED)
    stale = k.ev("kvm_is_vm_type_supported", 1, 0, 100, 50)
    done = k.feed(stale, *seed_chain(k, 0, verdict=True))
    assert [a.result for a in done] == [None, 7]
    assert all(s.vm_type == 0 for s in done[1].steps if s.observed)
