"""Per-VM-type readiness chains (kvmtrace.readiness) over the host fixtures of
tests/hosts/: the CONSTRUCTED ones (hosts we cannot run on, built by
tests/hosts/construct.py from the documented formats) and the ones captured on real
machines. Pure: no root, no /dev/kvm."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvmtrace import checks, doctor, evidence, readiness, sevchain, tdxchain, x86chain
from kvmtrace.facts import HostFacts
from tests.conftest import HERE, KVMTRACE

HOSTS = HERE / "hosts"
sys.path.insert(0, str(HOSTS))
import construct  # noqa: E402  (tests/hosts/construct.py)

NA, NR, R, INC = (readiness.NOT_APPLICABLE, readiness.NOT_READY, readiness.READY,
                  readiness.INCOMPLETE)
SW = ("sw_protected.config", "CONFIG_KVM_SW_PROTECTED_VM=y")

# fixture -> type -> (verdict, the check that decides it or None, a word of its hint)
EXPECTED = {
    "constructed-amd-snp-ready": {
        "DEFAULT": (R, None, None), "SW_PROTECTED": (NR, *SW), "SEV": (R, None, None),
        "SEV_ES": (R, None, None), "SNP": (R, None, None),
        "TDX": (NA, "tdx.platform", "Intel's")},
    "constructed-amd-snp-off-in-bios": {
        "SEV": (R, None, None), "SEV_ES": (R, None, None),
        "SNP": (NR, "snp.bios", "enable SEV-SNP in the BIOS")},
    "constructed-amd-sev-firmware-too-old": {
        "SEV": (R, None, None), "SNP": (NR, "snp.firmware", "older than the kernel's minimum")},
    "constructed-amd-asids-exhausted": {
        "SEV": (NR, "sev.asids", "all 907 ASIDs are in use"),
        "SEV_ES": (NR, "sev_es.asids", "all 99 ASIDs"), "SNP": (NR, "snp.asids", "all 99")},
    "constructed-amd-mask-disagrees": {
        "SEV_ES": (R, None, None), "SNP": (NR, "snp.mask", "KVM does not offer SNP")},
    "constructed-intel-tdx-ready": {
        "DEFAULT": (R, None, None), "TDX": (R, None, None),
        "SEV": (NA, "sev.platform", "AMD's"), "SNP": (NA, "snp.platform", "AMD's")},
    "constructed-intel-tdx-param-off": {
        "TDX": (NR, "tdx.kvm", "kvm_intel tdx=1")},
    "constructed-intel-tdx-module-failed": {
        "TDX": (NR, "tdx.module", "TDX module failed to initialise")},
    "constructed-cloud-guest": {
        "DEFAULT": (NR, "default.cpu", "nested virtualization"),
        "TDX": (NA, "tdx.platform", "this is a VM"), "SEV": (NA, "sev.platform", "AMD's")},
    # Captured with `kvmtrace doctor --dump-facts` on this project's build machine: a
    # Firecracker VM on an AMD EPYC whose KVM is kvm_pvm (no SVM/VMX flag).
    "captured-firecracker-6.18-pvm": {
        "DEFAULT": (R, None, None), "SW_PROTECTED": (NR, *SW),
        "SEV": (NA, "sev.platform", "this is a VM"), "SEV_ES": (NA, "sev_es.platform", "VM"),
        "SNP": (NA, "snp.platform", "VM"), "TDX": (NA, "tdx.platform", "Intel's")},
    # Captured by the kernel tier (tests/vm/guest.sh: doctor --dump-facts) in the TCG guest
    # of Debian 12's 6.12 backports kernel: kvm_amd loaded, SEV off, no kernel config,
    # and a CPUID 0x8000001F that claims SEV/SEV-ES/SNP (QEMU's -cpu max).
    "captured-guest-debian12-bpo-6.12-tcg": {
        "DEFAULT": (R, None, None),
        "SW_PROTECTED": (NR, "sw_protected.mask", "KVM does not offer SW_PROTECTED"),
        "SEV": (NA, "sev.platform", "this is a VM"), "SNP": (NA, "snp.platform", "VM"),
        "TDX": (NA, "tdx.platform", "Intel's")},
}
DISAGREE = {("constructed-amd-mask-disagrees", "SEV_ES"): "offers SEV_ES although sev_es.kvm",
            ("constructed-amd-mask-disagrees", "SNP"): "every layer looks ready"}


def load(stem: str) -> HostFacts:
    return HostFacts.load(HOSTS / f"{stem}.json")


def by_name(facts: HostFacts) -> dict[str, readiness.TypeReadiness]:
    return {t.name: t for t in readiness.assess(facts)}


def test_each_x86_type_has_one_chain_from_one_module():
    """The vendor-neutral types' chains, AMD's and Intel's, each type in one of them."""
    names = [n for m in (x86chain, sevchain, tdxchain) for n in m.chains()]
    assert sorted(names) == sorted(readiness.type_names("x86_64"))
    assert list(sevchain.chains()) == ["SEV", "SEV_ES", "SNP"]
    assert list(tdxchain.chains()) == ["TDX"]


