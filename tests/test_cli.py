"""Command-line errors: one line, non-zero exit, never a traceback."""

import json
import os
import shutil
import subprocess

import pytest

from kvmtrace import contract
from tests.conftest import KERNELS, KVMTRACE


def run(*args, user=None, timeout=60):
    cmd = [*KVMTRACE, *args]
    if user is not None and os.geteuid() == 0:
        cmd = [shutil.which("setpriv"), "--reuid", user, "--regid", user, "--clear-groups", *cmd]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=os.path.dirname(KERNELS.parent), check=False)


def assert_one_line_error(proc, code, *needles):
    assert proc.returncode == code, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize(("args", "needle"), [
    (["trace", "--bogus"], "unrecognized arguments: --bogus"),
    (["trace", "-p", "abc"], "not a number"),
    (["trace", "-p", "-3"], "must be positive"),
    (["trace", "--duration", "0"], "must be positive"),
    (["trace", "-p", "4294967297"], "not a pid (at most 4194304)"),
    (["explain", "-p", "4194305"], "not a pid"),
    (["serve", "--retire-interval", "inf"], "at most 604800 seconds"),
    (["serve", "--retire-interval", "nan"], "must be positive"),
    (["trace", "--duration", "1e9"], "at most 604800 seconds"),
    (["serve", "--retire-interval", "x"], "not a number"),
    (["serve", "--metrics.labels", "vm,ip"], "not a list of distinct labels of vm,unit,pod"),
    (["serve", "--metrics.labels=pod,pod"], "not a list of distinct labels"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_usage_errors(args, needle):
    assert_one_line_error(run(*args), 2, needle)


@pytest.mark.parametrize("addr", ["nonsense", "host:", ":99999", ":0", "1.2.3.4:http"])
def test_bad_listen_address(addr):
    assert_one_line_error(run("serve", "--web.listen-address", addr), 1,
                          "bad listen address", "--web.listen-address")


def test_unprivileged_is_one_clear_line_per_missing_piece():
    """No capabilities, no kvm group: one ERROR line per missing piece, each naming the
    capability or group (kvmtrace.privileges; tests/privileged/test_privileged_service.py
    takes them away one at a time), no traceback."""
    if os.geteuid() != 0:
        proc = run("trace")
    else:
        proc = run("trace", user="65534")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc
    lines = proc.stderr.strip().splitlines()
    assert lines and all(ln.startswith("ERROR: ") for ln in lines), proc.stderr
    assert any("missing capability CAP_BPF" in ln for ln in lines), proc.stderr


def test_bad_facts_file(tmp_path):
    """A facts file that cannot be read or is not what --dump-facts writes: one line,
    exit 2 (doctor could not decide anything)."""
    assert_one_line_error(run("doctor", "--facts", "/nonexistent.json"), 2, "cannot read facts")
    assert_one_line_error(run("doctor", "--facts", str(KERNELS / "README.md")), 2,
                          "bad facts file")
    # An endless file is read up to the cap (1 MiB), not into memory whole.
    assert_one_line_error(run("doctor", "--facts", "/dev/zero"), 2, "bad facts file",
                          "larger than 1024 KiB")
    (tmp_path / "list.json").write_text("[1, 2]")
    assert_one_line_error(run("doctor", "--facts", str(tmp_path / "list.json")), 2,
                          "not a JSON object")
    (tmp_path / "ev.json").write_text('{"kernel_release": "6.12", "arch": "x86_64", '
                                      '"evidence": {"cpu_flags": "sev"}}')
    assert_one_line_error(run("doctor", "--facts", str(tmp_path / "ev.json")), 2,
                          "bad facts file", "evidence.cpu_flags")
    (tmp_path / "ev2.json").write_text('{"kernel_release": "6.12", "arch": "x86_64", '
                                       '"evidence": {"sev_firmware": "1.55"}}')
    assert_one_line_error(run("doctor", "--facts", str(tmp_path / "ev2.json")), 2,
                          "bad facts file", "unknown keys")
    assert_one_line_error(run("doctor", "--facts", str(KERNELS / "seed-tdx-v12-kprobes.json"),
                              "--type", "SEV,QUANTUM"), 2, "--type QUANTUM", "SNP")


def test_doctor_and_ebpf_without_root_name_what_is_missing():
    """Not root: tracefs (mode 0700) cannot be read. doctor says so and fails, with no
    traceback; --ebpf still prints the program of the plan this process can make."""
    proc = run("doctor", user="65534")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR: ")]
    assert errors and errors[0].startswith("ERROR: not root"), proc.stderr
    if os.geteuid() == 0:  # each missing requirement named, as serve would say it
        for need in ("CAP_BPF", "CAP_PERFMON", "tracefs"):
            assert any(need in e for e in errors[1:]), proc.stderr
        assert "MISSING CAP_BPF" in proc.stdout
    if os.geteuid() == 0:  # as uid 65534: tracefs is there but unreadable
        assert "permission denied" in proc.stdout + proc.stderr, proc.stdout
    proc = run("trace", "--ebpf", user="65534")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "#define KVM_CREATE_VM 0xae01" in proc.stdout


def test_doctor_plans_for_another_kernel_without_root():
    proc = run("doctor", "--json", "--facts", str(KERNELS / "seed-tdx-v12-kprobes.json"),
               user="65534")
    report = json.loads(proc.stdout)
    pts = {p["probe"]: p for p in report["points"]}
    assert pts["vmx_is_vm_type_supported"]["mechanism"] == "kprobe"
    assert report["attach_tested"] is False
    assert report["kvm"]["vm_types"] == [{"vm_type": 0, "name": "DEFAULT"},
                                         {"vm_type": 1, "name": "SW_PROTECTED"}]


def test_ebpf_prints_the_program_for_the_plan():
    proc = run("trace", "--ebpf", "--facts", str(KERNELS / "seed-tdx-v12-kprobes.json"))
    assert proc.returncode == 0, proc.stderr
    assert "#define IOCTL_KPROBE 1" in proc.stdout
    assert "FN_KPROBE(2, 2, int)" in proc.stdout  # kvm_arch_init_vm: type is arg 2
    # vmx_is_vm_type_supported: bool
    assert f"FN_KPROBE({contract.FIRST_TYPE_CHECK + 1}, 1, u8)" in proc.stdout
    proc = run("trace", "--ebpf", "--facts", str(KERNELS / "firecracker-6.18-no-kprobes.json"))
    assert "#define IOCTL_TRACEPOINT 1" in proc.stdout and "FN_KPROBE(" not in \
        proc.stdout.split("Generated by the loader")[1]


def test_help_has_examples():
    for cmd in ("serve", "trace", "doctor"):
        proc = run(cmd, "--help")
        assert proc.returncode == 0 and "examples:" in proc.stdout


def test_pid_and_name_filters_let_through_only_whom_they_name():
    """-p and -n as trace and explain apply them (the privileged tier's shared trace and
    explain run unfiltered, so the filter itself is held here)."""
    from argparse import Namespace

    from kvmtrace.cli import build_parser
    from kvmtrace.commands.common import wanted

    everyone = Namespace(pid=0, name=None)
    assert wanted(everyone, 1, "qemu-system-x86") and wanted(everyone, 2, "")
    by_name = Namespace(pid=0, name="qemu")
    assert wanted(by_name, 7, "qemu-system-x86")  # a substring of the comm, as bcc tools
    assert not wanted(by_name, 7, "kvmtool")
    by_pid = Namespace(pid=42, name=None)
    assert wanted(by_pid, 42, "x") and not wanted(by_pid, 43, "x")
    both = Namespace(pid=42, name="qemu")
    assert wanted(both, 42, "qemu-kvm") and not wanted(both, 42, "crosvm")
    assert not wanted(both, 41, "qemu-kvm")
    parsed = build_parser().parse_args(["trace", "-p", "42", "-n", "qemu"])
    assert wanted(parsed, 42, "qemu-system-x86") and not wanted(parsed, 42, "vmm")
