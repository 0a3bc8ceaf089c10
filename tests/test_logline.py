"""kvmtrace.logline: the one structured line per failed VM start (logfmt, JSON, journal).

The starts are stitched from hand-built records (tests/test_starts.py's shapes). The
journal case sends to a real AF_UNIX datagram socket the test binds in place of
journald's (no systemd runs here), and parses what arrived by the native protocol."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket

import pytest

from kvmtrace import contract as C
from kvmtrace import logline, starts, vmm
from kvmtrace.contract import PROC_CALL_FAILED, PROC_CREATED, PROC_EXIT_CODE, PROC_QUERIED
from kvmtrace.decode import Decoder
from kvmtrace.plan import make_plan

SNP_ARGV = ["qemu-system-x86_64", "-machine", "q35,confidential-guest-support=s0",
            "-object", "sev-snp-guest,id=s0,cbitpos=51", "-name", "guest=web 1,debug-threads=on"]


@pytest.fixture
def stitch(kernel_facts):
    d = Decoder(make_plan(kernel_facts("firecracker-6.18-no-kprobes")), "x86_64")

    def make(raws, argv=None):
        recs = [d.count((*r[:6], b"qemu-system-x86", r[6])) for r in raws]
        (s,) = starts.stitch(recs, vmm.parse_argv(argv) if argv else vmm.NOT_KNOWN)
        return s
    return make


def snp_refused(stitch):
    return stitch([(7, C.PROBE_VM_TYPES_QUERY, 0, 1, 0, 0, 1),
                   (7, C.PROBE_PROCESS_END, 1, 1 << 8, PROC_QUERIED | PROC_EXIT_CODE, 0, 1)],
                  SNP_ARGV)


def memfd_refused(stitch):
    return stitch([(9, C.PROBE_CREATE_VM, 0, 0, 0, 0, 1),
                   (9, C.PROBE_KVM_CALL, 0, -13, 0xC040AED4, 0, 1),
                   (9, C.PROBE_PROCESS_END, 0, 1 << 8,
                    PROC_CREATED | PROC_EXIT_CODE | PROC_CALL_FAILED, 0, 1)])


def test_logfmt_line_carries_stage_cause_type_vm_pid_and_errno(stitch):
    s = snp_refused(stitch)
    text = logline.line(s, "logfmt", now=1_764_930_000.25)
    assert text == ('time=2025-12-05T10:20:00.250Z level=WARN source=starts '
                    'msg="VM start failed" stage=before_create cause=type_not_offered '
                    'reason=vmm_refused_type requested_type=SNP vm="web 1" pid=7 '
                    'comm=qemu-system-x86')
    assert "\n" not in text


def test_json_line_and_the_deciding_errno(stitch):
    s = memfd_refused(stitch)
    data = json.loads(logline.line(s, "json", now=0))
    assert data == {"time": "1970-01-01T00:00:00.000Z", "level": "WARN",
                    "source": "starts", "msg": "VM start failed", "stage": "during_launch",
                    "cause": "memory_setup", "reason": "setup_failed",
                    "requested_type": "not_known", "pid": 9, "comm": "qemu-system-x86",
                    "errno": "EACCES"}


def test_the_owner_unit_pod_and_domain_where_known(stitch):
    s = dataclasses.replace(snp_refused(stitch), owner={
        "unit": "cri-containerd-ab.scope", "pod_uid": "1e597579-417e-482f-bf65-5fe170c3aebd",
        "namespace": "default", "vm": "testvm"})  # BUILT BY HAND
    text = logline.line(s, "logfmt", now=0)
    assert text.endswith(" unit=cri-containerd-ab.scope "
                         "pod=1e597579-417e-482f-bf65-5fe170c3aebd namespace=default "
                         "domain=testvm")


def test_the_vmm_words_first_line_only_and_a_clean_start_writes_nothing(stitch):
    import dataclasses
    s = dataclasses.replace(snp_refused(stitch),
                            vmm_words="\nqemu: vm-type SEV-SNP not supported by KVM\nmore\n")
    assert logline.fields(s)["vmm_words"] == "qemu: vm-type SEV-SNP not supported by KVM"
    out = io.StringIO()
    log = logline.StartLog("logfmt", out, journal=False, clock=lambda: 0)
    log(dataclasses.replace(s, outcome=starts.CLEAN))
    assert out.getvalue() == ""
    log(s)
    assert out.getvalue().count("\n") == 1 and 'vmm_words="qemu: vm-type' in out.getvalue()


def _parse_native(datagram: bytes) -> dict[str, str]:
    out, rest = {}, datagram
    while rest:
        head, _, tail = rest.partition(b"\n")
        if b"=" in head:
            k, _, v = head.partition(b"=")
            out[k.decode()] = v.decode()
            rest = tail
        else:
            n = int.from_bytes(tail[:8], "little")
            out[head.decode()] = tail[8:8 + n].decode()
            rest = tail[8 + n + 1:]
    return out


def test_under_systemd_the_fields_go_to_the_journal(stitch, tmp_path):
    sock_path = str(tmp_path / "journal.socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journald:
        journald.bind(sock_path)
        out = io.StringIO()
        logline.StartLog("logfmt", out, journal=True, journal_socket=sock_path)(
            memfd_refused(stitch))
        got = _parse_native(journald.recv(65536))
    assert out.getvalue() == ""  # the journal has it, with its fields
    assert got["PRIORITY"] == "4" and got["SYSLOG_IDENTIFIER"] == "kvmtrace"
    assert got["MESSAGE"].startswith("VM start failed: during_launch: pid 9")
    assert (got["KVMTRACE_CAUSE"], got["KVMTRACE_ERRNO"], got["KVMTRACE_PID"]) == (
        "memory_setup", "EACCES", "9")
    # journald gone: the line still goes to stderr (which systemd also reads).
    out = io.StringIO()
    logline.StartLog("logfmt", out, journal=True,
                     journal_socket=str(tmp_path / "none"))(memfd_refused(stitch))
    assert "cause=memory_setup" in out.getvalue()


def test_a_value_with_a_newline_uses_the_binary_form(stitch):
    import dataclasses
    s = dataclasses.replace(memfd_refused(stitch), summary="two\nlines")
    got = _parse_native(logline.journal_datagram(s))
    assert got["MESSAGE"] == "VM start failed: two\nlines"


def test_stderr_is_the_journal_only_when_journal_stream_names_it(tmp_path):
    f = tmp_path / "stream"
    f.write_text("")
    fd = os.open(f, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        assert logline.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd)
        assert not logline.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:1"}, fd)
        assert not logline.stderr_is_journal({"JOURNAL_STREAM": "junk"}, fd)
        assert not logline.stderr_is_journal({}, fd)
    finally:
        os.close(fd)