def test_every_fixture_has_expectations():
    assert {p.stem for p in HOSTS.glob("*.json")} == set(EXPECTED)


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_fixture_verdicts_failing_checks_and_hints(stem):
    got = by_name(load(stem))
    assert list(got) == ["DEFAULT", "SW_PROTECTED", "SEV", "SEV_ES", "SNP", "TDX"]
    for name, (verdict, check, hint) in EXPECTED[stem].items():
        t = got[name]
        assert (t.verdict, t.failed_check) == (verdict, check), (name, t.reason)
        if hint:
            assert hint in t.reason, (name, t.reason)
        failing = next((c for c in t.checks if c.id == check), None)
        if verdict == NR:  # the failing check says what it read and what to do
            assert failing.status == checks.FAIL and failing.evidence and failing.hint
        for c in t.checks:  # a check after a FAIL or N/A was not made
            if c.blocked_by:
                assert c.status in (checks.SKIP, checks.NA) and c.hint is None
        assert t.disagreement == (None if (stem, name) not in DISAGREE else t.disagreement)
        if (stem, name) in DISAGREE:
            assert DISAGREE[(stem, name)] in t.disagreement
    ids = [c.id for t in got.values() for c in t.checks]
    assert len(ids) == len(set(ids)) and all("." in i for i in ids)


def test_a_guest_never_fails_a_host_feature_and_names_what_it_read():
    """Inside a VM the confidential types are N/A, never FAIL, and the evidence still
    names the CPU flag and KVM's parameter (what an operator would look at)."""
    for stem in ("constructed-cloud-guest", "captured-firecracker-6.18-pvm",
                 "captured-guest-debian12-bpo-6.12-tcg"):
        for name in ("SEV", "SEV_ES", "SNP", "TDX"):
            t = by_name(load(stem))[name]
            assert t.verdict == NA
            assert not [c for c in t.checks if c.status == checks.FAIL], name
    sev = by_name(load("captured-firecracker-6.18-pvm"))["SEV"].checks[0]
    assert sev.evidence[:2] == ["cpuinfo: hypervisor flag (running as a guest)",
                                "cpuinfo: no sev flag"]
    assert "kvm_amd/parameters/sev" in sev.evidence[2]
    tcg = by_name(load("captured-guest-debian12-bpo-6.12-tcg"))["SEV"].checks[0]
    assert tcg.evidence == ["cpuinfo: hypervisor flag (running as a guest)",
                            "cpuinfo: no sev flag", "/sys/module/kvm_amd/parameters/sev = N"]


def test_missing_prerequisites_are_skip_not_fail():
    """Without CPUID (cpuid module not loaded) or dmesg (not root), the checks that need
    them are SKIP with the reason; and /dev/kvm not answering leaves the type undecided."""
    f = load("constructed-amd-snp-off-in-bios")
    ev = f.evidence
    blind = evidence.Evidence(**{**ev.to_json(), "cpuid_8000001f": None,
                                 "cpuid_error": "/dev/cpu/0/cpuid missing (load the cpuid "
                                                "module: modprobe cpuid)",
                                 "dmesg": None, "dmesg_error": "/dev/kmsg: Operation not "
                                                               "permitted"})
    from dataclasses import replace

    snp = by_name(replace(f, evidence=blind))["SNP"]
    status = {c.id: c.status for c in snp.checks}
    assert status["snp.cpu"] == status["snp.bios"] == checks.SKIP
    assert "modprobe cpuid" in next(c.hint for c in snp.checks if c.id == "snp.cpu")
    assert status["snp.firmware"] == checks.SKIP  # /dev/sev there, the log unreadable
    assert not [c for c in snp.checks if c.status == checks.FAIL and c.id != "snp.kvm"
                and c.id != "snp.mask"]
    from kvmtrace.kvmdev import KvmInfo

    locked = replace(load("constructed-amd-snp-ready"),
                     kvm=KvmInfo(present=True, error="cannot open /dev/kvm: Permission denied"))
    t = by_name(locked)["SNP"]
    assert t.verdict == INC and t.failed_check == "snp.mask"
    assert doctor.report(locked, None, None, ["SNP"])["exit_status"] == doctor.EXIT_INCOMPLETE


