"""kvmtrace.vmm: what a VMM asked for, from real command lines (tests/cmdlines/README.md)."""

import shlex
from pathlib import Path

import pytest

from kvmtrace import vmm

CMDLINES = Path(__file__).parent / "cmdlines"
SNP_ARGV = (CMDLINES / "kvmtrace-snp.argv").read_text().splitlines()


def load(name: str) -> list[str]:
    """A fixture as argv, in the formats tests/cmdlines/README.md describes."""
    path = CMDLINES / name
    if path.suffix == ".argv":
        return path.read_text().splitlines()
    if path.suffix == ".cmdline":
        return path.read_bytes().decode().split("\0")[:-1]
    words = shlex.split(path.read_text().replace("\\\n", ""))
    while words and (words[0] == "sudo" or _is_env(words[0])):
        words.pop(0)
    return words


def _is_env(word: str) -> bool:
    name, eq, _ = word.partition("=")
    return bool(eq) and name.isidentifier()


def nul(argv: list[str]) -> bytes:
    return "".join(arg + "\0" for arg in argv).encode()


def qemu(*args: str) -> vmm.VmmRequest:
    return vmm.parse_argv(["qemu-system-x86_64", *args])


NO_FLAG = "has no flag for a confidential VM type"
FIXTURES = [
    # (fixture, kind, name, requested_type, a piece of the evidence)
    ("libvirt-launch-security-sev-snp.x86_64-latest.args", "qemu", "QEMUGuest1", "SNP",
     "confidential-guest-support='lsec0' is a sev-snp-guest"),
    ("libvirt-launch-security-sev-direct.x86_64-latest.args", "qemu", "QEMUGuest1", "SEV",
     "sev-guest with policy 0x1;"),
    ("libvirt-launch-security-sev.x86_64-6.0.0.args", "qemu", "QEMUGuest1", "SEV",
     "legacy-vm-type=auto"),
    ("libvirt-launch-security-sev.args", "qemu", "QEMUGuest1", "SEV",
     "confidential-guest-support='sev0' is a sev-guest with policy 0x1"),
    ("qemu-doc-sev.cmd", "qemu", None, "SEV", "policy 0x1"),
    ("qemu-doc-sev-es.cmd", "qemu", None, "SEV_ES", "policy 0x5 (bit 2: SEV-ES)"),
    ("qemu-doc-tdx.cmd", "qemu", None, "TDX", "'tdx0' is a tdx-guest"),
    ("migtd-src.cmd", "qemu", "migtd-src", "TDX", "'tdx0' is a tdx-guest"),
    ("kvmtrace-snp.argv", "qemu", "kvmtrace-snp", "SNP", "'cgs0' is a sev-snp-guest"),
    ("kvmtrace-sev.argv", "qemu", "kvmtrace-sev", "SEV", "'cgs0' is a sev-guest"),
    ("kvmtrace-snp.cmdline", "qemu", "kvmtrace-snp", "SNP", "sev-snp-guest"),
    ("cloud-hypervisor-tdx.cmd", "cloud-hypervisor", None, "TDX", "passes VM type 1"),
    ("cloud-hypervisor-sev-snp.cmd", "cloud-hypervisor", None, "SNP", "--platform sev_snp=on"),
    ("firecracker-config-file.cmd", "firecracker", None, "DEFAULT", NO_FLAG),
    ("firecracker-jailer.argv", "firecracker", "551e7604-e35c-42b3-b825-416853441234",
     "DEFAULT", NO_FLAG),
    ("crosvm-android-pvm.argv", "crosvm", None, None, "--protected-vm: an arm64 pKVM"),
    ("kvmtool-readme.cmd", "kvmtool", None, "DEFAULT", NO_FLAG),
    ("kvmtool-named.argv", "kvmtool", "guest-1", "DEFAULT", NO_FLAG),
]


@pytest.mark.parametrize(("fixture", "kind", "name", "requested_type", "evidence"), FIXTURES)
def test_real_command_lines(fixture, kind, name, requested_type, evidence):
    request = vmm.parse_argv(load(fixture))
    assert (request.kind, request.name, request.requested_type) == (kind, name, requested_type)
    assert evidence in request.evidence
    assert "\n" not in request.evidence
    # The same command line as /proc shows it says the same.
    assert vmm.parse_cmdline(nul(load(fixture))) == request


