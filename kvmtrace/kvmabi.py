"""KVM's userspace ABI numbers: ioctl commands, and how KVM_RUN returns to userspace.

Every value mirrors include/uapi/linux/kvm.h (and arch/x86/include/uapi/asm/kvm.h for
the x86 structs' sizes); the ioctl numbers were printed by a C program compiled against
Debian 13's linux-libc-dev 6.12 (``printf("%#x", KVM_SET_USER_MEMORY_REGION2)`` and so
on), and tests/test_kvmabi.py recomputes each from _IOC(direction, 0xAE, nr, size).
Unknown values never raise: they render as ``unknown:0x…`` (a command) or
``unknown:N`` (a reason), so nothing counted is lost in decoding.
"""

from __future__ import annotations

from collections.abc import Mapping

# include/uapi/asm-generic/ioctl.h: _IOC(dir, type, nr, size)
IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2
KVMIO = 0xAE


def ioc(direction: int, nr: int, size: int = 0) -> int:
    """_IOC(direction, KVMIO, nr, size): the ioctl command number."""
    return direction << 30 | size << 16 | KVMIO << 8 | nr


def is_kvm_ioctl(cmd: int) -> bool:
    """Whether ``cmd`` is in KVM's ioctl space (its type byte is KVMIO)."""
    return cmd >> 8 & 0xFF == KVMIO


# System ioctls on /dev/kvm, _IO(KVMIO, nr).
KVM_GET_API_VERSION = ioc(IOC_NONE, 0x00)
KVM_CREATE_VM = ioc(IOC_NONE, 0x01)
KVM_CHECK_EXTENSION = ioc(IOC_NONE, 0x03)
# include/uapi/linux/kvm.h (upstream since 6.8). The 2023 TDX v12 series used 227.
KVM_CAP_VM_TYPES = 235
# _IOWR(KVMIO, 0xba, unsigned long). x86 only (SEV and TDX): the confidential launch.
KVM_MEMORY_ENCRYPT_OP = ioc(IOC_READ | IOC_WRITE, 0xBA, 8)
# _IO(KVMIO, 0x80): run a vCPU. Traced through kvm:kvm_userspace_exit, not the ioctl.
KVM_RUN = ioc(IOC_NONE, 0x80)

# The ioctls of a VM start, by command number: their structs have the same size on
# every 64-bit architecture (or none), so the numbers are the same there.
_GENERIC: Mapping[int, str] = {
    KVM_GET_API_VERSION: "KVM_GET_API_VERSION",
    KVM_CREATE_VM: "KVM_CREATE_VM",
    KVM_CHECK_EXTENSION: "KVM_CHECK_EXTENSION",
    0x0000AE04: "KVM_GET_VCPU_MMAP_SIZE",
    0x0000AE41: "KVM_CREATE_VCPU",
    0x4020AE46: "KVM_SET_USER_MEMORY_REGION",
    0x40A0AE49: "KVM_SET_USER_MEMORY_REGION2",
    0x0000AE60: "KVM_CREATE_IRQCHIP",
    0x4008AE6A: "KVM_SET_GSI_ROUTING",
    0x4020AE76: "KVM_IRQFD",
    0x4040AE79: "KVM_IOEVENTFD",
    KVM_RUN: "KVM_RUN",
    0x4004AE8B: "KVM_SET_SIGNAL_MASK",
    0x4004AE99: "KVM_SET_MP_STATE",
    0x4068AEA3: "KVM_ENABLE_CAP",
    0x4010AEAB: "KVM_GET_ONE_REG",
    0x4010AEAC: "KVM_SET_ONE_REG",
    0x0000AECE: "KVM_GET_STATS_FD",
    0xC00CAEE0: "KVM_CREATE_DEVICE",
    0x4020AED2: "KVM_SET_MEMORY_ATTRIBUTES",
    0xC040AED4: "KVM_CREATE_GUEST_MEMFD",
    0xC040AED5: "KVM_PRE_FAULT_MEMORY",
}
# x86-64 only: the structs are x86's (arch/x86/include/uapi/asm/kvm.h).
_X86: Mapping[int, str] = {
    0xC008AE05: "KVM_GET_SUPPORTED_CPUID",
    0x0000AE47: "KVM_SET_TSS_ADDR",
    0x4008AE48: "KVM_SET_IDENTITY_MAP_ADDR",
    0x4040AE77: "KVM_CREATE_PIT2",
    0x4030AE7B: "KVM_SET_CLOCK",
    0x4090AE82: "KVM_SET_REGS",
    0x4138AE84: "KVM_SET_SREGS",
    0x4008AE89: "KVM_SET_MSRS",
    0x4008AE90: "KVM_SET_CPUID2",
    0x41A0AE8D: "KVM_SET_FPU",
    0x4400AE8F: "KVM_SET_LAPIC",
    0x4048AE9B: "KVM_SET_GUEST_DEBUG",
    0x4008AE9C: "KVM_X86_SETUP_MCE",
    0x4040AEA0: "KVM_SET_VCPU_EVENTS",
    0x0000AEA2: "KVM_SET_TSC_KHZ",
    0x5000AEA5: "KVM_SET_XSAVE",
    0x4188AEA7: "KVM_SET_XCRS",
    0x4020AEB2: "KVM_SET_PMU_EVENT_FILTER",
    KVM_MEMORY_ENCRYPT_OP: "KVM_MEMORY_ENCRYPT_OP",
    0x8010AEBB: "KVM_MEMORY_ENCRYPT_REG_REGION",
    0x8010AEBC: "KVM_MEMORY_ENCRYPT_UNREG_REGION",
    0x4080AEBF: "KVM_SET_NESTED_STATE",
    0x4140AECD: "KVM_SET_SREGS2",
}
# The memory setup of a confidential (or software-protected) VM: guest_memfd, the
# regions backed by it, and the private/shared attributes.
MEMORY_SETUP = frozenset({"KVM_CREATE_GUEST_MEMFD", "KVM_SET_USER_MEMORY_REGION",
                          "KVM_SET_USER_MEMORY_REGION2", "KVM_SET_MEMORY_ATTRIBUTES"})