def test_exit_status_follows_the_asked_types():
    f = load("constructed-intel-tdx-module-failed")
    assert doctor.report(f, None, None)["readiness"]["asked"] == ["DEFAULT"]
    assert doctor.report(f, None, None)["exit_status"] == doctor.EXIT_OK
    assert doctor.report(f, None, None, ["TDX"])["exit_status"] == doctor.EXIT_FAIL
    assert doctor.report(f, None, None, ["SEV"])["exit_status"] == doctor.EXIT_FAIL  # N/A
    ready = load("constructed-amd-snp-ready")
    assert doctor.report(ready, None, None)["readiness"]["asked"] == [
        "DEFAULT", "SEV", "SEV_ES", "SNP"]
    assert doctor.report(ready, None, None, ["SNP"])["exit_status"] == doctor.EXIT_OK
    assert doctor.report(load("constructed-amd-asids-exhausted"), None, None)[
        "exit_status"] == doctor.EXIT_FAIL  # offered, but no ASID left


def test_metrics_facts_capacity_and_firmware():
    ready = load("constructed-amd-snp-ready")
    assert [(c.resource, c.capacity, c.used) for c in readiness.capacities(ready.evidence)] \
        == [("sev", 907, 3), ("sev_es", 99, 2)]
    assert {(f.component, f.version) for f in readiness.firmware(ready.evidence)} == {
        ("sev", "1.55"), ("sev_snp", "1.55")}
    tdx = load("constructed-intel-tdx-ready")
    assert [(f.component, f.version) for f in readiness.firmware(tdx.evidence)] == [
        ("tdx_module", "1.5")]


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_dump_facts_then_facts_gives_identical_verdicts(stem, tmp_path):
    """--facts FILE replays a --dump-facts file: the verdicts of the JSON round trip
    are identical, through the command line too (no root needed)."""
    f = load(stem)
    again = HostFacts.from_json(json.loads(json.dumps(f.to_json())))
    assert readiness.assess(again) == readiness.assess(f)
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(f.to_json()))
    proc = subprocess.run([*KVMTRACE, "doctor", "--json", "--facts", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    assert report["readiness"]["types"] == [t.to_json() for t in readiness.assess(f)]
    assert proc.returncode == report["exit_status"]


def test_text_output_is_a_tree_with_fixes():
    r = doctor.report(load("constructed-amd-snp-off-in-bios"), None, None, ["SNP"])
    text = "\n".join(doctor.readiness_text(r["readiness"]))
    assert "* SNP (4): NOT READY - snp.bios: enable SEV-SNP in the BIOS" in text
    assert "FAIL snp.bios" in text and "fix: enable SEV-SNP in the BIOS" in text
    assert "`- SKIP after it: snp.iommu, snp.firmware, snp.kvm, snp.asids" in text
    assert "capacity: sev_es 2 of 99 in use" in text and "firmware: sev 1.55" in text


def test_constructed_fixtures_are_what_construct_py_builds():
    for stem, facts in construct.build().items():
        assert (HOSTS / f"{stem}.json").read_text() == construct.text(facts), (
            f"run python3 tests/hosts/construct.py: {stem}.json differs")


def test_facts_without_evidence_are_judged_from_the_mask_alone(kernel_facts):
    f = kernel_facts("debian13-6.12-guest-captured")  # written before evidence existed
    assert f.evidence is None
    r = doctor.report(f, None, None)
    assert any("no readiness evidence" in w for w in r["warnings"])
    got = {t["name"]: t for t in r["readiness"]["types"]}
    assert got["DEFAULT"]["verdict"] == R and got["SEV"]["failed_check"] == "sev.mask"
    assert [c["id"] for c in got["SEV"]["checks"]] == ["sev.mask"]


# ---- the evidence parsers ----------------------------------------------------------

def test_kmsg_records_are_filtered_and_bounded():
    data = b"".join(
        f"6,{i},{i * 1000},-;{msg}\n".encode()
        for i, msg in enumerate(["Linux version 6.12", "ccp 0000:42:00.1: SEV API:1.55 build:37",
                                 "kvm_amd: SEV enabled (ASIDs 100 - 1006)", "random line"]))
    data += b" SUBSYSTEM=pci\n"  # a continuation line
    assert evidence.parse_kmsg(data) == [
        "[    0.001000] ccp 0000:42:00.1: SEV API:1.55 build:37",
        "[    0.002000] kvm_amd: SEV enabled (ASIDs 100 - 1006)"]
    many = b"".join(f"6,{i},0,-;kvm: line {i}\n".encode() for i in range(1000))
    got = evidence.parse_kmsg(many)
    assert len(got) == evidence.DMESG_LINES and got[-1].endswith("kvm: line 999")


def test_cpuinfo_misc_and_config_parsers():
    cpuinfo = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
               "model name\t: AMD EPYC 9654\nflags\t\t: fpu svm sme sev sev_es sev_snp npt "
               "hypervisor avx\n\nprocessor\t: 1\nvendor_id\t: other\n")
    assert evidence.parse_cpuinfo(cpuinfo) == (
        "AuthenticAMD", 25, 17, "AMD EPYC 9654",
        ["svm", "hypervisor", "sme", "sev", "sev_es", "sev_snp", "npt"])
    assert evidence.parse_misc("sev 509\nsev_es 0\nbogus x\nother 3\n") == {"sev": 509,
                                                                            "sev_es": 0}
    cfg = evidence.parse_config("CONFIG_KVM_AMD_SEV=y\n# CONFIG_KVM_SW_PROTECTED_VM is not set\n")
    assert cfg["CONFIG_KVM_AMD_SEV"] == "y" and cfg["CONFIG_KVM_SW_PROTECTED_VM"] == "n"


def test_evidence_from_a_fixture_tree(tmp_path):
    """gather() reads only what it is pointed at (a HAND-BUILT tree here) and turns each
    unreadable source into a reason, never an exception."""
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("vendor_id\t: GenuineIntel\nflags\t: vmx ept\n")
    (tmp_path / "proc/cmdline").write_text("BOOT_IMAGE=/vmlinuz root=/dev/sda1 secret=x "
                                           "intel_iommu=on kvm_intel.tdx=1 quiet\n")
    mod = tmp_path / "sys/module/kvm_intel/parameters"
    mod.mkdir(parents=True)
    (mod / "tdx").write_text("N\n")
    (tmp_path / "sys/fs/cgroup").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/misc.capacity").write_text("tdx 63\n")
    ev = evidence.gather(tmp_path, "6.16.0")
    assert ev.cpu_vendor == "GenuineIntel" and ev.cpu_flags == ["vmx", "ept"]
    assert ev.params == {"kvm_intel.tdx": "N"} and ev.modules == ["kvm_intel"]
    assert ev.cmdline == "intel_iommu=on kvm_intel.tdx=1"  # only what the checks read
    assert ev.misc_capacity == {"tdx": 63} and ev.misc_current is None
    assert ev.cpuid_8000001f is None and "not an AMD CPU" in ev.cpuid_error
    assert ev.dmesg is None and "dev/kmsg" in ev.dmesg_error
    assert ev.kernel_config is None and "config-6.16.0" in ev.kernel_config_error
    assert evidence.Evidence.from_json(ev.to_json()) == ev


def test_serve_exports_readiness_from_the_same_chains(recorded_collector):
    """kvmtrace_vm_type_ready per type with its verdict and failing check, ASID
    capacity and use, firmware versions: the doctor's answers, as metrics, parsed."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    f = load("constructed-amd-asids-exhausted")
    reg, _, _ = recorded_collector(kvm=f.kvm, evidence=f.evidence)
    fams = {m.name: m for m in text_string_to_metric_families(generate_latest(reg).decode())}
    ready = {s.labels["vm_type_name"]: (s.value, s.labels["verdict"], s.labels["failed_check"])
             for s in fams["kvmtrace_vm_type_ready"].samples}
    assert ready == {
        "DEFAULT": (1, R, ""), "SW_PROTECTED": (0, NR, "sw_protected.config"),
        "SEV": (0, NR, "sev.asids"), "SEV_ES": (0, NR, "sev_es.asids"),
        "SNP": (0, NR, "snp.asids"), "TDX": (0, NA, "tdx.platform")}
    assert {s.labels["resource"]: s.value for s in fams["kvmtrace_host_encryption_ids"].samples
            } == {"sev": 907, "sev_es": 99}
    assert {s.labels["resource"]: s.value
            for s in fams["kvmtrace_host_encryption_ids_used"].samples} == {"sev": 907,
                                                                          "sev_es": 99}
    assert {(s.labels["component"], s.labels["version"])
            for s in fams["kvmtrace_host_firmware_info"].samples} == {("sev", "1.55"),
                                                                      ("sev_snp", "1.55")}


def test_the_refresher_rereads_and_keeps_what_it_can_no_longer_see():
    """serve re-reads the evidence at most every ttl seconds; once the exporter has
    dropped its capabilities the kernel log and CPUID are kept from the first read."""
    first = load("constructed-amd-snp-ready").evidence
    later = evidence.Evidence(**{**first.to_json(), "dmesg": None, "dmesg_error": "EPERM",
                                 "cpuid_8000001f": None, "misc_current": {"sev": 9}})
    now = [0.0]
    reads = []

    def read():
        reads.append(now[0])
        return later

    r = evidence.Refresher(first, ttl=60, read=read, clock=lambda: now[0])
    assert r.get() is first and not reads
    now[0] = 61
    got = r.get()
    assert reads == [61] and got.misc_current == {"sev": 9}
    assert got.dmesg == first.dmesg and got.cpuid_8000001f == first.cpuid_8000001f
    now[0] = 100
    assert r.get() is got and reads == [61]
