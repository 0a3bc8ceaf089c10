"""Code tables: the single place where kernel numbers get their names.

Every table cites the uapi header it mirrors. Unknown values never raise:
they render as ``unknown:N`` so nothing counted is lost in decoding.
"""

from __future__ import annotations

import errno as _errno
import signal
from collections.abc import Mapping

# KVM's ioctl numbers and KVM_RUN's exit reasons: kvmtrace.kvmabi.

# arch/x86/include/uapi/asm/kvm.h: KVM_X86_*_VM
_X86_VM_TYPES: Mapping[int, str] = {0: "DEFAULT", 1: "SW_PROTECTED", 2: "SEV", 3: "SEV_ES",
                                     4: "SNP", 5: "TDX"}
# arch/s390/include/uapi/asm/kvm.h: KVM_VM_S390_UCONTROL
_S390_VM_TYPES: Mapping[int, str] = {0: "DEFAULT", 1: "UCONTROL"}
# arch/powerpc/include/uapi/asm/kvm.h: KVM_VM_PPC_HV / KVM_VM_PPC_PR
_PPC_VM_TYPES: Mapping[int, str] = {0: "DEFAULT", 1: "PPC_HV", 2: "PPC_PR"}
# arch/mips/include/uapi/asm/kvm.h: KVM_VM_MIPS_AUTO / _TE / _VZ
_MIPS_VM_TYPES: Mapping[int, str] = {0: "AUTO", 1: "TE", 2: "VZ"}
# riscv and loongarch accept only 0.
_ZERO_ONLY: Mapping[int, str] = {0: "DEFAULT"}

# arch/arm64/include/uapi/asm/kvm.h: KVM_VM_TYPE_ARM_IPA_SIZE_MASK 0xffULL;
# bits 7:0 carry the guest IPA size in bits, 0 meaning the default 40 bits.
ARM64_IPA_SIZE_MASK = 0xFF

VM_TYPE_TABLES: Mapping[str, Mapping[int, str]] = {
    "x86_64": _X86_VM_TYPES,
    "s390x": _S390_VM_TYPES,
    "ppc64le": _PPC_VM_TYPES,
    "ppc64": _PPC_VM_TYPES,
    "mips64": _MIPS_VM_TYPES,
    "riscv64": _ZERO_ONLY,
    "loongarch64": _ZERO_ONLY,
}

# Short explanations of what each x86 type is, used in reports.
X86_VM_TYPE_TITLES: Mapping[int, str] = {
    0: "default (non-confidential) VM",
    1: "software-protected VM (guest_memfd, no hardware encryption)",
    2: "AMD SEV: encrypted memory",
    3: "AMD SEV-ES: encrypted memory and register state",
    4: "AMD SEV-SNP: encrypted memory with integrity protection",
    5: "Intel TDX trust domain",
}


def unknown(value: int) -> str:
    return f"unknown:{value}"


def vm_type_name(vm_type: int, arch: str = "x86_64") -> str:
    """Name of a KVM_CREATE_VM type argument on ``arch``; ``unknown:N`` otherwise."""
    if arch in ("aarch64", "arm64"):
        if vm_type & ~ARM64_IPA_SIZE_MASK:
            return unknown(vm_type)
        ipa = vm_type & ARM64_IPA_SIZE_MASK
        return "DEFAULT" if ipa == 0 else f"IPA_{ipa}"
    table = VM_TYPE_TABLES.get(arch)
    if table is None:
        return unknown(vm_type)
    return table.get(vm_type, unknown(vm_type))


def vm_type_title(vm_type: int, arch: str = "x86_64") -> str | None:
    """What a known VM type is, in a few words (x86 only), for reports."""
    if arch != "x86_64" or vm_type_name(vm_type, arch).startswith("unknown"):
        return None
    return X86_VM_TYPE_TITLES.get(vm_type)


def vm_type_number(name: str, arch: str = "x86_64") -> int | None:
    """The VM type named ``name`` on ``arch`` (vm_type_name's inverse), None if none."""
    table = VM_TYPE_TABLES.get(arch, {})
    return next((n for n, known in table.items() if known == name), None)


