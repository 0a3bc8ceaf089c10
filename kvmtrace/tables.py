"""Code tables: the single place where kernel numbers get their names.

Every table cites the uapi header it mirrors. Unknown values never raise:
they render as ``unknown:N`` so nothing counted is lost in decoding.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Mapping

# include/uapi/linux/kvm.h: #define KVMIO 0xAE, KVM_*: _IO(KVMIO, nr)
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
# include/uapi/linux/kvm.h (upstream since 6.8). The 2023 TDX v12 series used 227.
KVM_CAP_VM_TYPES = 235

# arch/x86/include/uapi/asm/kvm.h: KVM_X86_*_VM
_X86_VM_TYPES: Mapping[int, str] = {
    0: "DEFAULT",
    1: "SW_PROTECTED",
    2: "SEV",
    3: "SEV_ES",
    4: "SNP",
    5: "TDX",
}
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
