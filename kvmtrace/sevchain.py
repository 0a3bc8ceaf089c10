"""AMD's chains: SEV, SEV-ES and SEV-SNP. Pure.

An AMD host (not a guest) → the CPU has the feature (CPUID 0x8000001F) → the BIOS
enabled it → (SNP: the IOMMU is on) → the SEV firmware initialised → kvm_amd enables it
→ free ASIDs in the misc cgroup. The firmware's versions, as ccp's dmesg lines state
them, are :func:`api_versions`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from kvmtrace.checks import (
    AMD,
    CAPACITY,
    FAIL,
    FIRMWARE,
    HARDWARE,
    KVM,
    PASS,
    SKIP,
    WARN,
    Ctx,
    Result,
    Spec,
    misc,
    param_line,
    vendor_only,
)

# CPUID 0x8000001F EAX bits.
CPUID_SEV, CPUID_SEV_ES, CPUID_SNP = 1 << 1, 1 << 3, 1 << 4
SNP_MIN_API = (1, 51)  # the kernel's SNP_MIN_API_MAJOR / _MINOR

# Per type: the CPUID bit, the cpuinfo flag, kvm_amd's parameter and what it needs on,
# the misc cgroup key of its ASIDs (SNP uses SEV-ES's), its name in hints.
_KINDS: dict[str, tuple[int, str, str, tuple[str, ...], str, str]] = {
    "SEV": (CPUID_SEV, "sev", "kvm_amd.sev", ("kvm_amd.npt",), "sev", "SEV"),
    "SEV_ES": (CPUID_SEV_ES, "sev_es", "kvm_amd.sev_es", ("kvm_amd.sev",), "sev_es",
               "SEV-ES"),
    "SNP": (CPUID_SNP, "sev_snp", "kvm_amd.sev_snp", ("kvm_amd.sev_es",), "sev_es",
            "SEV-SNP"),
}


def api_versions(dmesg: list[str] | None) -> tuple[str | None, str | None]:
    """(SEV API version, SNP API version) from ccp's dmesg lines."""
    def last(pattern: str) -> str | None:
        found = [m.group(1) for ln in dmesg or () for m in [re.search(pattern, ln)] if m]
        return found[-1] if found else None
    return (last(r"(?<!-)SEV API:\s*([\d.]+)(?: build:\s*(\d+))?"),
            last(r"SEV-SNP API:\s*([\d.]+)"))


def _hw(bit: int, flag: str, what: str) -> Callable[[Ctx], Result]:
    def check(c: Ctx) -> Result:
        cpuid = c.ev.cpuid_8000001f
        if cpuid is not None:
            ev = [f"CPUID 0x8000001F EAX = {cpuid:#x}"]
            if cpuid & bit:
                return PASS, ev, None
            return FAIL, ev, f"this CPU generation has no {what} (an EPYC of a later one has)"
        if c.flag(flag):
            return PASS, [f"cpuinfo: {flag} flag (CPUID not read: {c.ev.cpuid_error})"], None
        return SKIP, [f"CPUID not read: {c.ev.cpuid_error}", f"cpuinfo: no {flag} flag"], (
            f"cannot tell 'CPU has no {what}' from 'BIOS has it off' without CPUID: "
            "modprobe cpuid and run as root")
    return check


def _bios(flag: str, what: str) -> Callable[[Ctx], Result]:
    def check(c: Ctx) -> Result:
        lines = c.lines(r"memory encryption not enabled|SME.*disabled|SEV.*disabled by|"
                        r"SNP.*(?:not enabled|disabled)|RMP table")
        if c.flag(flag):
            return PASS, [f"cpuinfo: {flag} flag", *lines], None
        if c.ev.cpuid_8000001f is None:
            return SKIP, [f"cpuinfo: no {flag} flag", f"CPUID not read: {c.ev.cpuid_error}",
                          *lines], ("the CPU may lack it or the BIOS may have it off: "
                                    "modprobe cpuid and run as root to tell which")
        return FAIL, [f"cpuinfo: no {flag} flag (the kernel clears it when the BIOS left "
                      "it off)", *lines], (
            f"enable {what} in the BIOS (SMEE / memory encryption, SEV"
            + (", SNP and its RMP table" if flag == "sev_snp" else "") + ")")
    return check


