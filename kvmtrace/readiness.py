"""Can this host run each VM type, and if not, which layer says no. Pure.

For every VM type of the host's architecture (x86: DEFAULT, SW_PROTECTED, SEV, SEV_ES,
SNP, TDX) a chain of checks from the hardware to the answer that decides,
``KVM_CAP_VM_TYPES``: hardware capable → enabled by firmware/BIOS → firmware or TDX
module initialised → KVM enables it (module parameters and their prerequisites) →
capacity (ASIDs / KeyIDs in the misc cgroup) → advertised in the mask. Each check has
a stable id, a category, a status, the evidence it read and a fix hint when it fails;
a check whose parent failed is SKIP, one that cannot apply (Intel's type on an AMD
CPU, a host feature inside a guest) is N/A, one that lacked a prerequisite (not
root, a module not loaded) is SKIP with the reason — never FAIL. The mask check is
always made (it is the answer); where it and the layers disagree, that is said.

This is the engine: the chains are the vendor-neutral types' (kvmtrace.x86chain),
AMD's (kvmtrace.sevchain) and Intel's (kvmtrace.tdxchain), of checks as kvmtrace.checks
makes them; the table of which type has which is :func:`_chains`, here alone. Input:
:class:`kvmtrace.facts.HostFacts` (its ``evidence`` and ``kvm``); output: plain records
for ``doctor`` (text and JSON) and the collector's readiness metrics.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

from kvmtrace import sevchain, tables, tdxchain, x86chain
from kvmtrace.checks import ADVERTISED, CAPACITY, FAIL, NA, PASS, SKIP, WARN, Ctx, Spec, advertised
from kvmtrace.evidence import Evidence

# A type's verdict.
READY, NOT_READY, NOT_APPLICABLE, INCOMPLETE = (
    "ready", "not_ready", "not_applicable", "incomplete")


@dataclass(frozen=True)
class Check:
    id: str  # stable: "<type>.<layer>", e.g. "snp.firmware"
    category: str
    title: str
    status: str
    evidence: list[str] = field(default_factory=list)
    hint: str | None = None
    parent: str | None = None  # the check before it in the chain
    blocked_by: str | None = None  # the FAIL or N/A check that made it SKIP or N/A


@dataclass(frozen=True)
class TypeReadiness:
    vm_type: int
    name: str
    verdict: str
    # The first check that FAILed (or was N/A), the one a metric labels; None if ready.
    failed_check: str | None
    reason: str  # one line
    checks: list[Check]
    disagreement: str | None = None  # the mask and the layers disagree: why

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Firmware:
    component: str  # "sev", "sev_snp", "tdx_module"
    version: str


@dataclass(frozen=True)
class Capacity:
    resource: str  # misc cgroup key: "sev", "sev_es", "tdx"
    capacity: int
    used: int | None


@functools.cache
def _chains(arch: str) -> dict[str, list[Spec]]:
    """Each VM type's chain on ``arch``, by name: the table, built here alone (the mask
    check ends every chain; a type without one here is judged by the mask alone)."""
    if arch != "x86_64":
        return {}
    return {**x86chain.chains(), **sevchain.chains(), **tdxchain.chains()}


def _run_chain(vm_type: int, name: str, specs: list[Spec], c: Ctx) -> TypeReadiness:
    prefix = name.lower()
    checks: list[Check] = []
    parent: str | None = None
    blocked: Check | None = None  # the first FAIL or N/A: the rest of the chain skips
    for layer, category, title, fn in specs:
        cid = f"{prefix}.{layer}"
        if blocked is not None:
            status = NA if blocked.status == NA else SKIP
            checks.append(Check(cid, category, title, status,
                                [f"{blocked.id} is {blocked.status}"], None, parent,
                                blocked.id))
        else:
            status, ev, hint = fn(c)
            check = Check(cid, category, title, status, ev,
                          hint if status != PASS else None, parent)
            checks.append(check)
            if status in (FAIL, NA):
                blocked = check
        parent = cid
    st, ev, hint = advertised(c, vm_type, name)
    if st in (FAIL, SKIP) and blocked is not None and blocked.status == NA:
        st, hint = NA, None  # a type that cannot apply here is not offered: as expected
    mask = Check(f"{prefix}.mask", ADVERTISED, "KVM_CAP_VM_TYPES offers it", st, ev,
                 hint if st in (FAIL, SKIP) else None, None)
    checks.append(mask)
    return _verdict(vm_type, name, checks, blocked, mask)


def _verdict(vm_type: int, name: str, checks: list[Check], blocked: Check | None,
             mask: Check) -> TypeReadiness:
    layers_fail = blocked is not None and blocked.status == FAIL
    layers_ready = blocked is None and all(ch.status in (PASS, WARN) for ch in checks[:-1])
    disagreement = None
    if mask.status == PASS and blocked is not None and blocked.category != CAPACITY:
        disagreement = (f"KVM_CAP_VM_TYPES offers {name} although {blocked.id} is "
                        f"{blocked.status}: this check may be wrong for this host; the mask "
                        "decides")
    elif mask.status == FAIL and layers_ready:
        disagreement = (f"every layer looks ready but KVM_CAP_VM_TYPES does not offer "
                        f"{name}: the cause is not in what doctor reads (see dmesg)")
    capacity_fail = any(ch.category == CAPACITY and ch.status == FAIL for ch in checks)
    if mask.status == PASS and not capacity_fail:
        verdict, failed, reason = READY, None, f"{name} is offered by KVM_CAP_VM_TYPES"
    elif blocked is not None and blocked.status == NA:
        verdict, failed, reason = NOT_APPLICABLE, blocked.id, blocked.hint or blocked.title
    elif mask.status == SKIP and not layers_fail:
        verdict, failed = INCOMPLETE, mask.id
        reason = f"not decided: {mask.evidence[0]}"
    else:
        first = next((ch for ch in checks if ch.status == FAIL), mask)
        verdict, failed = NOT_READY, first.id
        reason = f"{first.id}: {first.hint or first.title}"
    return TypeReadiness(vm_type, name, verdict, failed, reason, checks, disagreement)


def assess(facts, types: list[str] | None = None) -> list[TypeReadiness]:
    """The readiness of each VM type of ``facts.arch`` (or of ``types``, by name)."""
    return assess_parts(facts.arch, facts.kvm, facts.evidence, types)


def assess_parts(arch: str, kvm, ev: Evidence | None,
                 types: list[str] | None = None) -> list[TypeReadiness]:
    """:func:`assess` from its parts: the architecture, /dev/kvm's answer
    (kvmtrace.kvmdev.KvmInfo) and the evidence (None: judged from the mask alone)."""
    table = tables.VM_TYPE_TABLES.get(arch, {0: "DEFAULT"})
    # Other architectures, and facts without evidence: the mask only.
    chains = _chains(arch) if ev is not None else {}
    ev = ev if ev is not None else Evidence()
    c = Ctx(ev, kvm.vm_types_mask, kvm.error, "hypervisor" in ev.cpu_flags)
    return [_run_chain(vm_type, name, chains.get(name, []), c)
            for vm_type, name in sorted(table.items()) if types is None or name in types]


def firmware(ev: Evidence | None) -> list[Firmware]:
    """Firmware / module versions the host's log states (for info metrics)."""
    if ev is None or ev.dmesg is None:
        return []
    sev, snp = sevchain.api_versions(ev.dmesg)
    tdx = tdxchain.module_version(ev.dmesg)
    return [Firmware(component, version) for component, version in (
        ("sev", sev), ("sev_snp", snp), ("tdx_module", tdx)) if version]


def capacities(ev: Evidence | None) -> list[Capacity]:
    """ASID / KeyID capacity and use from the misc cgroup."""
    if ev is None or ev.misc_capacity is None:
        return []
    cur = ev.misc_current or {}
    return [Capacity(r, n, cur.get(r)) for r, n in sorted(ev.misc_capacity.items())]


def type_names(arch: str) -> list[str]:
    """The VM type names ``--type`` accepts on ``arch``."""
    return [n for _, n in sorted(tables.VM_TYPE_TABLES.get(arch, {0: "DEFAULT"}).items())]
