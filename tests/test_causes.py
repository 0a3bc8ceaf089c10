"""kvmtrace.causes: one cause per failed start, from the evidence (pure).

Every row of ../shared/reference/vm-start-paths.md section 6 -- the failures public
reports show most -- is a case below. The records are BUILT BY HAND in the shape
kvmtrace.starts hands them over (the kernel here, a PVM KVM without SEV or TDX, cannot
produce most of them); the ones this host can produce are also made for real by
tests/privileged/test_privileged_starts.py.
"""

from __future__ import annotations

import pytest

from kvmtrace import causes
from kvmtrace.causes import Failure

EXIT_1 = {"how": "exited", "status": 1}


def launch(family: str, command: str, errno: str | None, status: str = "none",
           code: int = 0) -> dict:
    return {"family": family, "command": command, "errno": errno,
            "firmware_status": status, "firmware_status_code": code}


SECTION_6 = [
    # "vm-type tdx/SEV-SNP not supported by KVM": the mask lacks the bit...
    ("vm-type SEV-SNP not supported by KVM",
     Failure("before_create", "vmm_refused_type", "SNP", EXIT_1), "type_not_offered"),
    # ...and where the module parameter says it was left off at bring-up:
    ("vm-type tdx not supported by KVM, kvm_intel.tdx=N",
     Failure("before_create", "vmm_refused_type", "TDX", EXIT_1, disabled="kvm_intel.tdx=N"),
     "feature_disabled_at_bringup"),
    # KVM_TDX_CAPABILITIES failed: Inappropriate ioctl (ENOTTY on a known command id)
    ("KVM_TDX_CAPABILITIES failed: Inappropriate ioctl",
     Failure("during_launch", "launch_failed", "TDX", EXIT_1,
             launch=[launch("TDX", "CAPABILITIES", "ENOTTY")]), "abi_skew"),
    # SNP_LAUNCH_START ret=-22 fw_error=0 (pflash instead of -bios, a wrong policy)
    ("SNP_LAUNCH_START ret=-22 fw_error=0",
     Failure("during_launch", "launch_failed", "SNP", EXIT_1,
             launch=[launch("SEV", "SNP_LAUNCH_START", "EINVAL")]), "kvm_rejected_arguments"),
    # SEV-SNP: failed to INIT rc -5, error 0x3 (the firmware's status)
    ("SEV INIT2 failed rc -5 error 0x3",
     Failure("during_launch", "launch_failed", "SNP", EXIT_1,
             launch=[launch("SEV", "INIT2", "EIO", "INVALID_CONFIG", 3)]), "firmware_error"),
    # "device or resource busy" at SEV/SEV-ES launch: ASIDs
    ("SEV LAUNCH_START: Device or resource busy",
     Failure("during_launch", "launch_failed", "SEV_ES", EXIT_1,
             launch=[launch("SEV", "LAUNCH_START", "EBUSY")]), "capacity"),
    # SEV-ES refused on SNP hosts with new firmware: LAUNCH_START's firmware status
    ("SEV-ES LAUNCH_START refused by firmware policy",
     Failure("during_launch", "launch_failed", "SEV_ES", EXIT_1,
             launch=[launch("SEV", "LAUNCH_START", "EIO", "POLICY_FAILURE", 0x16)]),
     "firmware_error"),
    # SNP_LAUNCH_UPDATE fw_error=22: the firmware image's hashes table
    ("SNP_LAUNCH_UPDATE fw_error=22",
     Failure("during_launch", "launch_failed", "SNP", EXIT_1,
             launch=[launch("SEV", "SNP_LAUNCH_UPDATE", "EIO", "INVALID_PARAM", 0x16)]),
     "firmware_error"),
    # KVM_TDX_INIT_MEM_REGION EIO with hw_error (a wrong TDVF)
    ("KVM_TDX_INIT_MEM_REGION EIO, hw_error OPERAND_INVALID",
     Failure("during_launch", "launch_failed", "TDX", EXIT_1,
             launch=[launch("TDX", "INIT_MEM_REGION", "EIO", "OPERAND_INVALID",
                            0xC000010000000000)]), "tdx_module_error"),
    # ...or EAGAIN (the TDX module's entropy)
    ("KVM_TDX_INIT_VM EAGAIN",
     Failure("during_launch", "launch_failed", "TDX", EXIT_1,
             launch=[launch("TDX", "INIT_VM", "EAGAIN")]), "tdx_module_error"),
    # kvm_create_guest_memfd ... Permission denied: an LSM
    ("kvm_create_guest_memfd: Permission denied",
     Failure("during_launch", "setup_failed", "SNP", EXIT_1,
             calls=[{"command": "KVM_CREATE_GUEST_MEMFD", "errno": "EACCES"}]),
     "memory_setup"),
    ("KVM_SET_USER_MEMORY_REGION2 failed",
     Failure("during_launch", "setup_failed", "TDX", EXIT_1,
             calls=[{"command": "KVM_SET_USER_MEMORY_REGION2", "errno": "EINVAL"}]),
     "memory_setup"),
    # "kvm run failed Invalid argument" right after launch
    ("kvm run failed Invalid argument",
     Failure("at_first_run", "first_run_failed", "SNP", EXIT_1,
             run={"errno": "EINVAL", "exit_reason": "UNKNOWN"}), "first_run_failed"),
    ("KVM_EXIT_FAIL_ENTRY at the first run",
     Failure("at_first_run", "first_run_failed", "TDX", EXIT_1,
             run={"errno": None, "exit_reason": "FAIL_ENTRY"}), "first_run_failed"),
    # QEMU built without tdx-guest, a libvirt config error: never reaches /dev/kvm
    ("QEMU: invalid object type 'tdx-guest'",
     Failure("before_create", "vmm_exited", "TDX", EXIT_1), "vmm_config"),
    # QEMU 10 with sev-guest on a host without SEV: a DEFAULT VM made, then its own
    # cbitpos check fails (measured here) -- no kernel call failed.
    ("sev_common_kvm_init: cbitpos check failed",
     Failure("during_launch", "exited_after_create", "SEV", EXIT_1), "vmm_config"),
]