def test_fixture_loader_reads_libvirt_wrapped_values():
    argv = load("libvirt-launch-security-sev.args")
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert "socket,id=charmonitor,path=/tmp/lib/domain--1-QEMUGuest1/monitor.sock,server,nowait" \
        in argv
    assert argv[-1].endswith("session-file=/tmp/lib/domain--1-QEMUGuest1/session.base64")


def test_to_json_and_not_known():
    assert vmm.NOT_KNOWN.to_json() == {
        "kind": "unknown", "name": None, "requested_type": None, "evidence": "no command line"}
    assert vmm.parse_argv(SNP_ARGV).to_json()["requested_type"] == "SNP"


@pytest.mark.parametrize("raw", [b"", b"\0"])
def test_empty_cmdline(raw):
    request = vmm.parse_cmdline(raw)
    assert (request.kind, request.name, request.requested_type) == ("unknown", None, None)
    assert request.evidence.startswith("empty command line")


def test_truncated_inside_the_object_drops_the_partial_argument():
    raw = nul(SNP_ARGV)
    cut = raw[: raw.index(b"sev-snp-guest") + 7]  # "...\0sev-snp" : no final NUL
    request = vmm.parse_cmdline(cut)
    assert (request.kind, request.requested_type) == ("qemu", None)
    assert "names no -object" in request.evidence and "cut short" in request.evidence


def test_truncated_before_any_flag_says_not_known_rather_than_default():
    raw = nul(["qemu-system-x86_64", "-name", "guest=a", "-machine", "q35,confidential"])
    request = vmm.parse_cmdline(raw[:-1])
    assert request.requested_type is None
    assert "no confidential-guest-support in the part read" in request.evidence
    assert request.name == "a"


def test_truncated_after_the_flags_still_decides():
    request = vmm.parse_cmdline(nul(SNP_ARGV)[:-3])  # "-nodefau"
    assert request.requested_type == "SNP"
    assert request.evidence.endswith("(command line cut short)")


def test_non_utf8_bytes_are_replaced():
    request = vmm.parse_cmdline(b"qemu-system-x86_64\0-name\0guest=caf\xe9\xff\0")
    assert request.name == "caf\ufffd\ufffd"
    assert request.requested_type == "DEFAULT"
    odd = vmm.parse_cmdline(b"\xff\xfe\nvmm\0")
    assert odd.kind == "unknown" and "\n" not in odd.evidence


def test_double_comma_is_a_literal_comma():
    request = qemu("-name", "guest=web,,prod,debug-threads=on",
                   "-machine", "q35,confidential-guest-support=cgs,,0",
                   "-object", "sev-snp-guest,id=cgs,,0,cbitpos=51")
    assert (request.name, request.requested_type) == ("web,prod", "SNP")
    assert qemu("-name", "a,,,process=b").name == "a,"


@pytest.mark.parametrize(("name_arg", "name"), [
    ("guest=vm1,debug-threads=on", "vm1"),  # libvirt
    ("vm1", "vm1"),
    ("vm1,process=qemu-vm1", "vm1"),
    ("process=tdxvm,debug-threads=on", None),  # no guest name given
    ("", None),
])
def test_qemu_name(name_arg, name):
    assert qemu("-name", name_arg).name == name


def test_name_given_twice_merges_later_wins():
    assert qemu("-name", "a,process=p", "-name", "process=q").name == "a"
    assert qemu("-name", "a", "--name", "b").name == "b"


def test_json_object_forms():
    snp = '{"qom-type":"sev-snp-guest","id":"lsec0","cbitpos":47,"policy":196608}'
    assert qemu("-machine", "q35,confidential-guest-support=lsec0", "-object", snp) \
        .requested_type == "SNP"
    es = '{"qom-type":"sev-guest","id":"s","policy":7,"legacy-vm-type":"off"}'
    request = qemu("-machine", "confidential-guest-support=s", "-object", es)
    assert request.requested_type == "SEV_ES"
    assert "legacy-vm-type=off" in request.evidence
    # canonical/tdx's tdxtest passes str() of a Python dict; QEMU's JSON takes '…' strings.
    td = str({"qom-type": "tdx-guest", "id": "tdx"})
    assert qemu("-object", td, "-machine", "q35,confidential-guest-support=tdx") \
        .requested_type == "TDX"


