"""kvmtrace.kvmabi: KVM's ioctl numbers and KVM_RUN exit reasons, against the uapi
encoding (include/uapi/asm-generic/ioctl.h) and the sizes of the uapi structs."""

from __future__ import annotations

import pytest

from kvmtrace import kvmabi

N, W, R, RW = 0, kvmabi.IOC_WRITE, kvmabi.IOC_READ, kvmabi.IOC_READ | kvmabi.IOC_WRITE


# (name, direction, nr, size of its argument on x86-64) as include/uapi/linux/kvm.h
# declares them; the sizes are the uapi structs' (kvm_userspace_memory_region2: 4 + 4
# + 8 * 4 + 4 + 4 + 14 * 8 = 160; kvm_create_guest_memfd: 8 + 8 + 6 * 8 = 64; ...).
@pytest.mark.parametrize(("name", "direction", "nr", "size"), [
    ("KVM_GET_API_VERSION", N, 0x00, 0),
    ("KVM_CREATE_VM", N, 0x01, 0),
    ("KVM_CHECK_EXTENSION", N, 0x03, 0),
    ("KVM_CREATE_VCPU", N, 0x41, 0),
    ("KVM_SET_USER_MEMORY_REGION", W, 0x46, 32),
    ("KVM_SET_USER_MEMORY_REGION2", W, 0x49, 160),
    ("KVM_RUN", N, 0x80, 0),
    ("KVM_SET_CPUID2", W, 0x90, 8),
    ("KVM_ENABLE_CAP", W, 0xA3, 104),
    ("KVM_MEMORY_ENCRYPT_OP", RW, 0xBA, 8),
    ("KVM_SET_MEMORY_ATTRIBUTES", W, 0xD2, 32),
    ("KVM_CREATE_GUEST_MEMFD", RW, 0xD4, 64),
    ("KVM_SET_SREGS", W, 0x84, 312),
])
def test_ioctl_numbers_are_the_uapi_encoding(name, direction, nr, size):
    cmd = kvmabi.ioc(direction, nr, size)
    assert kvmabi.ioctl_name(cmd, "x86_64") == name
    assert kvmabi.is_kvm_ioctl(cmd)


def test_the_constants_the_loader_defines():
    assert kvmabi.KVM_CREATE_VM == 0xAE01 and kvmabi.KVM_CHECK_EXTENSION == 0xAE03
    assert kvmabi.KVM_MEMORY_ENCRYPT_OP == 0xC008AEBA and kvmabi.KVM_RUN == 0xAE80
    assert kvmabi.KVM_CAP_VM_TYPES == 235


@pytest.mark.parametrize(("cmd", "arch", "name"), [
    (0x4008AE90, "x86_64", "KVM_SET_CPUID2"),
    (0x4008AE90, "aarch64", "unknown:0x4008ae90"),  # x86's struct: not arm64's
    (0xC040AED4, "aarch64", "KVM_CREATE_GUEST_MEMFD"),  # same size everywhere
    (0x0000AEFF, "x86_64", "unknown:0xaeff"),
    (0xFFFFFFFFC040AED4, "x86_64", "KVM_CREATE_GUEST_MEMFD"),  # a sign-extended u32
])
def test_ioctl_names_and_unknown_commands(cmd, arch, name):
    assert kvmabi.ioctl_name(cmd, arch) == name


def test_only_kvmio_is_kvm():
    assert not kvmabi.is_kvm_ioctl(0x541B)  # FIONREAD
    assert not kvmabi.is_kvm_ioctl(0xAF01)  # vhost's VHOST_SET_OWNER
    assert kvmabi.MEMORY_SETUP <= set(kvmabi._GENERIC.values())


@pytest.mark.parametrize(("reason", "name"), [
    (2, "IO"), (8, "SHUTDOWN"), (9, "FAIL_ENTRY"), (17, "INTERNAL_ERROR"),
    (24, "SYSTEM_EVENT"), (39, "MEMORY_FAULT"), (43, "SNP_REQ_CERTS"), (44, "unknown:44"),
])
def test_exit_reasons(reason, name):
    assert kvmabi.exit_reason_name(reason) == name


def test_the_exits_that_end_a_start():
    assert {kvmabi.exit_reason_name(r) for r in kvmabi.ENDING_EXITS} == {
        "SHUTDOWN", "FAIL_ENTRY", "INTERNAL_ERROR", "SYSTEM_EVENT", "MEMORY_FAULT"}