@pytest.mark.parametrize(("report", "failure", "cause"), SECTION_6,
                         ids=[row[0] for row in SECTION_6])
def test_every_row_of_the_public_reports_gets_its_cause(report, failure, cause):
    got = causes.decide(failure)
    assert got.name == cause, (report, got)
    assert got.evidence and got.hint == causes.CAUSES[cause]


def test_the_table_is_bounded_and_every_cause_names_a_fix():
    assert len(causes.CAUSES) == 11
    assert all(len(hint) > 40 for hint in causes.CAUSES.values())
    assert {row[2] for row in SECTION_6} | {"unknown"} == set(causes.CAUSES)


@pytest.mark.parametrize(("failure", "cause", "needle"), [
    (Failure("at_create", "type_unsupported", "SEV", EXIT_1,
             creates=[{"vm_type_name": "SEV", "result": "EINVAL"}]),
     "type_not_offered", "KVM_CREATE_VM(SEV) failed with EINVAL"),
    (Failure("at_create", "fd_exhausted", "DEFAULT", EXIT_1,
             creates=[{"vm_type_name": "DEFAULT", "result": "EMFILE"}]), "capacity", "EMFILE"),
    (Failure("at_create", "virtualization_busy", "DEFAULT", EXIT_1,
             creates=[{"vm_type_name": "DEFAULT", "result": "EBUSY"}]), "unknown", "EBUSY"),
    (Failure("before_create", "vmm_crashed", "SNP", {"how": "killed", "signal": "SIGSEGV"}),
     "unknown", "killed by SIGSEGV"),
    (Failure("during_launch", "launch_failed", "SEV", EXIT_1,
             launch=[launch("SEV", "INIT", "ENOTTY")], disabled="kvm_amd.sev=N"),
     "feature_disabled_at_bringup", "kvm_amd.sev=N"),
    (Failure("during_launch", "launch_failed", "SEV", EXIT_1,
             launch=[launch("SEV", "unknown:9999", "ENOTTY")]), "abi_skew", "unknown:9999"),
    (Failure("during_launch", "setup_failed", "DEFAULT", EXIT_1,
             calls=[{"command": "KVM_CREATE_VCPU", "errno": "ENOMEM"}]), "capacity", "ENOMEM"),
    (Failure("during_launch", "setup_failed", "DEFAULT", EXIT_1,
             calls=[{"command": "unknown:0x4008aeff", "errno": "ENOTTY"}]), "abi_skew",
     "unknown:0x4008aeff"),
    (Failure("during_launch", "setup_failed", "DEFAULT", EXIT_1,
             calls=[{"command": "KVM_SET_CPUID2", "errno": "E2BIG"}]), "unknown", "E2BIG"),
])
def test_edges(failure, cause, needle):
    got = causes.decide(failure)
    assert (got.name, needle in got.evidence) == (cause, True), got


def test_the_launch_decides_over_later_calls_and_runs():
    f = Failure("during_launch", "launch_failed", "SNP", EXIT_1,
                launch=[launch("SEV", "SNP_LAUNCH_START", "EBUSY")],
                calls=[{"command": "KVM_CREATE_GUEST_MEMFD", "errno": "EINVAL"}],
                run={"errno": "EINVAL", "exit_reason": "UNKNOWN"})
    assert causes.decide(f).name == "capacity"


@pytest.mark.parametrize(("requested", "params", "off"), [
    ("SNP", {"kvm_amd.sev": "Y", "kvm_amd.sev_es": "Y", "kvm_amd.sev_snp": "N"},
     "kvm_amd.sev_snp=N"),
    ("SEV_ES", {"kvm_amd.sev": "N", "kvm_amd.sev_es": "N"}, "kvm_amd.sev=N"),
    ("TDX", {"kvm_intel.tdx": "N"}, "kvm_intel.tdx=N"),
    ("TDX", {"kvm_intel.tdx": "Y"}, None),
    ("SNP", {}, None),  # kvm_amd not loaded: nothing was brought up
    ("DEFAULT", {"kvm_amd.sev": "N"}, None),
    ("not_known", {"kvm_amd.sev": "N"}, None),
])
def test_a_feature_left_off_at_bringup(requested, params, off):
    assert causes.disabled_at_bringup(requested, params) == off
