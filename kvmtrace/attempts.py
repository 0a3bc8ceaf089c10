"""Attempts: one KVM_CREATE_VM call with its chain of decisions, and why it failed.

Pure. The stitcher takes decoded events in the order the kernel emitted them
(returns come innermost first) and groups the function-probe events of one
thread that fall inside a KVM_CREATE_VM call into that call's *attempt*.
Rejected attempts are classified with a reason and explained; the reason
uses what was observed (the VERDICT_* bits the kernel recorded, the steps)
plus the host's KVM_CAP_VM_TYPES mask, and says which it used.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from kvmtrace import plan as planmod
from kvmtrace import tables
from kvmtrace.contract import (
    VERDICT_ARCH_INIT_FAILED,
    VERDICT_ARCH_INIT_SEEN,
    VERDICT_TYPE_CHECK_REJECTED,
    VERDICT_TYPE_CHECK_SEEN,
)
from kvmtrace.decode import Event

# Reasons, in the order they are tried.
TYPE_UNSUPPORTED = "type_unsupported"
ARCH_INIT_FAILED = "arch_init_failed"
FD_EXHAUSTED = "fd_exhausted"
NO_MEMORY = "no_memory"
VIRTUALIZATION_BUSY = "virtualization_busy"
INTERRUPTED = "interrupted"
OTHER = "other"
# Reasons of a VM start that failed around KVM_CREATE_VM (kvmtrace.starts).
VMM_REFUSED_TYPE = "vmm_refused_type"  # the VMM read the mask and gave up before creating
VMM_EXITED = "vmm_exited"  # exited non-zero before creating, without a mask to blame
LAUNCH_FAILED = "launch_failed"  # a KVM_MEMORY_ENCRYPT_OP failed
EXITED_AFTER_CREATE = "exited_after_create"  # exited non-zero after KVM made its VM
VMM_CRASHED = "vmm_crashed"  # killed by a signal that is not an operator's stop
SETUP_FAILED = "setup_failed"  # another KVM ioctl of its setup failed (memory, vCPUs)
FIRST_RUN_FAILED = "first_run_failed"  # its first KVM_RUN failed or ended the VM
REASONS = (TYPE_UNSUPPORTED, ARCH_INIT_FAILED, FD_EXHAUSTED, NO_MEMORY, VIRTUALIZATION_BUSY,
           INTERRUPTED, OTHER, VMM_REFUSED_TYPE, VMM_EXITED, LAUNCH_FAILED,
           EXITED_AFTER_CREATE, VMM_CRASHED, SETUP_FAILED, FIRST_RUN_FAILED)

_ERRNO_REASONS: Mapping[str, str] = {
    "EMFILE": FD_EXHAUSTED,
    "ENFILE": FD_EXHAUSTED,
    "ENOMEM": NO_MEMORY,
    "EBUSY": VIRTUALIZATION_BUSY,
    "EINTR": INTERRUPTED,
}

# Hints: the one table of "what to do about it". Keys: (reason, x86 VM type
# name or "*"). A vendor mismatch hint is added separately (see hint()).
_SEV_HINT = ("SEV-family types need an AMD host with kvm_amd loaded with SEV enabled "
             "(kvm_amd.sev=1, sev_es=1, sev_snp=1 as needed), SEV firmware (/dev/sev) and "
             "memory encryption enabled in the firmware setup; KVM_CAP_VM_TYPES lists them "
             "only then (Linux 6.10+ for SEV/SEV-ES/SNP types)")
HINTS: Mapping[tuple[str, str], str] = {
    (TYPE_UNSUPPORTED, "SEV"): _SEV_HINT,
    (TYPE_UNSUPPORTED, "SEV_ES"): _SEV_HINT,
    (TYPE_UNSUPPORTED, "SNP"): _SEV_HINT,
    (TYPE_UNSUPPORTED, "TDX"): ("TDX needs an Intel host with kvm_intel loaded with tdx=1 "
                                "(kvm_intel.tdx=1), TDX enabled in the firmware setup and a "
                                "kernel with TDX host support (Linux 6.16+)"),
    (TYPE_UNSUPPORTED, "SW_PROTECTED"): ("SW_PROTECTED needs a kernel built with "
                                         "CONFIG_KVM_SW_PROTECTED_VM and TDP (EPT/NPT) enabled"),
    (TYPE_UNSUPPORTED, "*"): ("not a VM type this host's KVM accepts: check the VMM's "
                              "machine/confidential-guest configuration"),
    (FD_EXHAUSTED, "*"): ("the process hit its open-file limit: raise it (ulimit -n, "
                          "LimitNOFILE= in the systemd unit) or look for an fd leak"),
    (NO_MEMORY, "*"): "the kernel could not allocate the VM: check host memory and cgroup limits",
    (VIRTUALIZATION_BUSY, "*"): ("another hypervisor holds VMX/SVM (VirtualBox, VMware): "
                                 "unload its kernel module"),
    (INTERRUPTED, "*"): "a signal interrupted KVM_CREATE_VM: retrying is safe",
    (ARCH_INIT_FAILED, "*"): "kvm_arch_init_vm failed: look for KVM messages in dmesg",
    (OTHER, "*"): "see dmesg for KVM messages",
    (VMM_REFUSED_TYPE, "*"): ("the VMM found the type it needs missing from KVM_CAP_VM_TYPES "
                              "and did not create a VM: enable that type on the host "
                              "(kvmtrace doctor) or change the VM's confidential-guest "
                              "configuration"),
    (VMM_EXITED, "*"): ("the VMM exited with an error before creating a VM: its own error "
                        "output (journal, libvirt's /var/log/libvirt/qemu/NAME.log) says why"),
    (LAUNCH_FAILED, "*"): ("the confidential launch failed in KVM_MEMORY_ENCRYPT_OP: see "
                           "the firmware status and dmesg"),
    (EXITED_AFTER_CREATE, "*"): ("KVM created the VM, then the VMM exited with an error "
                                 "before or while running it: its own error output (journal, "
                                 "libvirt's log of the VM) says why"),
    (VMM_CRASHED, "*"): "the VMM was killed by a signal: look for a core dump (coredumpctl)",
    (SETUP_FAILED, "*"): ("a KVM ioctl of the VM's setup failed after KVM made the VM: its "
                          "command and errno are in the start's calls"),
    (FIRST_RUN_FAILED, "*"): ("the VM's first KVM_RUN failed or ended it: its errno and exit "
                              "reason are in the start's run"),
}
# Hints of a failed KVM_MEMORY_ENCRYPT_OP, by errno (vm-start-paths.md §3).
LAUNCH_HINTS: Mapping[str, str] = {
    "ENOTTY": ("KVM has no SEV/TDX for this VM: the feature is off in kvm_amd/kvm_intel "
               "(sev=, sev_es=, sev_snp=, tdx= parameters; kvmtrace doctor), or the command "
               "does not fit the VM's type (a legacy SEV command on a DEFAULT VM needs "
               "kvm_amd.sev=1)"),
    "EINVAL": ("KVM refused the command's arguments: a command for another VM type, a bad "
               "policy, or vCPUs created too early"),
    "EBUSY": ("no free ASID/HKID, or the misc cgroup's sev/sev_es/tdx limit (misc.max) is "
              "reached: stop other confidential VMs or raise the limit"),
    "ENOSPC": "TDX private key IDs (HKIDs) are exhausted: stop another TD",
    "EAGAIN": "the TDX module ran out of entropy: retry",
    "EIO": ("the PSP/TDX module failed the command (its status is named): update the "
            "firmware / TDX module, see dmesg"),
}

# Hints of a VM type the VMM refused, when KVM's mask is the evidence.
HINTS = {**HINTS, **{(VMM_REFUSED_TYPE, t): HINTS[(TYPE_UNSUPPORTED, t)]
                     for r, t in list(HINTS) if r == TYPE_UNSUPPORTED and t != "*"}}
_VENDOR_OF_TYPE: Mapping[str, str] = {"SEV": "kvm_amd", "SEV_ES": "kvm_amd", "SNP": "kvm_amd",
                                      "TDX": "kvm_intel"}


@dataclass(frozen=True)
class Classification:
    reason: str
    basis: str  # what the reason rests on: observed verdicts, errno, the host mask


def supported_types(host_mask: int | None) -> list[int] | None:
    """Types the host accepts from its KVM_CAP_VM_TYPES answer (0: cap unknown → [0])."""
    if host_mask is None:
        return None
    return tables.supported_vm_types(host_mask)


# classify() runs once per new series at a scrape (the collector keeps its result)
# and once per rejected attempt: what it needs of the host's mask is computed once.
@functools.lru_cache(maxsize=64)
def _supported_set(host_mask: int | None) -> frozenset[int] | None:
    """supported_types() as a set, memoized per mask (pure)."""
    supported = supported_types(host_mask)
    return None if supported is None else frozenset(supported)


def classify(errno: str | None, vm_type: int, verdicts: int,
             host_mask: int | None) -> Classification:
    """Why a KVM_CREATE_VM failed with ``errno``. Pure, used for metrics and reports."""
    if errno in _ERRNO_REASONS:
        return Classification(_ERRNO_REASONS[errno], f"errno {errno}")
    if verdicts & VERDICT_TYPE_CHECK_REJECTED:
        return Classification(TYPE_UNSUPPORTED, "observed: a *_is_vm_type_supported check "
                                                "returned false")
    supported = _supported_set(host_mask)
    if errno == "EINVAL" and supported is not None and vm_type not in supported:
        return Classification(TYPE_UNSUPPORTED, f"the type's bit is not in the host's "
                                                f"KVM_CAP_VM_TYPES mask {host_mask:#x}")
    if verdicts & VERDICT_ARCH_INIT_FAILED:
        return Classification(ARCH_INIT_FAILED, "observed: kvm_arch_init_vm returned "
                                                f"{errno or 'an error'}")
    if supported is None:
        return Classification(OTHER, f"errno {errno}; the host's KVM_CAP_VM_TYPES is unknown")
    return Classification(OTHER, f"errno {errno}; the type is in the host's mask "
                                 f"{host_mask:#x}")


def hint(reason: str, vm_type_name: str, vendor_modules: Sequence[str] = ()) -> str:
    text = HINTS.get((reason, vm_type_name)) or HINTS[(reason, "*")]
    needed = _VENDOR_OF_TYPE.get(vm_type_name)
    if reason in (TYPE_UNSUPPORTED, VMM_REFUSED_TYPE) and needed and vendor_modules \
            and needed not in vendor_modules:
        text = (f"this host runs {', '.join(vendor_modules)}, not {needed}: {vm_type_name} "
                f"cannot work here. {text}")
    return text


@dataclass(frozen=True)
class Step:
    probe: str
    layer: str
    observed: bool
    mechanism: str  # planmod.Mechanism.NONE when not observed
    vm_type: int | None = None
    result: int | None = None
    rejected: bool | None = None
    errno: str | None = None
    duration_ns: int | None = None
    note: str = ""  # why unobserved / "attached, not called"


@dataclass
class Attempt:
    pid: int
    tid: int
    comm: str
    vm_type: int | None
    vm_type_name: str | None
    start_ns: int
    end_ns: int
    result: int | None  # fd or -errno; None when the ioctl itself was not observed
    errno: str | None
    rejected: bool
    verdicts: int
    steps: list[Step] = field(default_factory=list)
    reason: str | None = None
    basis: str | None = None
    explanation: str | None = None
    hint: str | None = None
    host_mask: int | None = None
    # Its process's cgroup v2 path when first seen and who owns it (kvmtrace.owners, as
    # a start has them: kvmtrace.starts.owner_of); None / {} where not known.
    cgroup: str | None = None
    owner: dict = field(default_factory=dict)

    @property
    def latency_ns(self) -> int:
        return self.end_ns - self.start_ns

    def to_json(self) -> dict:
        d = asdict(self)
        d["latency_ns"] = self.latency_ns
        return d


def _type_label(vm_type: int, name: str, arch: str) -> str:
    title = tables.vm_type_title(vm_type, arch)
    return f"VM type {vm_type} ({name}{': ' + title if title else ''})"


def explain(a: Attempt, arch: str, vendor_modules: Sequence[str] = ()) -> None:
    """Fill in reason, basis, explanation and hint of a rejected attempt."""
    if not a.rejected:
        return
    vm_type = a.vm_type if a.vm_type is not None else -1
    name = a.vm_type_name or "unknown"
    c = classify(a.errno, vm_type, a.verdicts, a.host_mask)
    a.reason, a.basis = c.reason, c.basis
    supported = supported_types(a.host_mask)
    parts = [f"pid {a.pid} ({a.comm}) asked for " + (_type_label(vm_type, name, arch)
                                                    if a.vm_type is not None
                                                    else "an unobserved VM type")]
    if supported is not None:
        names = ", ".join(tables.vm_type_name(t, arch) for t in supported)
        only = "only " if len(supported) == 1 else ""
        parts.append(f"this host supports {only}{names} (KVM_CAP_VM_TYPES={a.host_mask:#x})")
    rejecting = [s for s in a.steps if s.observed and s.rejected
                 and s.layer != planmod.Layer.IOCTL]
    if rejecting:
        chain = " → ".join(s.probe for s in sorted(rejecting, key=_depth))
        where = f"KVM rejected it in {chain}"
    else:
        unseen = [s.probe for s in a.steps
                  if not s.observed and s.layer != planmod.Layer.IOCTL]
        where = "KVM_CREATE_VM failed" + (
            f" (inside the kernel not observable here: {', '.join(unseen)} not attached)"
            if unseen else "")
    outcome = a.errno or (str(a.result) if a.result is not None else "rejected")
    parts.append(f"{where} → {outcome}")
    a.explanation = "; ".join(parts)
    a.hint = hint(c.reason, name, vendor_modules)


def _depth(s: Step) -> int:
    return planmod.layer_depth(s.layer)


# The layers a KVM_CREATE_VM's chain of decisions is made of.
_CREATE_LAYERS = (planmod.Layer.IOCTL, planmod.Layer.ARCH_INIT, planmod.Layer.TYPE_CHECK)


class Stitcher:
    """Groups events of one thread into attempts. Holds only bounded state."""

    def __init__(self, attachments: Iterable, arch: str, host_mask: int | None = None,
                 vendor_modules: Sequence[str] = (), orphan_after_ns: int = 2_000_000_000,
                 per_thread: int = 64):
        self._points = [(a.point, a.attached, a.mechanism, a.reason) for a in attachments]
        self._arch = arch
        self.host_mask = host_mask
        self._vendor = tuple(vendor_modules)
        self._orphan_after = orphan_after_ns
        self._per_thread = per_thread
        self._pending: dict[int, deque[Event]] = {}

    def _steps(self, ioctl_ev: Event | None, inner: list[Event]) -> list[Step]:
        steps = []
        for point, attached, mechanism, reason in self._points:
            if point.name == planmod.VM_TYPES_QUERY or point.layer not in _CREATE_LAYERS:
                continue
            if point.name == planmod.CREATE_VM:
                if ioctl_ev is not None:
                    steps.append(Step(point.name, point.layer, True, mechanism, ioctl_ev.vm_type,
                                      ioctl_ev.result, ioctl_ev.rejected, ioctl_ev.errno,
                                      ioctl_ev.duration_ns or None))
                else:
                    steps.append(Step(point.name, point.layer, False, planmod.Mechanism.NONE,
                                      note=reason if not attached else "not seen"))
                continue
            seen = [e for e in inner if e.probe == point.name]
            if not attached:
                steps.append(Step(point.name, point.layer, False, planmod.Mechanism.NONE,
                                  note=reason))
            elif not seen:
                steps.append(Step(point.name, point.layer, False, mechanism,
                                  note="attached, not called in this attempt"))
            for e in seen:
                steps.append(Step(e.probe, e.layer, True, mechanism, e.vm_type, e.result,
                                  e.rejected, e.errno, e.duration_ns or None))
        return steps

    def _attempt(self, ioctl_ev: Event | None, inner: list[Event]) -> Attempt:
        first = ioctl_ev or inner[0]
        end = first.ts_ns if ioctl_ev else max(e.ts_ns for e in inner)
        start = (ioctl_ev.ts_ns - ioctl_ev.duration_ns) if ioctl_ev and ioctl_ev.duration_ns \
            else min(e.ts_ns - e.duration_ns for e in ([first, *inner]))
        verdicts = ioctl_ev.verdicts if ioctl_ev else 0
        if ioctl_ev is None:
            verdicts = _verdicts_of(inner)
        outer = ioctl_ev or max(inner, key=lambda e: e.duration_ns)
        a = Attempt(
            pid=first.pid, tid=first.tid, comm=first.comm,
            vm_type=outer.vm_type, vm_type_name=outer.vm_type_name,
            start_ns=start, end_ns=end,
            result=ioctl_ev.result if ioctl_ev else None,
            errno=ioctl_ev.errno if ioctl_ev else next((e.errno for e in inner if e.errno), None),
            rejected=ioctl_ev.rejected if ioctl_ev else any(e.rejected for e in inner),
            verdicts=verdicts, steps=self._steps(ioctl_ev, inner), host_mask=self.host_mask,
        )
        explain(a, self._arch, self._vendor)
        return a

    def feed(self, ev: Event) -> list[Attempt]:
        """Take one event; return the attempts it completes (usually none or one)."""
        if ev.layer in (planmod.Layer.ARCH_INIT, planmod.Layer.TYPE_CHECK):
            q = self._pending.setdefault(ev.tid, deque(maxlen=self._per_thread))
            q.append(ev)
            return []
        if ev.probe != planmod.CREATE_VM:
            return []
        q = self._pending.pop(ev.tid, deque())
        start = ev.ts_ns - ev.duration_ns if ev.duration_ns else 0
        inner = [e for e in q if start <= e.ts_ns <= ev.ts_ns]
        older = [e for e in q if e.ts_ns < start]
        return [*self._orphans(older), self._attempt(ev, inner)]

    def _orphans(self, events: list[Event]) -> list[Attempt]:
        return [self._attempt(None, chain) for chain in _chains(events)]

    def flush(self, now_ns: int | None = None) -> list[Attempt]:
        """Chains no KVM_CREATE_VM claimed (ioctl layer not attached, or a caller
        other than the ioctl) once older than ``orphan_after``; all when now_ns is None."""
        out = []
        for tid in list(self._pending):
            q = self._pending[tid]
            if now_ns is not None and q and now_ns - q[-1].ts_ns < self._orphan_after:
                continue
            del self._pending[tid]
            out.extend(self._orphans(list(q)))
        return out


def _chains(events: list[Event]) -> list[list[Event]]:
    """Split one thread's returns into call chains: a chain closes when the next
    event started after every event in it returned (it does not enclose them)."""
    chains: list[list[Event]] = []
    cur: list[Event] = []
    for e in events:
        start = e.ts_ns - e.duration_ns
        if cur and (e.duration_ns == 0 or all(x.ts_ns < start for x in cur)):
            chains.append(cur)
            cur = []
        cur.append(e)
    if cur:
        chains.append(cur)
    return chains


def _verdicts_of(events: Iterable[Event]) -> int:
    v = 0
    for e in events:
        if e.layer == planmod.Layer.ARCH_INIT:
            v |= VERDICT_ARCH_INIT_SEEN | (VERDICT_ARCH_INIT_FAILED if e.rejected else 0)
        elif e.layer == planmod.Layer.TYPE_CHECK:
            v |= VERDICT_TYPE_CHECK_SEEN | (VERDICT_TYPE_CHECK_REJECTED if e.rejected else 0)
    return v
