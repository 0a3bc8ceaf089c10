"""The chains of x86's vendor-neutral VM types, DEFAULT and SW_PROTECTED. Pure.

DEFAULT: hardware virtualization → a KVM vendor module → /dev/kvm answers.
SW_PROTECTED: a kernel built with CONFIG_KVM_SW_PROTECTED_VM → KVM's TDP MMU.
(The vendors' types: kvmtrace.sevchain, kvmtrace.tdxchain.)
"""

from __future__ import annotations

from kvmtrace.checks import AMD, FAIL, HARDWARE, KVM, PASS, SKIP, Ctx, Result, Spec, param_line


def _virt(c: Ctx) -> Result:
    vendor_mods = [m for m in c.ev.modules if m != "kvm"]
    if c.flag("svm") or c.flag("vmx"):
        f = "svm" if c.flag("svm") else "vmx"
        return PASS, [f"cpuinfo: {f} flag"], None
    if "kvm_pvm" in vendor_mods:
        return PASS, ["cpuinfo: no vmx/svm flag", "kvm_pvm loaded: PVM needs no "
                      "hardware virtualization"], None
    ev = ["cpuinfo: no vmx/svm flag", *c.lines(r"disabled by bios|not enabled \(by BIOS\)|"
                                               r"SVM disabled|VMX not")]
    if c.guest:
        return FAIL, ev, "this is a VM without nested virtualization: enable it on its host"
    return FAIL, ev, "enable virtualization (VT-x / AMD-V, SVM) in the BIOS"


def _module(c: Ctx) -> Result:
    vendor_mods = [m for m in c.ev.modules if m in ("kvm_amd", "kvm_intel", "kvm_pvm")]
    if vendor_mods:
        return PASS, [f"/sys/module: {', '.join(vendor_mods)} loaded"], None
    mod = "kvm_amd" if c.ev.cpu_vendor == AMD else "kvm_intel"
    return FAIL, ["/sys/module: no kvm_amd, kvm_intel or kvm_pvm",
                  *c.lines(r"kvm_amd|kvm_intel|kvm:")], (
        f"modprobe {mod} (dmesg says why it refused to load)")


def _dev_kvm(c: Ctx) -> Result:
    if c.mask is not None:
        return PASS, ["/dev/kvm answered KVM_CHECK_EXTENSION"], None
    err = c.kvm_error or "not asked"
    if "does not exist" in err:
        return FAIL, [f"/dev/kvm: {err}"], "load KVM (modprobe kvm_amd / kvm_intel)"
    return SKIP, [f"/dev/kvm: {err}"], "run as root or in group kvm"


def _sw_config(c: Ctx) -> Result:
    cfg = c.ev.kernel_config
    if cfg is None:
        return SKIP, [c.ev.kernel_config_error or "kernel config not found"], (
            "install the kernel's /boot/config-RELEASE to check this")
    v = cfg.get("CONFIG_KVM_SW_PROTECTED_VM", "n")
    ev = [f"CONFIG_KVM_SW_PROTECTED_VM={v}"]
    if v == "y":
        return PASS, ev, None
    return FAIL, ev, ("a kernel built with CONFIG_KVM_SW_PROTECTED_VM=y (a development "
                      "option; distribution kernels leave it off)")


def _tdp_mmu(c: Ctx) -> Result:
    on = c.on("kvm.tdp_mmu")
    ev = [param_line(c, "kvm.tdp_mmu")]
    if on:
        return PASS, ev, None
    if on is None:
        return SKIP, ev, "the kvm module's parameters are not visible"
    return FAIL, ev, "kvm.tdp_mmu=Y (needs EPT/NPT: kvm_intel.ept / kvm_amd.npt)"


def chains() -> dict[str, list[Spec]]:
    """DEFAULT's and SW_PROTECTED's chains, by VM type name."""
    return {
        "DEFAULT": [
            ("cpu", HARDWARE, "hardware virtualization (VMX/SVM, or PVM)", _virt),
            ("module", KVM, "a KVM vendor module is loaded", _module),
            ("dev_kvm", KVM, "/dev/kvm answers", _dev_kvm),
        ],
        "SW_PROTECTED": [
            ("config", KVM, "kernel built with CONFIG_KVM_SW_PROTECTED_VM", _sw_config),
            ("tdp_mmu", KVM, "KVM's TDP MMU is on", _tdp_mmu),
        ],
    }