@pytest.mark.parametrize("bad", ['{"qom-type":', '{"id": "x"', "[1,2]", "{" + "[" * 50000,
                                 '{"qom-type": "sev-guest", "id": 7}'])
def test_malformed_json_object_is_not_an_object(bad):
    request = qemu("-machine", "confidential-guest-support=x", "-object", bad)
    assert request.requested_type is None
    assert "names no -object" in request.evidence


def test_machine_given_twice_later_wins_per_key():
    objects = ["-object", "sev-guest,id=a", "-object", "sev-snp-guest,id=b"]
    assert qemu("-machine", "q35,confidential-guest-support=a", *objects,
                "-machine", "confidential-guest-support=b").requested_type == "SNP"
    assert qemu("-M", "confidential-guest-support=b", *objects,
                "--machine", "q35").requested_type == "SNP"  # a later key-less -machine
    assert qemu("-machine", "q35,confidential-guest-support=b", *objects,
                "-machine", "confidential-guest-support=").requested_type == "DEFAULT"


def test_dangling_confidential_guest_support():
    request = qemu("-machine", "q35,confidential-guest-support=cgs9",
                   "-object", "sev-snp-guest,id=cgs0")
    assert request.requested_type is None
    assert request.evidence == "confidential-guest-support='cgs9' names no -object on the " \
                               "command line"


def test_other_confidential_guest_object():
    request = qemu("-machine", "s390-ccw-virtio,confidential-guest-support=pv0",
                   "-object", "s390-pv-guest,id=pv0")
    assert request.requested_type is None
    assert "'s390-pv-guest' object, not an x86 confidential guest" in request.evidence


def test_no_confidential_guest_support_is_default():
    request = qemu("-accel", "kvm", "-machine", "q35", "-object", "sev-guest,id=unused")
    assert (request.requested_type, request.evidence) == ("DEFAULT",
                                                          "no confidential-guest-support")


@pytest.mark.parametrize(("policy", "requested_type"), [
    ("0x1", "SEV"), ("0x5", "SEV_ES"), ("4", "SEV_ES"), ("0X7", "SEV_ES"),
    ("05", "SEV_ES"), ("010", "SEV"),  # C notation: a leading 0 is octal
    ("bogus", None), ("-4", None), ("", None), ("0x", None), ("1_4", None), ("9" * 5000, None),
])
def test_sev_policy(policy, requested_type):
    request = qemu("-machine", "confidential-guest-support=s",
                   "-object", f"sev-guest,id=s,policy={policy}")
    assert request.requested_type == requested_type


def test_sev_legacy_vm_type_is_reported():
    request = qemu("-machine", "confidential-guest-support=s",
                   "-object", "sev-guest,id=s,legacy-vm-type=on")
    assert request.requested_type == "SEV"
    assert "legacy-vm-type=on: QEMU creates a DEFAULT VM" in request.evidence


def test_equals_form_is_not_qemu_syntax():
    # system/vl.c lookup_opt compares the whole word: "-machine=…" is an invalid option.
    request = qemu("-machine=q35,confidential-guest-support=s", "-object", "sev-guest,id=s")
    assert request.requested_type is None
    assert "is not QEMU syntax" in request.evidence


@pytest.mark.parametrize("binary", ["qemu-system-x86_64", "/usr/bin/qemu-system-aarch64",
                                    "/usr/libexec/qemu-kvm", "kvm"])
def test_qemu_binaries(binary):
    assert vmm.parse_argv([binary]).kind == "qemu"


@pytest.mark.parametrize(("platform", "requested_type"), [
    (["--platform", "tdx=on"], "TDX"),
    (["--platform=sev_snp=true"], "SNP"),
    (["--platform", "num_pci_segments=2,tdx=off"], "DEFAULT"),
    (["--platform", 'oem_strings=[a,tdx=on],system_product_name="x,sev_snp=on"'], "DEFAULT"),
    (["--platform", "tdx=maybe"], None),
    ([], "DEFAULT"),
])
def test_cloud_hypervisor_platform(platform, requested_type):
    request = vmm.parse_argv(["cloud-hypervisor-static", "--cpus", "boot=1", *platform])
    assert (request.kind, request.name, request.requested_type) == \
        ("cloud-hypervisor", None, requested_type)