def ioctl_name(cmd: int, arch: str = "x86_64") -> str:
    """KVM_SET_CPUID2 for 0x4008ae90 on x86-64; ``unknown:0x…`` for a command not in
    the tables (another architecture's struct size, a newer kernel's ioctl)."""
    cmd &= 0xFFFFFFFF
    name = _GENERIC.get(cmd) or (_X86.get(cmd) if arch == "x86_64" else None)
    return name or f"unknown:{cmd:#x}"


# include/uapi/linux/kvm.h: KVM_EXIT_* (struct kvm_run.exit_reason).
EXIT_REASONS: Mapping[int, str] = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
    7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 11: "SET_TPR",
    12: "TPR_ACCESS", 13: "S390_SIEIC", 14: "S390_RESET", 15: "DCR", 16: "NMI",
    17: "INTERNAL_ERROR", 18: "OSI", 19: "PAPR_HCALL", 20: "S390_UCONTROL", 21: "WATCHDOG",
    22: "S390_TSCH", 23: "EPR", 24: "SYSTEM_EVENT", 25: "S390_STSI", 26: "IOAPIC_EOI",
    27: "HYPERV", 28: "ARM_NISV", 29: "X86_RDMSR", 30: "X86_WRMSR", 31: "DIRTY_RING_FULL",
    32: "AP_RESET_HOLD", 33: "X86_BUS_LOCK", 34: "XEN", 35: "RISCV_SBI", 36: "RISCV_CSR",
    37: "NOTIFY", 38: "LOONGARCH_IOCSR", 39: "MEMORY_FAULT", 40: "TDX", 41: "ARM_SEA",
    42: "ARM_LDST64B", 43: "SNP_REQ_CERTS",
}
# The exits that end a start when they are what its first KVM_RUN returns with: the
# vCPU could not enter (FAIL_ENTRY), KVM could not go on (INTERNAL_ERROR), the guest
# triple-faulted (SHUTDOWN), the guest or KVM ended the VM (SYSTEM_EVENT: crash, SEV
# termination, a fatal TDX error), or KVM could not map the guest's memory (MEMORY_FAULT).
# Every other exit is a vCPU that ran: the start ended well.
ENDING_EXITS = frozenset({8, 9, 17, 24, 39})
# KVM_INTERNAL_ERROR_* (kvm_run.internal.suberror) and KVM_SYSTEM_EVENT_*
# (kvm_run.system_event.type): named in reports when a VMM says them; the kernel's
# kvm:kvm_userspace_exit carries only the reason and the errno.
INTERNAL_ERRORS: Mapping[int, str] = {1: "EMULATION", 2: "SIMUL_EX", 3: "DELIVERY_EV",
                                      4: "UNEXPECTED_EXIT_REASON"}
SYSTEM_EVENTS: Mapping[int, str] = {1: "SHUTDOWN", 2: "RESET", 3: "CRASH", 4: "WAKEUP",
                                    5: "SUSPEND", 6: "SEV_TERM", 7: "TDX_FATAL"}


def exit_reason_name(reason: int) -> str:
    """FAIL_ENTRY for 9, ``unknown:N`` otherwise."""
    return EXIT_REASONS.get(reason, f"unknown:{reason}")
