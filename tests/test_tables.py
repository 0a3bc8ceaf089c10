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


# --- the confidential launch ---


def test_sev_numbers_against_the_headers():
    # arch/x86/include/uapi/asm/kvm.h enum sev_cmd_id counts from KVM_SEV_INIT = 0 to
    # KVM_SEV_INIT2 (22), then KVM_SEV_SNP_LAUNCH_START = 100.
    assert sorted(k for k in tables.SEV_COMMANDS if k < 100) == list(range(23))
    assert tables.SEV_COMMANDS[21] == "SEND_CANCEL"
    # include/uapi/linux/psp-sev.h: SEV_RET_INVALID_PARAM follows SEV_RET_UNSUPPORTED (0x15)
    # and SEV_RET_INVALID_PAGE_SIZE is the first explicit value, 0x0019.
    assert tables.SEV_STATUSES[0x16] == "INVALID_PARAM"
    assert tables.SEV_STATUSES[0x19] == "INVALID_PAGE_SIZE"
    assert tables.SEV_STATUSES[0x27] == "INVALID_KEY"
    assert 0x1E not in tables.SEV_STATUSES and 0x34 not in tables.SEV_STATUSES


def test_tdx_numbers_against_the_headers():
    # arch/x86/include/uapi/asm/kvm.h enum kvm_tdx_cmd_id; arch/x86/include/asm/shared/
    # tdx_errno.h TDX_OPERAND_BUSY 0x8000020000000000ULL, TDX_OPERAND_INVALID 0xC0000100...
    assert tables.TDX_COMMANDS == {0: "CAPABILITIES", 1: "INIT_VM", 2: "INIT_VCPU",
                                   3: "INIT_MEM_REGION", 4: "FINALIZE_VM", 5: "GET_CPUID"}
    assert tables.TDX_STATUSES[0x8000020000000000 >> 32] == "OPERAND_BUSY"
    assert tables.TDX_STATUSES[0xC000010000000000 >> 32] == "OPERAND_INVALID"
    assert tables.TDX_SEAMCALL_STATUS_MASK == 0xFFFFFFFF00000000


@pytest.mark.parametrize(("vm_type", "arch", "family"), [
    (5, "x86_64", "TDX"), (4, "x86_64", "SEV"), (3, "x86_64", "SEV"), (2, "x86_64", "SEV"),
    (0, "x86_64", "SEV"),  # legacy SEV: KVM_SEV_INIT on a DEFAULT VM
    (99, "x86_64", "SEV"), (5, "aarch64", "none"), (0, "s390x", "none"),
])
def test_encrypt_family(vm_type, arch, family):
    assert tables.encrypt_family(vm_type, arch) == family


@pytest.mark.parametrize(("family", "cmd", "name"), [
    ("SEV", 0, "INIT"), ("SEV", 1, "ES_INIT"), ("SEV", 2, "LAUNCH_START"), ("SEV", 22, "INIT2"),
    ("SEV", 100, "SNP_LAUNCH_START"), ("SEV", 101, "SNP_LAUNCH_UPDATE"),
    ("SEV", 102, "SNP_LAUNCH_FINISH"), ("SEV", 23, "unknown:23"), ("SEV", 99, "unknown:99"),
    ("TDX", 0, "CAPABILITIES"), ("TDX", 1, "INIT_VM"), ("TDX", 5, "GET_CPUID"),
    ("TDX", 6, "unknown:6"), ("none", 0, "unknown:0"), ("SEV", -1, "unknown:-1"),
])
def test_encrypt_command_name(family, cmd, name):
    assert tables.encrypt_command_name(family, cmd) == name


@pytest.mark.parametrize(("family", "status", "name"), [
    ("SEV", 0, "SUCCESS"), ("SEV", 1, "INVALID_PLATFORM_STATE"), ("SEV", 3, "INVALID_CONFIG"),
    ("SEV", 0x12, "ACTIVE"), ("SEV", 0x17, "RESOURCE_LIMIT"), ("SEV", 0x20, "RMP_INIT_REQUIRED"),
    ("SEV", 0x3F, "SEV_STATUS_RESPONSE_TOO_LARGE"), ("SEV", 0x1E, "unknown:30"),
    ("SEV", 0xFFFFFFFF, "NO_FW_CALL"), ("SEV", -1, "NO_FW_CALL"), ("SEV", 0x80000000,
                                                                   "unknown:2147483648"),
    ("TDX", 0, "SUCCESS"),
    ("TDX", 0x8000020000000092, "OPERAND_BUSY"),  # detail bits 31:0: operand id SEPT
    ("TDX", 0xC000010000000001, "OPERAND_INVALID"),
    ("TDX", 0x8000020300000000, "RND_NO_ENTROPY"),
    ("TDX", 0x0000081500000000, "KEY_CONFIGURED"),
    ("TDX", 0x8000FF00FFFF0000, "SEAMCALL_VMFAILINVALID"),
    ("TDX", 0x8000FF000000000D, "SEAMCALL_GP"),
    ("TDX", 0x1234567800000000, "unknown:0x1234567800000000"),
    ("TDX", 1 << 64, "unknown:0x10000000000000000"), ("TDX", -1, "unknown:-0x1"),
    ("none", 5, "unknown:5"),
])
def test_firmware_status_name(family, status, name):
    assert tables.firmware_status_name(family, status) == name


@pytest.mark.parametrize(("code", "decoded"), [
    (0, ("exited", 0)), (1 << 8, ("exited", 1)), (255 << 8, ("exited", 255)),
    (9, ("killed", 9)), (15, ("killed", 15)), (0x80 | 11, ("killed", 11)),  # core dumped
    (0x1FF00, ("exited", 255)),
])
def test_exit_status(code, decoded):
    assert tables.exit_status(code) == decoded


@pytest.mark.parametrize(("sig", "name"), [
    (9, "SIGKILL"), (15, "SIGTERM"), (11, "SIGSEGV"), (6, "SIGABRT"), (0, "unknown:0"),
    (200, "unknown:200"), (-1, "unknown:-1"), (2**70, f"unknown:{2**70}"),
])
def test_signal_name(sig, name):
    assert tables.signal_name(sig) == name
