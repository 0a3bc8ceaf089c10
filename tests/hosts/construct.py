"""Build the CONSTRUCTED host fixtures of tests/hosts/ (hosts we cannot run on).

Each is the facts of the Debian 13 guest captured by the kernel tier
(tests/kernels/debian13-6.12-guest-captured.json: kernel, symbols, tracefs) with the
host's KVM answer and readiness evidence replaced by what such a host shows, written
from the documented formats: /proc/cpuinfo flags (arch/x86/include/asm/cpufeatures.h),
CPUID 0x8000001F (AMD APM vol. 3), /sys/module/kvm_amd|kvm_intel/parameters, the misc
cgroup's misc.capacity / misc.current (Documentation/admin-guide/cgroup-v2.rst), and
the kernel's own log lines (drivers/crypto/ccp/sev-dev.c, arch/x86/kvm/svm/sev.c,
arch/x86/virt/vmx/tdx/tdx.c). They are made by hand, not captured: the file names
start with "constructed-". Run ``python3 tests/hosts/construct.py`` to rewrite them;
tests/test_readiness.py checks that doing so changes nothing.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE = HERE.parent / "kernels" / "debian13-6.12-guest-captured.json"

DEFAULT, SEV, SEV_ES, SNP = 1, 1 << 2, 1 << 3, 1 << 4

GENOA = {"cpu_vendor": "AuthenticAMD", "cpu_family": 25, "cpu_model": 17,
         "cpu_model_name": "AMD EPYC 9654 96-Core Processor"}
SAPPHIRE_RAPIDS = {"cpu_vendor": "GenuineIntel", "cpu_family": 6, "cpu_model": 143,
                   "cpu_model_name": "Intel(R) Xeon(R) Platinum 8480+"}
AMD_PARAMS = {"kvm.tdp_mmu": "Y", "kvm.enable_virt_at_load": "Y", "kvm_amd.npt": "1",
              "kvm_amd.sev": "Y", "kvm_amd.sev_es": "Y", "kvm_amd.sev_snp": "Y"}
INTEL_PARAMS = {"kvm.tdp_mmu": "Y", "kvm.enable_virt_at_load": "Y", "kvm_intel.ept": "Y",
                "kvm_intel.tdx": "Y"}
CONFIG = {"CONFIG_KVM_SW_PROTECTED_VM": "n", "CONFIG_KVM_AMD_SEV": "y",
          "CONFIG_INTEL_TDX_HOST": "y", "CONFIG_KVM_INTEL_TDX": "y",
          "CONFIG_AMD_MEM_ENCRYPT": "y", "CONFIG_CRYPTO_DEV_SP_PSP": "y"}
SNP_DMESG = [
    "[    2.104519] SEV-SNP: RMP table physical range [0x0000000088a00000 - 0x00000000a8dfffff]",
    "[    9.870123] ccp 0000:42:00.1: sev enabled",
    "[    9.934511] ccp 0000:42:00.1: SEV-SNP API:1.55 build:37",
    "[   10.112980] ccp 0000:42:00.1: SEV API:1.55 build:37",
    "[   11.287634] kvm_amd: SEV enabled (ASIDs 100 - 1006)",
    "[   11.287640] kvm_amd: SEV-ES enabled (ASIDs 1 - 99)",
    "[   11.287642] kvm_amd: SEV-SNP enabled (ASIDs 1 - 99)",
]


def _amd_ready() -> dict:
    return {**GENOA, "cpu_flags": ["svm", "sme", "sev", "sev_es", "sev_snp", "npt"],
            "cpuid_8000001f": 0x0101FD3F, "cpuid_error": None,
            "modules": ["kvm", "kvm_amd"], "params": dict(AMD_PARAMS), "dev_sev": True,
            "misc_capacity": {"sev": 907, "sev_es": 99},
            "misc_current": {"sev": 3, "sev_es": 2}, "misc_error": None,
            "kernel_config": dict(CONFIG), "kernel_config_error": None,
            "cmdline": "", "dmesg": list(SNP_DMESG), "dmesg_error": None}


def _intel_tdx() -> dict:
    return {**SAPPHIRE_RAPIDS, "cpu_flags": ["vmx", "ept", "tdx_host_platform"],
            "cpuid_8000001f": None, "cpuid_error": "not an AMD CPU: CPUID 0x8000001F not read",
            "modules": ["kvm", "kvm_intel"], "params": dict(INTEL_PARAMS), "dev_sev": False,
            "misc_capacity": {"tdx": 63}, "misc_current": {"tdx": 0}, "misc_error": None,
            "kernel_config": dict(CONFIG), "kernel_config_error": None, "cmdline": "",
            "dmesg": ["[    1.934510] virt/tdx: BIOS enabled: private KeyID range [64, 128)",
                      "[    1.934517] virt/tdx: Disable ACPI S3. Turn off TDX in the BIOS to use "
                      "ACPI S3.",
                      "[   12.664031] virt/tdx: TDX module: attributes 0x0, vendor_id 0x8086, "
                      "major_version 1, minor_version 5, build_date 20240129, build_num 698",
                      "[   12.981277] virt/tdx: 1034220 KB allocated for PAMT",
                      "[   12.981281] virt/tdx: module initialized"],
            "dmesg_error": None}


def hosts() -> dict[str, tuple[dict, int]]:
    """file stem -> (evidence, KVM_CAP_VM_TYPES mask)."""
    out: dict[str, tuple[dict, int]] = {}
    ready = _amd_ready()
    out["constructed-amd-snp-ready"] = (ready, DEFAULT | SEV | SEV_ES | SNP)

    bios = _amd_ready()  # SNP left off in the BIOS: the kernel clears sev_snp
    bios["cpu_flags"].remove("sev_snp")
    bios["params"]["kvm_amd.sev_snp"] = "N"
    bios["dmesg"] = [ln for ln in SNP_DMESG if "SNP" not in ln]
    out["constructed-amd-snp-off-in-bios"] = (bios, DEFAULT | SEV | SEV_ES)

    old = _amd_ready()  # firmware below the kernel's SNP minimum (1.51)
    old["params"]["kvm_amd.sev_snp"] = "N"
    old["dmesg"] = [
        "[    2.104519] SEV-SNP: RMP table physical range [0x0000000088a00000 - "
        "0x00000000a8dfffff]",
        "[    9.934511] ccp 0000:42:00.1: SEV-SNP support requires firmware version >= 1:51",
        "[   10.112980] ccp 0000:42:00.1: SEV API:1.49 build:5",
        "[   11.287634] kvm_amd: SEV enabled (ASIDs 100 - 1006)",
        "[   11.287640] kvm_amd: SEV-ES enabled (ASIDs 1 - 99)"]
    out["constructed-amd-sev-firmware-too-old"] = (old, DEFAULT | SEV | SEV_ES)

    full = _amd_ready()  # every ASID in use by running guests
    full["misc_current"] = {"sev": 907, "sev_es": 99}
    out["constructed-amd-asids-exhausted"] = (full, DEFAULT | SEV | SEV_ES | SNP)

    odd = _amd_ready()  # the mask and the layers disagree, both ways
    odd["params"]["kvm_amd.sev_es"] = "N"  # reads off, yet the mask offers SEV_ES
    out["constructed-amd-mask-disagrees"] = (odd, DEFAULT | SEV | SEV_ES)  # and lacks SNP

    tdx = _intel_tdx()
    out["constructed-intel-tdx-ready"] = (tdx, DEFAULT | 1 << 5)

    off = _intel_tdx()  # kvm_intel.tdx=N: KVM never initialises the module
    off["params"]["kvm_intel.tdx"] = "N"
    off["misc_capacity"], off["misc_current"] = {}, {}
    off["dmesg"] = off["dmesg"][:2]
    out["constructed-intel-tdx-param-off"] = (off, DEFAULT)

    failed = _intel_tdx()  # the module failed to initialise: KVM turns tdx off
    failed["params"]["kvm_intel.tdx"] = "N"
    failed["misc_capacity"], failed["misc_current"] = {}, {}
    failed["dmesg"] = [
        *failed["dmesg"][:2],
        "[   12.664031] virt/tdx: SEAMCALL (0x0000000000000021) failed: 0xc000010000000000",
        "[   12.664040] virt/tdx: module initialization failed (-5)"]
    out["constructed-intel-tdx-module-failed"] = (failed, DEFAULT)

    guest = _intel_tdx()  # a cloud VM: no nested virtualization, no KVM at all
    guest.update(cpu_flags=["hypervisor"], modules=[], params={}, misc_capacity={},
                 misc_current={}, dmesg=["[    0.000000] Hypervisor detected: KVM"])
    out["constructed-cloud-guest"] = (guest, -1)
    return out


def build() -> dict[str, dict]:
    base = json.loads(BASE.read_text())
    out = {}
    for stem, (evidence, mask) in hosts().items():
        facts = copy.deepcopy(base)
        facts["is_root"] = True
        facts["evidence"] = evidence
        vendor = [m for m in evidence["modules"] if m in ("kvm_amd", "kvm_intel")]
        facts["vendor_modules"] = vendor
        if mask < 0:
            facts["kvm"] = {"present": False, "api_version": None, "vm_types_mask": None,
                            "error": "/dev/kvm does not exist (KVM not loaded)"}
        else:
            facts["kvm"] = {"present": True, "api_version": 12, "vm_types_mask": mask,
                            "error": None}
        out[stem] = facts
    return out


def text(facts: dict) -> str:
    return json.dumps(facts, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    for stem, facts in build().items():
        (HERE / f"{stem}.json").write_text(text(facts))
        print(f"wrote tests/hosts/{stem}.json", file=sys.stderr)
