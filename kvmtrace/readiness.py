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

Input: :class:`kvmtrace.facts.HostFacts` (its ``evidence`` and ``kvm``); output: plain
records for ``doctor`` (text and JSON) and the collector's readiness metrics.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from kvmtrace import tables
from kvmtrace.evidence import Evidence

PASS, FAIL, WARN, SKIP, NA = "PASS", "FAIL", "WARN", "SKIP", "N/A"
# Categories, in chain order.
HARDWARE, FIRMWARE, KVM, CAPACITY, ADVERTISED = (
    "hardware", "firmware", "kvm", "capacity", "advertised")
# A type's verdict.
READY, NOT_READY, NOT_APPLICABLE, INCOMPLETE = (
    "ready", "not_ready", "not_applicable", "incomplete")

AMD, INTEL = "AuthenticAMD", "GenuineIntel"
# CPUID 0x8000001F EAX bits.
CPUID_SEV, CPUID_SEV_ES, CPUID_SNP = 1 << 1, 1 << 3, 1 << 4
SNP_MIN_API = (1, 51)  # the kernel's SNP_MIN_API_MAJOR / _MINOR


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


# (status, evidence lines, hint) of one check.
Result = tuple[str, list[str], str | None]


@dataclass
class _Ctx:
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


# ---- the parts the chains share ---------------------------------------------------

def _cpu_line(ev: Evidence) -> str:
    return (f"cpuinfo: vendor {ev.cpu_vendor}, family {ev.cpu_family}, model "
            f"{ev.cpu_model} ({ev.cpu_model_name})")


def _param_line(c: _Ctx, name: str) -> str:
    v = c.param(name)
    mod, _, p = name.partition(".")
    return (f"/sys/module/{mod}/parameters/{p} = {v}" if v is not None
            else f"/sys/module/{mod}/parameters/{p}: absent")


def _vendor_only(vendor: str, what: str, flag: str, param: str
                 ) -> Callable[[_Ctx], Result | None]:
    """N/A on the other vendor's CPU, and for host features inside a guest (the
    evidence still names what the lower layers read: the CPU flag, KVM's parameter)."""
    def check(c: _Ctx) -> Result | None:
        if c.ev.cpu_vendor != vendor:
            who = "AMD" if vendor == AMD else "Intel"
            return NA, [_cpu_line(c.ev)], f"{what} is {who}'s: not on this CPU"
        if c.guest:
            return NA, ["cpuinfo: hypervisor flag (running as a guest)",
                        f"cpuinfo: {'a' if c.flag(flag) else 'no'} {flag} flag",
                        _param_line(c, param)], (
                f"this is a VM: {what} is a host feature of the hypervisor's host")
        return None
    return check


def _mask_check(vm_type: int, name: str) -> Callable[[_Ctx], Result]:
    def check(c: _Ctx) -> Result:
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
    return check


def _misc(c: _Ctx, resource: str, what: str) -> Result:
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
        return FAIL, ev, (f"all {n} {what} are in use by running VMs: stop one, or raise "
                          "the BIOS setting that sizes them")
    return PASS, ev, None


# ---- x86 chains ---------------------------------------------------------------------

def _virt(c: _Ctx) -> Result:
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


def _module(c: _Ctx) -> Result:
    vendor_mods = [m for m in c.ev.modules if m in ("kvm_amd", "kvm_intel", "kvm_pvm")]
    if vendor_mods:
        return PASS, [f"/sys/module: {', '.join(vendor_mods)} loaded"], None
    mod = "kvm_amd" if c.ev.cpu_vendor == AMD else "kvm_intel"
    return FAIL, ["/sys/module: no kvm_amd, kvm_intel or kvm_pvm",
                  *c.lines(r"kvm_amd|kvm_intel|kvm:")], (
        f"modprobe {mod} (dmesg says why it refused to load)")


def _dev_kvm(c: _Ctx) -> Result:
    if c.mask is not None:
        return PASS, ["/dev/kvm answered KVM_CHECK_EXTENSION"], None
    err = c.kvm_error or "not asked"
    if "does not exist" in err:
        return FAIL, [f"/dev/kvm: {err}"], "load KVM (modprobe kvm_amd / kvm_intel)"
    return SKIP, [f"/dev/kvm: {err}"], "run as root or in group kvm"


def _sw_config(c: _Ctx) -> Result:
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


def _tdp_mmu(c: _Ctx) -> Result:
    on = c.on("kvm.tdp_mmu")
    ev = [_param_line(c, "kvm.tdp_mmu")]
    if on:
        return PASS, ev, None
    if on is None:
        return SKIP, ev, "the kvm module's parameters are not visible"
    return FAIL, ev, "kvm.tdp_mmu=Y (needs EPT/NPT: kvm_intel.ept / kvm_amd.npt)"


