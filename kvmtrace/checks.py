"""What a readiness check is made of. Pure.

A check of a VM type's chain (kvmtrace.readiness runs the chains; kvmtrace.x86chain,
kvmtrace.sevchain and kvmtrace.tdxchain make them) is a function of a :class:`Ctx`, the
host's evidence as the checks read it, returning a :data:`Result`: a status, the
evidence lines it read and a fix hint. Here: the statuses and categories, the context,
and the checks more than one chain uses (the vendor gate, the misc cgroup's capacity).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from kvmtrace.evidence import Evidence

PASS, FAIL, WARN, SKIP, NA = "PASS", "FAIL", "WARN", "SKIP", "N/A"
# Categories, in chain order.
HARDWARE, FIRMWARE, KVM, CAPACITY, ADVERTISED = (
    "hardware", "firmware", "kvm", "capacity", "advertised")

AMD, INTEL = "AuthenticAMD", "GenuineIntel"

# (status, evidence lines, hint) of one check.
Result = tuple[str, list[str], str | None]


@dataclass
class Ctx:
    ev: Evidence
    mask: int | None  # None: /dev/kvm could not be asked
    kvm_error: str | None
    guest: bool

    def flag(self, name: str) -> bool:
        return name in self.ev.cpu_flags

    def param(self, name: str) -> str | None:
        return self.ev.params.get(name)

    def on(self, name: str) -> bool | None:
        v = self.param(name)
        return None if v is None else v.strip() in ("Y", "1", "y")

    def lines(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [ln for ln in self.ev.dmesg or () if rx.search(ln)]


# A chain: (layer, category, title, check). The runner appends :func:`advertised`.
Spec = tuple[str, str, str, Callable[[Ctx], Result]]


def cpu_line(ev: Evidence) -> str:
    return (f"cpuinfo: vendor {ev.cpu_vendor}, family {ev.cpu_family}, model "
            f"{ev.cpu_model} ({ev.cpu_model_name})")


def param_line(c: Ctx, name: str) -> str:
    v = c.param(name)
    mod, _, p = name.partition(".")
    return (f"/sys/module/{mod}/parameters/{p} = {v}" if v is not None
            else f"/sys/module/{mod}/parameters/{p}: absent")


def vendor_only(vendor: str, what: str, flag: str, param: str) -> Callable[[Ctx], Result]:
    """The gate of a vendor's chain: N/A on the other vendor's CPU, and for host
    features inside a guest (the evidence still names what the lower layers read: the
    CPU flag, KVM's parameter); else PASS with the CPU it saw."""
    def check(c: Ctx) -> Result:
        if c.ev.cpu_vendor != vendor:
            who = "AMD" if vendor == AMD else "Intel"
            return NA, [cpu_line(c.ev)], f"{what} is {who}'s: not on this CPU"
        if c.guest:
            return NA, ["cpuinfo: hypervisor flag (running as a guest)",
                        f"cpuinfo: {'a' if c.flag(flag) else 'no'} {flag} flag",
                        param_line(c, param)], (
                f"this is a VM: {what} is a host feature of the hypervisor's host")
        return PASS, [cpu_line(c.ev)], None
    return check


def misc(resource: str, what: str) -> Callable[[Ctx], Result]:
    """Capacity: ``what`` (ASIDs, KeyIDs) left in the misc cgroup's ``resource``."""
    def check(c: Ctx) -> Result:
        cap, cur = c.ev.misc_capacity, c.ev.misc_current
        if cap is None:
            return SKIP, [c.ev.misc_error or "misc cgroup not readable"], (
                "mount cgroup v2 with the misc controller to see ASID/KeyID use")
        if resource not in cap:
            return SKIP, [f"/sys/fs/cgroup/misc.capacity: no '{resource}' key"], (
                f"the kernel registers {what} in the misc cgroup once KVM enables them")
        n, used = cap[resource], (cur or {}).get(resource)
        ev = [f"/sys/fs/cgroup/misc.capacity {resource} = {n}",
              f"/sys/fs/cgroup/misc.current {resource} = {used}"]
        if n == 0:
            return FAIL, ev, f"no {what} at all: the BIOS setting that sizes them is 0"
        if used is not None and used >= n:
            return FAIL, ev, (f"all {n} {what} are in use by running VMs: stop one, or "
                              "raise the BIOS setting that sizes them")
        return PASS, ev, None
    return check


def advertised(c: Ctx, vm_type: int, name: str) -> Result:
    """The check that ends every chain: does KVM_CAP_VM_TYPES offer the type?"""
    if c.mask is None:
        return SKIP, [f"/dev/kvm: {c.kvm_error or 'not asked'}"], (
            "run as root (or in group kvm) so KVM_CAP_VM_TYPES can be read")
    ev = [f"KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES) = {c.mask:#x}"]
    if c.mask == 0:  # a kernel before the capability: only type 0 exists
        if vm_type == 0:
            return PASS, [*ev, "the kernel predates KVM_CAP_VM_TYPES: type 0 only"], None
        return FAIL, [*ev, "the kernel predates KVM_CAP_VM_TYPES (6.8): type 0 only"], (
            f"{name} needs a newer kernel (KVM_CAP_VM_TYPES, 6.8+)")
    if c.mask >> vm_type & 1:
        return PASS, [*ev, f"bit {vm_type} ({name}) set"], None
    return FAIL, [*ev, f"bit {vm_type} ({name}) clear"], (
        f"KVM does not offer {name}: the first check that failed says which layer "
        "(none did: see the disagreement)")