def vm_types_in_mask(mask: int) -> list[int]:
    """KVM_CAP_VM_TYPES: bit n set means VM type n is supported."""
    return [bit for bit in range(64) if mask >> bit & 1]


def supported_vm_types(mask: int) -> list[int]:
    """The types a host accepts, from its KVM_CAP_VM_TYPES answer: a kernel without the
    capability answers 0 and accepts only type 0."""
    return [0] if mask == 0 else vm_types_in_mask(mask)


def errno_name(err: int) -> str:
    """Symbolic name of a positive errno (EINVAL), ``unknown:N`` otherwise."""
    return _errno.errorcode.get(err, unknown(err))


def escape_comm(raw: bytes) -> str:
    """A task comm (up to 16 bytes, NUL-padded) as printable text.

    Non-printable and non-ASCII bytes become ``\\xNN`` so a label or a terminal
    line can never be broken by a hostile process name.
    """
    raw = raw.split(b"\0", 1)[0]
    out = []
    for byte in raw:
        if 0x20 <= byte < 0x7F and byte != 0x5C:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


# --- The confidential launch: KVM_MEMORY_ENCRYPT_OP and what its answers mean ---

# enum sev_cmd_id, arch/x86/include/uapi/asm/kvm.h (include/uapi/linux/kvm.h before it
# moved to the x86 header). The id of struct kvm_sev_cmd; the enum counts up from 0.
SEV_COMMANDS: Mapping[int, str] = {
    0: "INIT",
    1: "ES_INIT",
    2: "LAUNCH_START",
    3: "LAUNCH_UPDATE_DATA",
    4: "LAUNCH_UPDATE_VMSA",
    5: "LAUNCH_SECRET",
    6: "LAUNCH_MEASURE",
    7: "LAUNCH_FINISH",
    8: "SEND_START",
    9: "SEND_UPDATE_DATA",
    10: "SEND_UPDATE_VMSA",
    11: "SEND_FINISH",
    12: "RECEIVE_START",
    13: "RECEIVE_UPDATE_DATA",
    14: "RECEIVE_UPDATE_VMSA",
    15: "RECEIVE_FINISH",
    16: "GUEST_STATUS",
    17: "DBG_DECRYPT",
    18: "DBG_ENCRYPT",
    19: "CERT_EXPORT",
    20: "GET_ATTESTATION_REPORT",
    21: "SEND_CANCEL",
    22: "INIT2",
    100: "SNP_LAUNCH_START",
    101: "SNP_LAUNCH_UPDATE",
    102: "SNP_LAUNCH_FINISH",
    # Added after 6.19 (kvm-x86 "svm-6.20" pull, 2026).
    103: "SNP_ENABLE_REQ_CERTS",
}

# enum kvm_tdx_cmd_id, arch/x86/include/uapi/asm/kvm.h (6.16+): the id of struct kvm_tdx_cmd.
TDX_COMMANDS: Mapping[int, str] = {
    0: "CAPABILITIES",
    1: "INIT_VM",
    2: "INIT_VCPU",
    3: "INIT_MEM_REGION",
    4: "FINALIZE_VM",
    5: "GET_CPUID",
}
# The sub-command ids of each command set (encrypt_family()'s "SEV" and "TDX").
_ENCRYPT_COMMANDS: Mapping[str, Mapping[int, str]] = {"SEV": SEV_COMMANDS, "TDX": TDX_COMMANDS}