def _firmware(snp: bool) -> Callable[[Ctx], Result]:
    def check(c: Ctx) -> Result:
        ev = ["/dev/sev present" if c.ev.dev_sev else "/dev/sev absent"]
        if c.ev.dmesg is None:
            if not c.ev.dev_sev:
                return FAIL, ev, "the PSP driver is not up: modprobe ccp (dmesg says why)"
            return SKIP, [*ev, c.ev.dmesg_error or "dmesg not read"], (
                "run as root so the firmware's dmesg lines can be read")
        failed = [ln for ln in c.lines(r"SEV.*failed to INIT|SEV.*init.*fail|SNP.*fail|"
                                       r"requires firmware version|SEV.*timed out|psp.*fail")
                  if snp or "SNP" not in ln]  # SNP's own failures leave SEV usable
        too_old = [ln for ln in failed if "requires firmware version" in ln]
        sev, snpv = api_versions(c.ev.dmesg)
        if sev:
            ev.append(f"dmesg: SEV API {sev}")
        if snp and snpv:
            ev.append(f"dmesg: SEV-SNP API {snpv}")
        if too_old:
            return FAIL, [*ev, *too_old[-1:]], (
                f"the SNP firmware is older than the kernel's minimum "
                f"{SNP_MIN_API[0]}.{SNP_MIN_API[1]}: update the platform firmware (BIOS "
                "update, or amd_sev_fam19h_model*.sbin under /lib/firmware/amd)")
        if failed:
            return FAIL, [*ev, *failed[-3:]], (
                "the SEV firmware failed to initialise: update the platform firmware "
                "(SEV/SNP firmware from the BIOS vendor or amd-sev.bin under "
                "/lib/firmware/amd) and see the dmesg lines")
        if not c.ev.dev_sev:
            return FAIL, ev, "the PSP driver is not up: modprobe ccp (dmesg says why)"
        if snp:
            if snpv is None:
                return FAIL, ev, "no 'SEV-SNP API' line: SNP firmware not initialised"
            got = tuple(int(x) for x in snpv.split(".")[:2] if x.isdigit())
            if got < SNP_MIN_API:
                return FAIL, ev, (f"SNP firmware {snpv} is older than the kernel's minimum "
                                  f"{SNP_MIN_API[0]}.{SNP_MIN_API[1]}: update it")
        elif sev is None and snpv is None:
            return WARN, ev, "no 'SEV API' line in dmesg: firmware state not known"
        return PASS, ev, None
    return check


def _iommu(c: Ctx) -> Result:
    cmd = (c.ev.cmdline or "").split()
    off = [p for p in cmd if p in ("iommu=pt", "amd_iommu=off", "iommu=off")]
    lines = c.lines(r"SNP.*IOMMU|IOMMU.*SNP|AMD-Vi.*(?:disabled|SNP)")
    ev = [f"kernel command line: {' '.join(off) or 'no IOMMU override'}", *lines]
    if off:
        return FAIL, ev, "SNP needs the IOMMU enabled: drop " + " ".join(off)
    if any(re.search(r"not enabled|disabled|fail", ln) for ln in lines):
        return FAIL, ev, "SNP needs the AMD IOMMU (AMD-Vi) enabled in the BIOS and kernel"
    return PASS, ev, None


def _kvm(param: str, needs: tuple[str, ...]) -> Callable[[Ctx], Result]:
    def check(c: Ctx) -> Result:
        on = c.on(param)
        ev = [param_line(c, param), *[param_line(c, n) for n in needs],
              *c.lines(r"kvm_amd:.*(?:SEV|ASID)|SEV.*(?:enabled|disabled|supported)")[-3:]]
        if "kvm_amd" not in c.ev.modules:
            return FAIL, ev, "modprobe kvm_amd"
        if on:
            return PASS, ev, None
        if on is None:
            return SKIP, ev, "the kvm_amd module's parameters are not visible"
        off = [n for n in needs if c.on(n) is False]
        why = f" ({', '.join(off)} is off, and {param} needs it)" if off else ""
        return FAIL, ev, (f"kvm_amd {param.split('.')[1]}=1 (modprobe option or kernel "
                          f"command line {param}=1){why}; it reads N after loading when "
                          f"a prerequisite failed: see dmesg")
    return check


def _chain(name: str) -> list[Spec]:
    bit, flag, param, needs, resource, what = _KINDS[name]
    snp = name == "SNP"
    chain: list[Spec] = [
        ("platform", HARDWARE, "an AMD host (not a guest)", vendor_only(AMD, what, flag, param)),
        ("cpu", HARDWARE, f"the CPU has {what} (CPUID 0x8000001F)", _hw(bit, flag, what)),
        ("bios", FIRMWARE, f"the BIOS enabled {what}", _bios(flag, what)),
    ]
    if snp:
        chain.append(("iommu", FIRMWARE, "the IOMMU is on (SNP needs it)", _iommu))
    return [*chain,
            ("firmware", FIRMWARE, "the SEV firmware initialised" + (
                f" (SNP API >= {SNP_MIN_API[0]}.{SNP_MIN_API[1]})" if snp else ""),
             _firmware(snp)),
            ("kvm", KVM, f"kvm_amd enables {what} ({param})", _kvm(param, needs)),
            ("asids", CAPACITY, f"free ASIDs (misc cgroup '{resource}')",
             misc(resource, "ASIDs"))]


def chains() -> dict[str, list[Spec]]:
    """SEV's, SEV-ES's and SNP's chains, by VM type name."""
    return {name: _chain(name) for name in _KINDS}