def _amd_hw(bit: int, flag: str, what: str) -> Callable[[_Ctx], Result]:
    def check(c: _Ctx) -> Result:
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


def _amd_bios(flag: str, what: str) -> Callable[[_Ctx], Result]:
    def check(c: _Ctx) -> Result:
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


def _sev_api(c: _Ctx) -> tuple[str | None, str | None]:
    """(SEV API version, SNP API version) from ccp's dmesg lines."""
    def last(pattern: str) -> str | None:
        found = [m.group(1) for ln in c.ev.dmesg or ()
                 for m in [re.search(pattern, ln)] if m]
        return found[-1] if found else None
    return (last(r"(?<!-)SEV API:\s*([\d.]+)(?: build:\s*(\d+))?"),
            last(r"SEV-SNP API:\s*([\d.]+)"))


def _sev_firmware(snp: bool) -> Callable[[_Ctx], Result]:
    def check(c: _Ctx) -> Result:
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
        sev, snpv = _sev_api(c)
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


def _iommu(c: _Ctx) -> Result:
    cmd = (c.ev.cmdline or "").split()
    off = [p for p in cmd if p in ("iommu=pt", "amd_iommu=off", "iommu=off")]
    lines = c.lines(r"SNP.*IOMMU|IOMMU.*SNP|AMD-Vi.*(?:disabled|SNP)")
    ev = [f"kernel command line: {' '.join(off) or 'no IOMMU override'}", *lines]
    if off:
        return FAIL, ev, "SNP needs the IOMMU enabled: drop " + " ".join(off)
    if any(re.search(r"not enabled|disabled|fail", ln) for ln in lines):
        return FAIL, ev, "SNP needs the AMD IOMMU (AMD-Vi) enabled in the BIOS and kernel"
    return PASS, ev, None


