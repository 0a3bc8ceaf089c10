import pytest

from kvmtrace import contract
from kvmtrace import plan as planmod
from kvmtrace.contract import EVENT
from kvmtrace.decode import DecodeError, Decoder


@pytest.fixture
def decoder(kernel_facts):
    return Decoder(planmod.make_plan(kernel_facts("seed-tdx-v12-kprobes")), "x86_64")


def raw_event(probe, vm_type, result, comm=b"qemu-system-x86", tgid=42, tid=43,
              ts=10_000, dur=1_500):
    return EVENT.pack(ts, dur, vm_type, result, tgid, tid, probe, 0, 0, 2**32 - 1, 0, comm)


@pytest.mark.parametrize(("probe", "vm_type", "result", "name", "rejected", "errno"), [
    (contract.PROBE_CREATE_VM, 0, 9, "KVM_CREATE_VM", False, None),
    (contract.PROBE_CREATE_VM, 2, -22, "KVM_CREATE_VM", True, "EINVAL"),
    (contract.PROBE_CREATE_VM, 0, -24, "KVM_CREATE_VM", True, "EMFILE"),
    (contract.PROBE_VM_TYPES_QUERY, 0, 0x1, "KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)", False, None),
    (contract.PROBE_ARCH_INIT_VM, 5, -22, "kvm_arch_init_vm", True, "EINVAL"),
    (contract.PROBE_ARCH_INIT_VM, 0, 0, "kvm_arch_init_vm", False, None),
    (contract.FIRST_TYPE_CHECK, 1, 0, "kvm_is_vm_type_supported", True, None),
    (contract.FIRST_TYPE_CHECK, 0, 1, "kvm_is_vm_type_supported", False, None),
    (77, 0, 0, "unknown:77", False, None),
])
def test_event_decoding(decoder, probe, vm_type, result, name, rejected, errno):
    ev = decoder.event(raw_event(probe, vm_type, result))
    assert (ev.probe, ev.rejected, ev.errno) == (name, rejected, errno)
    assert (ev.pid, ev.tid, ev.comm, ev.duration_ns) == (42, 43, "qemu-system-x86", 1500)
    assert ev.vm_type == vm_type


def test_event_with_hostile_comm_and_unknown_type(decoder):
    ev = decoder.event(raw_event(contract.PROBE_CREATE_VM, 2**32 + 1, -22, comm=b"a\nb\x1b[31m"))
    assert ev.comm == "a\\x0ab\\x1b[31m"
    assert ev.vm_type_name == "unknown:4294967297"


def test_short_event_is_a_decode_error(decoder):
    with pytest.raises(DecodeError):
        decoder.event(b"\0" * 10)


def test_count_decoding(decoder):
    r = decoder.count((7, contract.PROBE_CREATE_VM, 3, -22, 0, 0, b"vmm\0\0", 12))
    assert (r.pid, r.comm, r.probe, r.vm_type_name, r.errno, r.rejected, r.count) == (
        7, "vmm", "KVM_CREATE_VM", "SEV_ES", "EINVAL", True, 12)
