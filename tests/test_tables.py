import pytest

from kvmtrace import tables


@pytest.mark.parametrize(("arch", "vm_type", "name"), [
    ("x86_64", 0, "DEFAULT"),
    ("x86_64", 1, "SW_PROTECTED"),
    ("x86_64", 2, "SEV"),
    ("x86_64", 3, "SEV_ES"),
    ("x86_64", 4, "SNP"),
    ("x86_64", 5, "TDX"),
    ("x86_64", 6, "unknown:6"),
    ("x86_64", 99, "unknown:99"),
    ("x86_64", 2**32 + 1, "unknown:4294967297"),
    ("aarch64", 0, "DEFAULT"),
    ("aarch64", 48, "IPA_48"),
    ("aarch64", 0x100, "unknown:256"),
    ("s390x", 1, "UCONTROL"),
    ("ppc64le", 1, "PPC_HV"),
    ("ppc64le", 2, "PPC_PR"),
    ("mips64", 2, "VZ"),
    ("riscv64", 0, "DEFAULT"),
    ("riscv64", 1, "unknown:1"),
    ("sparc64", 0, "unknown:0"),
])
def test_vm_type_names(arch, vm_type, name):
    assert tables.vm_type_name(vm_type, arch) == name


@pytest.mark.parametrize(("err", "name"), [
    (22, "EINVAL"), (24, "EMFILE"), (23, "ENFILE"), (12, "ENOMEM"), (16, "EBUSY"),
    (4, "EINTR"), (9999, "unknown:9999"),
])
def test_errno_names(err, name):
    assert tables.errno_name(err) == name


@pytest.mark.parametrize(("mask", "types"), [
    (0, []), (1, [0]), (0b111101, [0, 2, 3, 4, 5]), (1 << 63, [63]),
])
def test_vm_types_in_mask(mask, types):
    assert tables.vm_types_in_mask(mask) == types


@pytest.mark.parametrize(("raw", "text"), [
    (b"qemu-system-x86\0", "qemu-system-x86"),
    (b"a\0garbage-after", "a"),
    (b"tab\there", "tab\\x09here"),
    (b"back\\slash", "back\\x5cslash"),
    (b'q"uote{}', 'q"uote{}'),
    ("ümlaut".encode(), "\\xc3\\xbcmlaut"),
    (b"", ""),
])
def test_escape_comm(raw, text):
    assert tables.escape_comm(raw) == text


def test_ioctl_numbers_match_uapi_encoding():
    # _IO(KVMIO=0xAE, nr): direction 0, size 0, type 0xAE, number nr.
    assert tables.KVM_GET_API_VERSION == (0xAE << 8) | 0x00
    assert tables.KVM_CREATE_VM == (0xAE << 8) | 0x01
    assert tables.KVM_CHECK_EXTENSION == (0xAE << 8) | 0x03