def _amd_kvm(param: str, needs: tuple[str, ...], what: str) -> Callable[[_Ctx], Result]:
    def check(c: _Ctx) -> Result:
        on = c.on(param)
        ev = [_param_line(c, param), *[_param_line(c, n) for n in needs],
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


def _tdx_cpu(c: _Ctx) -> Result:
    if c.flag("vmx"):
        return PASS, ["cpuinfo: vmx flag", _cpu_line(c.ev)], None
    return FAIL, ["cpuinfo: no vmx flag"], "enable VT-x in the BIOS"


def _tdx_bios(c: _Ctx) -> Result:
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


def _tdx_module(c: _Ctx) -> Result:
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
        return PASS, [_param_line(c, "kvm_intel.tdx") + " (KVM enables TDX only once the "
                      "module is initialised)"], None
    if c.on("kvm_intel.tdx") is False:
        return SKIP, ["dmesg: no TDX module line", _param_line(c, "kvm_intel.tdx") + " (KVM "
                      "initialises the module only with tdx=1)"], None
    if c.ev.dmesg is None:
        return SKIP, [c.ev.dmesg_error or "dmesg not read"], (
            "run as root so the TDX module's dmesg lines can be read")
    return FAIL, ["dmesg: no 'virt/tdx: module initialized' line"], (
        "the TDX module was not initialised (kvm_intel.tdx=1 initialises it when "
        "kvm_intel loads)")


def _tdx_kvm(c: _Ctx) -> Result:
    needs = ("kvm.enable_virt_at_load", "kvm_intel.ept")
    ev = [_param_line(c, "kvm_intel.tdx"), *[_param_line(c, n) for n in needs]]
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


# A chain: (layer, category, title, check); a check may return None to mean "go on"
# (the N/A gate). The mask check is appended to every chain.
Spec = tuple[str, str, str, Callable[[_Ctx], Result | None]]

_DEFAULT: list[Spec] = [
    ("cpu", HARDWARE, "hardware virtualization (VMX/SVM, or PVM)", _virt),
    ("module", KVM, "a KVM vendor module is loaded", _module),
    ("dev_kvm", KVM, "/dev/kvm answers", _dev_kvm),
]
_SW_PROTECTED: list[Spec] = [
    ("config", KVM, "kernel built with CONFIG_KVM_SW_PROTECTED_VM", _sw_config),
    ("tdp_mmu", KVM, "KVM's TDP MMU is on", _tdp_mmu),
]


def _sev_chain(kind: str) -> list[Spec]:
    bit, flag, param, misc, what = {
        "sev": (CPUID_SEV, "sev", "kvm_amd.sev", "sev", "SEV"),
        "sev_es": (CPUID_SEV_ES, "sev_es", "kvm_amd.sev_es", "sev_es", "SEV-ES"),
        "snp": (CPUID_SNP, "sev_snp", "kvm_amd.sev_snp", "sev_es", "SEV-SNP"),
    }[kind]
    needs = {"sev": ("kvm_amd.npt",), "sev_es": ("kvm_amd.sev",),
             "snp": ("kvm_amd.sev_es",)}[kind]
    chain: list[Spec] = [
        ("platform", HARDWARE, "an AMD host (not a guest)",
         _vendor_only(AMD, what, flag, param)),
        ("cpu", HARDWARE, f"the CPU has {what} (CPUID 0x8000001F)", _amd_hw(bit, flag, what)),
        ("bios", FIRMWARE, f"the BIOS enabled {what}", _amd_bios(flag, what)),
    ]
    if kind == "snp":
        chain.append(("iommu", FIRMWARE, "the IOMMU is on (SNP needs it)", _iommu))
    chain += [
        ("firmware", FIRMWARE, "the SEV firmware initialised" + (
            f" (SNP API >= {SNP_MIN_API[0]}.{SNP_MIN_API[1]})" if kind == "snp" else ""),
         _sev_firmware(kind == "snp")),
        ("kvm", KVM, f"kvm_amd enables {what} ({param})", _amd_kvm(param, needs, what)),
        ("asids", CAPACITY, f"free ASIDs (misc cgroup '{misc}')",
         lambda c, m=misc: _misc(c, m, "ASIDs")),
    ]
    return chain


_TDX: list[Spec] = [
    ("platform", HARDWARE, "an Intel host (not a guest)",
     _vendor_only(INTEL, "TDX", "tdx_host_platform", "kvm_intel.tdx")),
    ("cpu", HARDWARE, "the CPU has VMX", _tdx_cpu),
    ("bios", FIRMWARE, "the BIOS enabled TDX (private KeyIDs)", _tdx_bios),
    ("module", FIRMWARE, "the TDX module initialised", _tdx_module),
    ("kvm", KVM, "kvm_intel enables TDX (kvm_intel.tdx)", _tdx_kvm),
    ("keyids", CAPACITY, "free KeyIDs (misc cgroup 'tdx')",
     lambda c: _misc(c, "tdx", "TDX KeyIDs")),
]

X86_CHAINS: dict[str, list[Spec]] = {
    "DEFAULT": _DEFAULT, "SW_PROTECTED": _SW_PROTECTED, "SEV": _sev_chain("sev"),
    "SEV_ES": _sev_chain("sev_es"), "SNP": _sev_chain("snp"), "TDX": _TDX,
}


def _run_chain(vm_type: int, name: str, specs: list[Spec], c: _Ctx) -> TypeReadiness:
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
            got = fn(c)
            if got is None:  # a gate that passed
                got = (PASS, [_cpu_line(c.ev)], None)
            status, ev, hint = got
            check = Check(cid, category, title, status, ev,
                          hint if status != PASS else None, parent)
            checks.append(check)
            if status in (FAIL, NA):
                blocked = check
        parent = cid
    st, ev, hint = _mask_check(vm_type, name)(c)
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
    if ev is None:
        ev = Evidence()
        missing = True
    else:
        missing = False
    c = _Ctx(ev, kvm.vm_types_mask, kvm.error, "hypervisor" in ev.cpu_flags)
    out = []
    for vm_type, name in sorted(table.items()):
        if types is not None and name not in types:
            continue
        if arch == "x86_64" and name in X86_CHAINS and not missing:
            specs = X86_CHAINS[name]
        else:
            specs = []  # other architectures (and facts without evidence): the mask only
        out.append(_run_chain(vm_type, name, specs, c))
    return out


def firmware(ev: Evidence | None) -> list[Firmware]:
    """Firmware / module versions the host's log states (for info metrics)."""
    if ev is None or ev.dmesg is None:
        return []
    c = _Ctx(ev, None, None, False)
    sev, snp = _sev_api(c)
    out = []
    if sev:
        out.append(Firmware("sev", sev))
    if snp:
        out.append(Firmware("sev_snp", snp))
    for ln in reversed(ev.dmesg):
        m = re.search(r"virt/tdx:.*major_version (\d+), minor_version (\d+)", ln) or \
            re.search(r"virt/tdx:.*version (\d+)\.(\d+)", ln)
        if m:
            out.append(Firmware("tdx_module", f"{m.group(1)}.{m.group(2)}"))
            break
    return out


def capacities(ev: Evidence | None) -> list[Capacity]:
    """ASID / KeyID capacity and use from the misc cgroup."""
    if ev is None or ev.misc_capacity is None:
        return []
    cur = ev.misc_current or {}
    return [Capacity(r, n, cur.get(r)) for r, n in sorted(ev.misc_capacity.items())]


def type_names(arch: str) -> list[str]:
    """The VM type names ``--type`` accepts on ``arch``."""
    return [n for _, n in sorted(tables.VM_TYPE_TABLES.get(arch, {0: "DEFAULT"}).items())]
