"""Causes: why a VM start failed, one from a fixed table, decided from the evidence. Pure.

A failed start (kvmtrace.starts) knows where it stopped (its stage) and what the kernel
said on the way: the mask it was given, a refused KVM_CREATE_VM, the confidential
launch's commands with their errnos and firmware statuses, its other KVM ioctls that
failed, and its first KVM_RUN that failed or ended it. :func:`decide` turns that into
one :class:`Cause` -- a name from :data:`CAUSES`, the evidence it rests on, and the fix --
from the numbers wherever the kernel gave numbers, never from text alone. The table is
the public reports' (../shared/reference/vm-start-paths.md section 6): which layer said
no, and what explains it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvmtrace import kvmabi

TYPE_NOT_OFFERED = "type_not_offered"
FEATURE_DISABLED = "feature_disabled_at_bringup"
KVM_REJECTED_ARGUMENTS = "kvm_rejected_arguments"
FIRMWARE_ERROR = "firmware_error"
TDX_MODULE_ERROR = "tdx_module_error"
ABI_SKEW = "abi_skew"
CAPACITY = "capacity"
MEMORY_SETUP = "memory_setup"
FIRST_RUN_FAILED = "first_run_failed"
VMM_CONFIG = "vmm_config"
UNKNOWN = "unknown"

# Every cause, with the fix its hint names (the `cause` label's values: bounded).
CAUSES: Mapping[str, str] = {
    TYPE_NOT_OFFERED: "the host's KVM does not offer this VM type: kvmtrace doctor --type "
                      "TYPE says which layer (hardware, firmware, module) is missing",
    FEATURE_DISABLED: "the feature is off in the vendor module: load it with the parameter "
                      "on (kvm_amd.sev=1 sev_es=1 sev_snp=1, kvm_intel.tdx=1) and read its "
                      "bring-up lines in the kernel log (kvmtrace doctor)",
    KVM_REJECTED_ARGUMENTS: "KVM refused the VMM's arguments before the firmware was asked "
                            "(no firmware status): check the VM's policy, firmware image "
                            "(-bios, not pflash, for SNP) and the VMM's configuration",
    FIRMWARE_ERROR: "the platform firmware (AMD PSP) refused the command: its status names "
                    "why; update the SEV firmware and check the kernel log's ccp lines",
    TDX_MODULE_ERROR: "the TDX module refused the SEAMCALL: its status class names why; "
                      "check the TDX module version and the kernel log's virt/tdx lines",
    ABI_SKEW: "the kernel does not know a command the VMM sent (ENOTTY): the VMM and the "
              "kernel disagree on the interface -- use a VMM built for this kernel",
    CAPACITY: "a resource ran out: encryption IDs (ASIDs, KeyIDs: misc cgroup "
              "misc.max/misc.current), memory, or the process's open files",
    MEMORY_SETUP: "KVM refused the VM's memory setup (guest_memfd, memory regions, "
                  "private/shared attributes); EACCES/EPERM point at an LSM denial",
    FIRST_RUN_FAILED: "the first KVM_RUN failed or ended the VM: read the kernel log (a "
                      "WARN, an entry failure) and the VMM's own error output",
    VMM_CONFIG: "the VMM gave up before any kernel call failed: its own error output says "
                "why (a missing object type, a configuration error)",
    UNKNOWN: "nothing the kernel said explains it: see the evidence, the VMM's output and "
             "the kernel log",
}


@dataclass(frozen=True)
class Cause:
    name: str  # one of CAUSES
    evidence: str  # what decided it, in words, with the numbers

    @property
    def hint(self) -> str:
        return CAUSES[self.name]


@dataclass(frozen=True)
class Failure:
    """What the kernel said during one failed start, as kvmtrace.starts has it."""

    stage: str  # kvmtrace.starts: before_create, at_create, during_launch, at_first_run
    reason: str  # kvmtrace.attempts' reason
    requested_type: str  # what the command line asked for, or "not_known"
    exit: Mapping  # kvmtrace.starts.exit_of()
    creates: Sequence[Mapping] = ()  # refused ones: {"vm_type_name", "result"}
    launch: Sequence[Mapping] = ()  # failed ones: {"family", "command", "errno", ...}
    calls: Sequence[Mapping] = ()  # {"command", "errno", ...}
    run: Mapping | None = None  # {"errno", "exit_reason"}
    # The bring-up evidence of the type asked for, when it is off ("kvm_amd.sev_snp=N").
    disabled: str | None = None


_CAPACITY_ERRNOS = ("EBUSY", "ENOSPC", "ENOMEM", "EMFILE", "ENFILE")
_LSM_ERRNOS = ("EACCES", "EPERM")


def _not_offered(f: Failure, what: str) -> Cause:
    if f.disabled:
        return Cause(FEATURE_DISABLED, f"{what}; {f.disabled}")
    return Cause(TYPE_NOT_OFFERED, what)


def _launch(op: Mapping, f: Failure) -> Cause:
    """A failed KVM_MEMORY_ENCRYPT_OP: its firmware status first, then its errno."""
    cmd = f"{op['family']} {op['command']}"
    errno, status = op.get("errno"), op.get("firmware_status")
    if op.get("firmware_status_code"):
        name = TDX_MODULE_ERROR if op["family"] == "TDX" else FIRMWARE_ERROR
        return Cause(name, f"{cmd} failed with {errno or 'ok'}, firmware status {status}")
    said = f"{cmd} failed with {errno} and no firmware status"
    if errno == "ENOTTY":
        if f.disabled:  # the feature is off: no command of its family is taken
            return Cause(FEATURE_DISABLED, f"{said}; {f.disabled}")
        return Cause(ABI_SKEW, f"{said}: the kernel does not take this command here")
    if errno in _CAPACITY_ERRNOS:
        return Cause(CAPACITY, f"{said} (no free encryption ID, or the misc cgroup's limit)")
    if errno == "EAGAIN" and op["family"] == "TDX":
        return Cause(TDX_MODULE_ERROR, f"{said} (the TDX module ran out of entropy)")
    if errno == "EIO":
        return Cause(FIRMWARE_ERROR, said)
    if errno == "EINVAL":
        return Cause(KVM_REJECTED_ARGUMENTS, said)
    return Cause(UNKNOWN, said)


def _call(call: Mapping) -> Cause:
    cmd, errno = call["command"], call["errno"]
    said = f"{cmd} failed with {errno}"
    if cmd in kvmabi.MEMORY_SETUP:
        if errno in _LSM_ERRNOS:
            return Cause(MEMORY_SETUP, f"{said}: likely an LSM (SELinux, AppArmor) denial")
        return Cause(MEMORY_SETUP, said)
    if errno in _CAPACITY_ERRNOS:
        return Cause(CAPACITY, said)
    if errno == "ENOTTY":
        return Cause(ABI_SKEW, f"{said}: the kernel does not know this ioctl here")
    if errno == "EINVAL":
        return Cause(KVM_REJECTED_ARGUMENTS, said)
    return Cause(UNKNOWN, said)


def _exited(f: Failure) -> str:
    ex = f.exit
    if ex.get("how") == "exited":
        return f"exit status {ex['status']}"
    if ex.get("how") == "killed":
        return f"killed by {ex['signal']}"
    return "its exit was not seen"


def decide(f: Failure) -> Cause:
    """The cause of a failed start. Where several layers failed (rare: a VMM usually
    stops at its first error), the outermost one in a start's order decides: the
    create, the confidential launch, the other ioctls, then the first KVM_RUN."""
    if f.stage == "before_create":
        if f.reason == "vmm_refused_type":
            return _not_offered(f, f"the VMM read KVM_CAP_VM_TYPES, found no "
                                   f"{f.requested_type} and made no VM")
        if f.reason == "vmm_crashed":
            return Cause(UNKNOWN, f"the VMM was {_exited(f)} before any KVM call failed")
        return Cause(VMM_CONFIG, f"the VMM ended ({_exited(f)}) before it created a VM, "
                                 "and no kernel call failed")
    if f.stage == "at_create":
        create = f.creates[-1] if f.creates else {}
        what = (f"KVM_CREATE_VM({create.get('vm_type_name', '?')}) failed with "
                f"{create.get('result', '?')}")
        if f.reason == "type_unsupported":
            return _not_offered(f, f"{what}: the type is not in KVM_CAP_VM_TYPES")
        if f.reason in ("fd_exhausted", "no_memory"):
            return Cause(CAPACITY, what)
        if create.get("result") == "EINVAL":
            return Cause(KVM_REJECTED_ARGUMENTS, what)
        return Cause(UNKNOWN, what)
    if f.launch:
        return _launch(f.launch[-1], f)
    if f.calls:
        return _call(f.calls[0])
    if f.run is not None:
        errno, reason = f.run.get("errno"), f.run.get("exit_reason")
        said = (f"the first KVM_RUN failed with {errno}" if errno
                else f"the first KVM_RUN ended the VM with exit {reason}")
        return Cause(FIRST_RUN_FAILED, said)
    if f.exit.get("how") == "killed":
        return Cause(UNKNOWN, f"KVM made the VM; the VMM was {_exited(f)} before any "
                              "kernel call failed")
    return Cause(VMM_CONFIG, f"KVM made the VM; the VMM ended ({_exited(f)}) before any "
                             "kernel call failed")


# Module parameters that turn each confidential type on (vm-start-paths.md section 5).
_TYPE_PARAMS: Mapping[str, tuple[str, ...]] = {
    "SEV": ("kvm_amd.sev",), "SEV_ES": ("kvm_amd.sev", "kvm_amd.sev_es"),
    "SNP": ("kvm_amd.sev", "kvm_amd.sev_es", "kvm_amd.sev_snp"), "TDX": ("kvm_intel.tdx",),
}


def disabled_at_bringup(requested: str, params: Mapping[str, str]) -> str | None:
    """The module parameter (as read from /sys/module) that leaves ``requested`` off on
    this host, e.g. "kvm_amd.sev_snp=N"; None when none says so (or the module is not
    loaded: then nothing was brought up, and the type is simply not offered)."""
    for name in _TYPE_PARAMS.get(requested, ()):
        value = params.get(name)
        if value is not None and value.strip().upper() in ("N", "0"):
            return f"{name}={value.strip()}"
    return None
