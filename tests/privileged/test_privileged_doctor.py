"""doctor's per-VM-type readiness on this very host, against what the test reads itself:
KVM_CAP_VM_TYPES (its own ioctl on /dev/kvm) and /proc/cpuinfo."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess

import pytest

from tests.conftest import KVMTRACE
from tests.privileged.conftest import host_has_kprobes

pytestmark = pytest.mark.privileged

KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES = 0xAE03, 235
NAMES = ["DEFAULT", "SW_PROTECTED", "SEV", "SEV_ES", "SNP", "TDX"]
CONFIDENTIAL = {"SEV": "AuthenticAMD", "SEV_ES": "AuthenticAMD", "SNP": "AuthenticAMD",
                "TDX": "GenuineIntel"}


def host_mask() -> int:
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES)
    finally:
        os.close(fd)


def cpuinfo() -> tuple[str, set[str]]:
    text = open("/proc/cpuinfo").read().split("\n\n")[0]
    fields = dict(ln.split(":", 1) for ln in text.splitlines() if ":" in ln)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields["vendor_id"], set(fields["flags"].split())


@pytest.fixture(scope="module")
def report(doctor_report):
    """The session's one `doctor --json` (an attach test: a bcc compile)."""
    return doctor_report


def test_doctor_json_reports_this_host(report):
    """The attach test: every point of this host's plan as attached or not, by mechanism."""
    r = report
    assert r["exit_status"] == 0, (r["errors"], r["readiness"]["unusable"])
    assert r["ok"] and r["attach_tested"], r["errors"]
    pts = {p["probe"]: p for p in r["points"]}
    if host_has_kprobes():
        assert r["kprobes"]["available"] is True
        assert pts["KVM_CREATE_VM"]["mechanism"] == "kprobe"
    else:
        assert r["kprobes"]["available"] is False
        assert pts["KVM_CREATE_VM"]["mechanism"] == "tracepoint"
        assert pts["kvm_arch_init_vm"]["attached"] is False
        assert pts["kvm_arch_init_vm"]["detail"]
    assert pts["KVM_CREATE_VM"]["attached"] is True
    assert r["kvm"]["vm_types_mask"] is not None and r["kvm"]["vm_types"][0]["name"] == "DEFAULT"


def test_doctor_reports_what_tracing_needs_of_it(report):
    needs = {q["name"]: q for q in report["requirements"]}
    assert {"tracefs", "/dev/kvm", "kernel headers", "/proc/kallsyms"} <= set(needs)
    assert all(q["ok"] in (True, None) for q in needs.values()), needs  # root: all met


def test_every_type_is_ready_exactly_when_the_mask_offers_it(report):
    mask = host_mask()  # 0: a kernel before KVM_CAP_VM_TYPES, type 0 only
    types = {t["name"]: t for t in report["readiness"]["types"]}
    assert list(types) == NAMES
    for vm_type, name in enumerate(NAMES):
        offered = bool(mask >> vm_type & 1) or (mask == 0 and vm_type == 0)
        t = types[name]
        capacity_left = not [c for c in t["checks"]
                             if c["category"] == "capacity" and c["status"] == "FAIL"]
        assert (t["verdict"] == "ready") == (offered and capacity_left), (name, t["reason"])
        m = next(c for c in t["checks"] if c["id"] == f"{name.lower()}.mask")
        assert f"= {mask:#x}" in m["evidence"][0], m
        assert m["status"] in (("PASS",) if offered else ("FAIL", "N/A")), m
    default = types["DEFAULT"]
    assert default["verdict"] == "ready" and report["exit_status"] == 0
    assert all(c["status"] == "PASS" for c in default["checks"]), default["checks"]


def test_confidential_types_of_a_guest_or_the_other_vendor_are_na_with_the_reason(report):
    """Here (a VM on an AMD CPU, and the TCG guests of the kernel tier) SEV, SEV-ES,
    SNP and TDX are N/A or SKIP, each with its reason, never FAIL; where doctor could
    look (a host), the chain names the layer that says no."""
    vendor, flags = cpuinfo()
    guest = "hypervisor" in flags
    types = {t["name"]: t for t in report["readiness"]["types"]}
    assert report["readiness"]["guest"] == guest
    for name, owner in CONFIDENTIAL.items():
        t = types[name]
        if vendor != owner or guest:
            assert t["verdict"] == "not_applicable", (name, t)
            first = t["checks"][0]
            assert first["status"] == "N/A" and first["hint"], first
            assert ("this is a VM" in first["hint"]) if vendor == owner else (
                "not on this CPU" in first["hint"])
            assert not [c for c in t["checks"] if c["status"] == "FAIL"], name
            if guest and vendor == owner:  # the lower layers' readings are still named
                flag = {"SEV": "sev", "SEV_ES": "sev_es", "SNP": "sev_snp",
                        "TDX": "tdx_host_platform"}[name]
                assert f"cpuinfo: {'a' if flag in flags else 'no'} {flag} flag" in \
                    first["evidence"], first
        elif t["verdict"] != "ready":
            failed = next(c for c in t["checks"] if c["id"] == t["failed_check"])
            assert failed["status"] in ("FAIL", "SKIP") and failed["evidence"], failed


# host_only: doctor's text from replayed facts, judged by the same pure code on every
# kernel and mechanism (four kvmtrace starts: 186 s of the one_guest guest's run)
@pytest.mark.host_only
def test_the_text_report_says_the_same(report, tmp_path):
    """This host's facts dumped, then judged by type in text (replayed: no second attach
    test, which costs a bcc compile, minutes in the kernel tier's TCG guests)."""
    facts = tmp_path / "facts.json"
    dump = subprocess.run([*KVMTRACE, "doctor", "--dump-facts"], capture_output=True,
                          text=True, timeout=180, check=False)
    assert dump.returncode == 0, dump.stderr
    facts.write_text(dump.stdout)
    proc = subprocess.run([*KVMTRACE, "doctor", "--facts", str(facts), "--type", "DEFAULT"],
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "* DEFAULT (0): ready" in proc.stdout
    assert f"KVM_CAP_VM_TYPES) = {host_mask():#x}" in proc.stdout
    vendor, _ = cpuinfo()
    other = "TDX" if vendor == "AuthenticAMD" else "SEV"
    proc = subprocess.run([*KVMTRACE, "doctor", "--facts", str(facts), "--type", other],
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 1 and f"{other} (" in proc.stdout  # asked, cannot apply
    shown = json.loads(subprocess.run(
        [*KVMTRACE, "doctor", "--facts", str(facts), "--json"], capture_output=True,
        text=True, timeout=180, check=False).stdout)["readiness"]["types"]
    # The replay judges the same (verdicts: the evidence itself, dmesg lines or ASIDs in
    # use, may move between the two reads on a busy host).
    assert [(t["name"], t["verdict"], t["failed_check"]) for t in shown] == [
        (t["name"], t["verdict"], t["failed_check"]) for t in report["readiness"]["types"]]
