"""Intel's chain: TDX. Pure.

An Intel host (not a guest) → the CPU has VMX → the BIOS enabled TDX (private KeyIDs)
→ the TDX module initialised → kvm_intel enables TDX → free KeyIDs in the misc cgroup.
The module's version, as the kernel log states it, is :func:`module_version`.
"""

from __future__ import annotations

import re

from kvmtrace.checks import (
    CAPACITY,
    FAIL,
    FIRMWARE,
    HARDWARE,
    INTEL,
    KVM,
    PASS,
    SKIP,
    Ctx,
    Result,
    Spec,
    cpu_line,
    misc,
    param_line,
    vendor_only,
)


def module_version(dmesg: list[str] | None) -> str | None:
    """The TDX module's version ("major.minor") the kernel log states last."""
    for ln in reversed(dmesg or ()):
        m = re.search(r"virt/tdx:.*major_version (\d+), minor_version (\d+)", ln) or \
            re.search(r"virt/tdx:.*version (\d+)\.(\d+)", ln)
        if m:
            return f"{m.group(1)}.{m.group(2)}"
    return None


def _cpu(c: Ctx) -> Result:
    if c.flag("vmx"):
        return PASS, ["cpuinfo: vmx flag", cpu_line(c.ev)], None
    return FAIL, ["cpuinfo: no vmx flag"], "enable VT-x in the BIOS"


def _bios(c: Ctx) -> Result:
    lines = c.lines(r"BIOS enabled: private KeyID|TDX.*(?:disabled|not enabled)|"
                    r"virt/tdx:.*(?:BIOS|KeyID|not)")
    if c.flag("tdx_host_platform") or any("BIOS enabled: private KeyID" in ln
                                          for ln in lines):
        return PASS, ["cpuinfo: tdx_host_platform flag" if c.flag("tdx_host_platform")
                      else "cpuinfo: no tdx_host_platform flag", *lines], None
    if c.ev.dmesg is None and not c.flag("tdx_host_platform"):
        return SKIP, ["cpuinfo: no tdx_host_platform flag", c.ev.dmesg_error or ""], (
            "run as root so dmesg's 'BIOS enabled: private KeyID range' can be read")
    return FAIL, ["cpuinfo: no tdx_host_platform flag", *lines], (
        "enable TDX in the BIOS (TME, TME-MT/MKTME keys, TDX, SEAM loader), on a 4th Gen "
        "Xeon Scalable or later")


def _module(c: Ctx) -> Result:
    failed = c.lines(r"virt/tdx:.*(?:fail|error)|TDX module.*fail")
    ok = c.lines(r"virt/tdx:.*(?:module initialized|TDX module initialized)|"
                 r"TDX module.*initialized")
    version = c.lines(r"virt/tdx:.*(?:version|major_version)")
    if failed:
        return FAIL, failed[-3:], ("the TDX module failed to initialise: install a TDX "
                                   "module the BIOS can load (intel/tdx-module) and see dmesg")
    if ok:
        return PASS, [*ok[-1:], *version[-1:]], None
    if c.on("kvm_intel.tdx"):
        return PASS, [param_line(c, "kvm_intel.tdx") + " (KVM enables TDX only once the "
                      "module is initialised)"], None
    if c.on("kvm_intel.tdx") is False:
        return SKIP, ["dmesg: no TDX module line", param_line(c, "kvm_intel.tdx") + " (KVM "
                      "initialises the module only with tdx=1)"], None
    if c.ev.dmesg is None:
        return SKIP, [c.ev.dmesg_error or "dmesg not read"], (
            "run as root so the TDX module's dmesg lines can be read")
    return FAIL, ["dmesg: no 'virt/tdx: module initialized' line"], (
        "the TDX module was not initialised (kvm_intel.tdx=1 initialises it when "
        "kvm_intel loads)")


def _kvm(c: Ctx) -> Result:
    needs = ("kvm.enable_virt_at_load", "kvm_intel.ept")
    ev = [param_line(c, "kvm_intel.tdx"), *[param_line(c, n) for n in needs]]
    if "kvm_intel" not in c.ev.modules:
        return FAIL, ev, "modprobe kvm_intel tdx=1"
    on = c.on("kvm_intel.tdx")
    if on:
        return PASS, ev, None
    off = [n for n in needs if c.on(n) is False]
    if on is None:
        return FAIL, ev, "this kernel's kvm_intel has no tdx parameter: TDX needs 6.16+"
    why = f" ({', '.join(off)} is off: TDX needs it)" if off else ""
    return FAIL, ev, f"kvm_intel tdx=1 (modprobe option or kvm_intel.tdx=1 at boot){why}"


def chains() -> dict[str, list[Spec]]:
    """TDX's chain, by VM type name."""
    return {"TDX": [
        ("platform", HARDWARE, "an Intel host (not a guest)",
         vendor_only(INTEL, "TDX", "tdx_host_platform", "kvm_intel.tdx")),
        ("cpu", HARDWARE, "the CPU has VMX", _cpu),
        ("bios", FIRMWARE, "the BIOS enabled TDX (private KeyIDs)", _bios),
        ("module", FIRMWARE, "the TDX module initialised", _module),
        ("kvm", KVM, "kvm_intel enables TDX (kvm_intel.tdx)", _kvm),
        ("keyids", CAPACITY, "free KeyIDs (misc cgroup 'tdx')", misc("tdx", "TDX KeyIDs")),
    ]}