# enum sev_ret_code, include/uapi/linux/psp-sev.h: the PSP firmware status KVM copies into
# kvm_sev_cmd.error (a __u32). 3 is spelled SEV_RET_INAVLID_CONFIG there, with
# SEV_RET_INVALID_CONFIG as its alias; 0x1E and 0x34 are unassigned.
SEV_STATUSES: Mapping[int, str] = {
    -1: "NO_FW_CALL",  # not a firmware code: the kernel never reached the firmware
    0x00: "SUCCESS",
    0x01: "INVALID_PLATFORM_STATE",
    0x02: "INVALID_GUEST_STATE",
    0x03: "INVALID_CONFIG",
    0x04: "INVALID_LEN",
    0x05: "ALREADY_OWNED",
    0x06: "INVALID_CERTIFICATE",
    0x07: "POLICY_FAILURE",
    0x08: "INACTIVE",
    0x09: "INVALID_ADDRESS",
    0x0A: "BAD_SIGNATURE",
    0x0B: "BAD_MEASUREMENT",
    0x0C: "ASID_OWNED",
    0x0D: "INVALID_ASID",
    0x0E: "WBINVD_REQUIRED",
    0x0F: "DFFLUSH_REQUIRED",
    0x10: "INVALID_GUEST",
    0x11: "INVALID_COMMAND",
    0x12: "ACTIVE",
    0x13: "HWSEV_RET_PLATFORM",
    0x14: "HWSEV_RET_UNSAFE",
    0x15: "UNSUPPORTED",
    0x16: "INVALID_PARAM",
    0x17: "RESOURCE_LIMIT",
    0x18: "SECURE_DATA_INVALID",
    0x19: "INVALID_PAGE_SIZE",
    0x1A: "INVALID_PAGE_STATE",
    0x1B: "INVALID_MDATA_ENTRY",
    0x1C: "INVALID_PAGE_OWNER",
    0x1D: "AEAD_OFLOW",
    0x1F: "EXIT_RING_BUFFER",
    0x20: "RMP_INIT_REQUIRED",
    0x21: "BAD_SVN",
    0x22: "BAD_VERSION",
    0x23: "SHUTDOWN_REQUIRED",
    0x24: "UPDATE_FAILED",
    0x25: "RESTORE_REQUIRED",
    0x26: "RMP_INITIALIZATION_FAILED",
    0x27: "INVALID_KEY",
    # The SEV-TIO era additions.
    0x28: "SHUTDOWN_INCOMPLETE",
    0x30: "INCORRECT_BUFFER_LENGTH",
    0x31: "EXPAND_BUFFER_LENGTH_REQUEST",
    0x32: "SPDM_REQUEST",
    0x33: "SPDM_ERROR",
    0x35: "SEV_STATUS_ERR_IN_DEV_CONN",
    0x36: "SEV_STATUS_INVALID_DEV_CTX",
    0x37: "SEV_STATUS_INVALID_TDI_CTX",
    0x38: "SEV_STATUS_INVALID_TDI",
    0x39: "SEV_STATUS_RECLAIM_REQUIRED",
    0x3A: "IN_USE",
    0x3B: "SEV_STATUS_INVALID_DEV_STATE",
    0x3C: "SEV_STATUS_INVALID_TDI_STATE",
    0x3D: "SEV_STATUS_DEV_CERT_CHANGED",
    0x3E: "SEV_STATUS_RESYNC_REQ",
    0x3F: "SEV_STATUS_RESPONSE_TOO_LARGE",
}