def test_firecracker_id_is_its_own_argument():
    assert vmm.parse_argv(["firecracker", "--id=vm1"]).name is None
    assert vmm.parse_argv(["firecracker", "--id", "vm1", "--", "--id", "x"]).name == "vm1"


def test_crosvm():
    request = vmm.parse_argv(["crosvm", "run", "--name", "vm1", "--mem", "512", "bzImage"])
    assert (request.kind, request.name, request.requested_type) == ("crosvm", "vm1", "DEFAULT")
    assert vmm.parse_argv(["crosvm", "run", "--protected-vm-without-firmware"]) \
        .requested_type is None
    assert vmm.parse_argv(["crosvm", "run", "--", "--protected-vm"]).requested_type == "DEFAULT"


def test_kvmtool_name_both_forms():
    assert vmm.parse_argv(["lkvm", "run", "--name", "g1"]).name == "g1"
    assert vmm.parse_argv(["lkvm", "run", "-n", "mode=tap"]).name is None  # -n is --network


def test_unknown_vmm_names_the_binary():
    request = vmm.parse_argv(["/opt/bin/foo", "-machine", "q35"])
    assert request == vmm.VmmRequest("unknown", None, None,
                                     "unknown VMM: no flag table for 'foo'")
    assert len(vmm.parse_argv(["x" * 100_000]).evidence) < 200


def test_evidence_stays_one_line():
    request = qemu("-machine", "confidential-guest-support=a\nb")
    assert "\n" not in request.evidence and "\\n" in request.evidence


@pytest.mark.parametrize("hostile", [
    b"qemu-system-x86_64\0" + b"-object\0{" + b"[" * (1 << 20) + b"\0",
    b"qemu-system-x86_64\0-name\0" + b"," * (1 << 20) + b"\0",
    b"qemu-system-x86_64\0" + b"-machine\0confidential-guest-support=x\0" * 30000,
    b"qemu-system-x86_64\0" + b"\0" * (1 << 20),
    b"cloud-hypervisor\0--platform\0" + b"[" * (1 << 20),
    b"\xff" * (1 << 20),
])
def test_hostile_megabyte_is_bounded(hostile):
    request = vmm.parse_cmdline(hostile)
    assert request == vmm.parse_cmdline(hostile[: vmm.CMDLINE_LIMIT])
    assert "\n" not in request.evidence


def test_parse_argv_is_bounded_too():
    argv = ["qemu-system-x86_64", *["-S"] * 100_000, "-machine", "confidential-guest-support=x"]
    request = vmm.parse_argv(argv)
    assert request.requested_type is None and "cut short" in request.evidence


def test_read_cmdline(tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cmdline").write_bytes(nul(SNP_ARGV))
    assert vmm.read_cmdline(42, proc=tmp_path) == nul(SNP_ARGV)
    (tmp_path / "43").mkdir()
    (tmp_path / "43" / "cmdline").write_bytes(b"a" * (vmm.CMDLINE_LIMIT * 2))
    assert len(vmm.read_cmdline(43, proc=tmp_path)) == vmm.CMDLINE_LIMIT


def test_read_cmdline_of_gone_or_unreadable_process_is_none(tmp_path):
    assert vmm.read_cmdline(99, proc=tmp_path) is None  # ENOENT: gone
    (tmp_path / "7").write_text("not a directory")
    assert vmm.read_cmdline(7, proc=tmp_path) is None  # ENOTDIR
    (tmp_path / "8" / "cmdline").mkdir(parents=True)
    assert vmm.read_cmdline(8, proc=tmp_path) is None  # EISDIR


def test_read_cmdline_of_this_process():
    import os

    raw = vmm.read_cmdline(os.getpid())
    assert raw is not None and raw.endswith(b"\0")
    assert vmm.parse_cmdline(raw).kind == "unknown"  # python, not a VMM
