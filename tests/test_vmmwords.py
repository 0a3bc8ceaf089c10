"""kvmtrace.vmmwords: where a process's stderr goes, and reading its words back.

Real processes of this test (a child whose stderr is a file, a pipe, /dev/null) and a
fixture /proc tree BUILT BY HAND for what a test cannot make without root (the journal's
stream, another user's process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from kvmtrace import vmmwords

CHILD = [sys.executable, "-c", "import sys,time; sys.stderr.write(sys.argv[1]); "
         "sys.stderr.flush(); time.sleep(30)"]


def _child(text: str, stderr) -> subprocess.Popen:
    p = subprocess.Popen([*CHILD, text], stderr=stderr, stdout=subprocess.DEVNULL)
    time.sleep(0.5)  # it has written
    return p


def test_a_file_is_read_back_from_where_it_stood_when_first_seen(tmp_path):
    log = tmp_path / "vm.log"
    log.write_text("an earlier run's line\n")
    with open(log, "a") as f:
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             stderr=f, stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        where = vmmwords.resolve(p.pid)
        assert where == vmmwords.Stderr("file", str(log), len("an earlier run's line\n"))
        with open(log, "a") as f:
            f.write("qemu: failed to initialize kvm: Operation not permitted\n\x1b[0m\n")
        text, note = vmmwords.words(where, p.pid)
        assert text == "qemu: failed to initialize kvm: Operation not permitted\n\\x1b[0m\n"
        assert note == f"stderr: {log}"
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize(("stderr", "kind", "note"), [
    (subprocess.PIPE, "pipe", "stderr: a pipe (pipe:["),
    (subprocess.DEVNULL, "null", "stderr: /dev/null (discarded) (/dev/null), not captured"),
])
def test_what_cannot_be_read_back_says_so(stderr, kind, note):
    p = _child("words nobody keeps", stderr)
    try:
        where = vmmwords.resolve(p.pid)
        assert where.kind == kind
        text, got = vmmwords.words(where, p.pid)
        assert text is None and got.startswith(note), got
    finally:
        p.kill()
        p.wait()


def test_a_process_gone_before_it_was_seen_and_libvirts_log_by_name(tmp_path):
    gone = vmmwords.resolve(2**22 + 12345)  # no such pid
    assert gone == "not resolved: the process ended before kvmtrace could look at it"
    assert vmmwords.words(gone, 1) == (None, f"stderr: {gone}")
    logs = tmp_path / "qemu"
    logs.mkdir()
    (logs / "web1.log").write_text("2026-12-05 starting up libvirt\n"
                                   "qemu-system-x86_64: vm-type SEV-SNP not supported by KVM\n")
    text, note = vmmwords.words(gone, 1, "web1", str(logs))
    assert text.endswith("vm-type SEV-SNP not supported by KVM\n")
    assert note.startswith(f"libvirt's domain log of VM web1 ({logs}/web1.log; stderr")


def test_only_the_last_4_kib_from_a_line_start(tmp_path):
    raw = b"".join(f"line {i:05d}\n".encode() for i in range(1000))
    text = vmmwords.escape(raw)
    assert len(text) <= vmmwords.WORDS_MAX and text.startswith("line ")
    assert text.endswith("line 00999\n")


def test_journal_stream_and_another_users_process_from_a_fixture_proc(tmp_path):
    """Hand-built /proc entries: fd 2 a socket systemd named in $JOURNAL_STREAM; an
    fd directory this process may not read."""
    pid = tmp_path / "4242"
    (pid / "fd").mkdir(parents=True)
    os.symlink("socket:[98765]", pid / "fd" / "2")
    (pid / "environ").write_bytes(b"PATH=/usr/bin\0JOURNAL_STREAM=8:98765\0")
    assert vmmwords.resolve(4242, tmp_path) == vmmwords.Stderr("journal", "socket:[98765]")
    (pid / "environ").write_bytes(b"JOURNAL_STREAM=8:1\0")
    assert vmmwords.resolve(4242, tmp_path).kind == "socket"
    if os.geteuid() != 0:  # root reads any mode
        other = tmp_path / "4243"
        (other / "fd").mkdir(parents=True)
        os.chmod(other / "fd", 0)
        assert "CAP_SYS_PTRACE" in vmmwords.resolve(4243, tmp_path)