# TDX module completion status of a SEAMCALL, which KVM copies into kvm_tdx_cmd.hw_error
# (a __u64). The class is in bits 63:32 (TDX_SEAMCALL_STATUS_MASK); bits 31:0 carry detail
# such as the operand id. Keyed by the upper 32 bits of the codes in
# arch/x86/include/asm/shared/tdx_errno.h (formerly arch/x86/kvm/vmx/tdx_errno.h) and
# TDX_SUCCESS / TDX_RND_NO_ENTROPY in arch/x86/include/asm/tdx.h.
TDX_SEAMCALL_STATUS_MASK = 0xFFFFFFFF00000000
TDX_STATUSES: Mapping[int, str] = {
    0x00000000: "SUCCESS",
    0x40000001: "NON_RECOVERABLE_VCPU",
    0x40000002: "NON_RECOVERABLE_TD",
    0x60000005: "NON_RECOVERABLE_TD_NON_ACCESSIBLE",
    0x60000007: "NON_RECOVERABLE_TD_WRONG_APIC_MODE",
    0x80000003: "INTERRUPTED_RESUMABLE",
    0x80000202: "SYS_BUSY",
    0xC0000100: "OPERAND_INVALID",
    0x80000200: "OPERAND_BUSY",
    0x80000201: "PREVIOUS_TLB_EPOCH_BUSY",
    0x80000203: "RND_NO_ENTROPY",
    0xC0000300: "PAGE_METADATA_INCORRECT",
    0x80000702: "VCPU_NOT_ASSOCIATED",
    0x80000800: "KEY_GENERATION_FAILED",
    0xC0000811: "KEY_STATE_INCORRECT",
    0x00000815: "KEY_CONFIGURED",
    0x00000821: "NO_HKID_READY_TO_WBCACHE",
    0x80000824: "FLUSHVP_NOT_DONE",
    0xC0000B00: "EPT_WALK_FAILED",
    0xC0000B0D: "EPT_ENTRY_STATE_INCORRECT",
    0xC0000C02: "METADATA_FIELD_NOT_READABLE",
}
# arch/x86/include/asm/tdx.h: errors the kernel makes up when the SEAMCALL itself failed
# (TDX_SW_ERROR = bit 63 | bits 47:40), matched on the whole 64-bit value.
TDX_SW_ERRORS: Mapping[int, str] = {
    0x8000FF00FFFF0000: "SEAMCALL_VMFAILINVALID",
    0x8000FF000000000D: "SEAMCALL_GP",  # X86_TRAP_GP
    0x8000FF0000000006: "SEAMCALL_UD",  # X86_TRAP_UD
}


def encrypt_family(vm_type: int, arch: str = "x86_64") -> str:
    """Which command set KVM_MEMORY_ENCRYPT_OP speaks on a VM of this type: "TDX" for a
    TDX VM, "SEV" for any other x86 VM (legacy SEV rides on a DEFAULT VM), "none" off x86."""
    if arch != "x86_64":
        return "none"
    return "TDX" if vm_type == 5 else "SEV"


def encrypt_command_name(family: str, cmd: int) -> str:
    """Name of a KVM_MEMORY_ENCRYPT_OP sub-command id, ``unknown:N`` otherwise."""
    return _ENCRYPT_COMMANDS.get(family, {}).get(cmd, unknown(cmd))


def firmware_status_name(family: str, status: int) -> str:
    """Name of the firmware status a KVM_MEMORY_ENCRYPT_OP left behind.

    SEV: the 32-bit PSP code in ``kvm_sev_cmd.error``. TDX: the 64-bit ``hw_error``,
    named by its status class (upper 32 bits); unknown ones render in hex.
    """
    if family == "SEV":
        signed = status - (1 << 32) if 1 << 31 <= status < 1 << 32 else status
        return SEV_STATUSES.get(status) or SEV_STATUSES.get(signed) or unknown(status)
    if family == "TDX":
        if status in TDX_SW_ERRORS:
            return TDX_SW_ERRORS[status]
        if 0 <= status < 1 << 64 and (status & TDX_SEAMCALL_STATUS_MASK) >> 32 in TDX_STATUSES:
            return TDX_STATUSES[status >> 32]
        return f"unknown:{status:#x}"
    return unknown(status)


def firmware_status_label(family: str, status: int, failed: bool) -> str:
    """firmware_status_name(), except "none" for a failed call that left no status (0):
    KVM refused it before the firmware was asked (ENOTTY, EINVAL, ...)."""
    return "none" if failed and status == 0 else firmware_status_name(family, status)


# --- A process's end, as do_exit and wait(2) encode it ---

def exit_status(code: int) -> tuple[str, int]:
    """Decode a ``do_exit`` code / wait status: ("exited", status) or ("killed", signal)."""
    if code & 0x7F == 0:
        return ("exited", code >> 8 & 0xFF)
    return ("killed", code & 0x7F)


def signal_name(sig: int) -> str:
    """SIGTERM for 15, ``unknown:N`` for a number this host's Python does not name."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        return unknown(sig)
