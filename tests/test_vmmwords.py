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


# struct vmm_stderr as the kernel fills it, BUILT BY HAND here from a real file's stat
# (the privileged tier has the kernel fill it: test_privileged_service, _starts).
def _kernel_view(path=None, *, mode=None, ino=0, pos=0, dev=0, rdev=0, flags=0, names=None,
                 depth=None) -> bytes:
    if path is not None:
        st = os.stat(path)
        mode, ino, dev = st.st_mode, st.st_ino, os.major(st.st_dev) << 20 | os.minor(st.st_dev)
        names = names or [p for p in reversed(str(path).split("/")) if p]
    names = names or []
    size = vmmwords.contract.STDERR_NAME_LEN
    blob = b"".join(n.encode()[:size - 1].ljust(size, b"\0") for n in names)
    blob = blob.ljust(vmmwords.contract.STDERR_NAMES_BYTES, b"\0")
    return vmmwords.contract.VMM_STDERR.pack(ino, pos, dev, rdev, mode or 0,
                                             len(names) if depth is None else depth, flags,
                                             blob)


def test_the_kernels_view_of_a_file_is_opened_only_if_it_is_that_inode(tmp_path):
    log = tmp_path / "domain.log"
    log.write_text("before\nqemu: cbitpos check failed\n")
    where = vmmwords.from_kernel(_kernel_view(log, pos=len("before\n")))
    try:
        assert (where.kind, where.target, where.offset) == ("file", str(log), 7)
        text, note = vmmwords.words(where, 1)
        assert (text, note) == ("qemu: cbitpos check failed\n", f"stderr: {log}")
    finally:
        vmmwords.release(where)
    other = tmp_path / "other.log"
    other.write_text("")
    raw = bytearray(_kernel_view(log))
    raw[:8] = os.stat(other).st_ino.to_bytes(8, "little")
    got = vmmwords.from_kernel(bytes(raw))
    assert got == f"{log} (as the kernel saw it) is another file here (another mount " \
        "namespace, or it was replaced)"
    assert "No such file" in vmmwords.from_kernel(_kernel_view(log, names=["gone", "x"]))


@pytest.mark.parametrize(("fields", "want"), [
    ({"mode": 0o10600, "ino": 77}, vmmwords.Stderr("pipe", "pipe:[77]")),
    ({"mode": 0o140777, "ino": 9}, vmmwords.Stderr("socket", "socket:[9]")),
    ({"mode": 0o20666, "rdev": 1 << 20 | 3}, vmmwords.Stderr("null", "/dev/null")),
    ({"mode": 0o20620, "rdev": 136 << 20 | 4}, vmmwords.Stderr("tty", "char device 136:4")),
    ({"mode": 0o20600, "rdev": 10 << 20 | 232}, vmmwords.Stderr("other", "char device 10:232")),
    ({"flags": 1}, "fd 2 was not open"),
    ({"mode": 0o40755}, "the kernel read fd 2 as mode 0o40755, not a file it can name"),
    ({"mode": 0o100644, "names": ["leaf", "deep"], "flags": 2},
     "/deep/leaf is only the end of its path (deeper than 16)"),
])
def test_what_the_kernel_saw_that_is_not_a_file(fields, want):
    assert vmmwords.from_kernel(_kernel_view(**fields)) == want


def test_procs_file_reads_from_the_kernels_earlier_offset_else_the_kernels_view(tmp_path):
    log = tmp_path / "vm.log"
    log.write_text("start\nlater\n")
    fd = os.open(log, os.O_RDONLY)
    proc = vmmwords.Stderr("file", str(log), 12, fd)
    try:
        assert vmmwords.combine(proc, None) is proc
        assert vmmwords.combine(proc, _kernel_view(log, pos=6)).offset == 6
        assert vmmwords.combine(proc, _kernel_view(mode=0o100644, ino=1, pos=0)) == proc
        pipe = vmmwords.Stderr("pipe", "pipe:[5]")
        assert vmmwords.combine(pipe, _kernel_view(log)) is pipe
        kernel = vmmwords.combine("readlink: Permission denied", _kernel_view(log, pos=6))
        assert (kernel.target, kernel.offset) == (str(log), 6)
        vmmwords.release(kernel)
        both = vmmwords.combine(None, _kernel_view(flags=1))
        assert both == "not resolved from /proc; the kernel's view: fd 2 was not open"
    finally:
        os.close(fd)


def test_an_overlays_file_is_known_by_the_inode_its_fd_holds(tmp_path):
    """stat(2) and the fd's own inode (fdinfo's ino, its mount's device) are both
    identities of an open file: on overlayfs they differ. The fdinfo and mountinfo
    here are BUILT BY HAND; the privileged tier opens a real overlay's file."""
    log = tmp_path / "vm.log"
    log.write_text("x\n")
    fd = os.open(log, os.O_RDONLY)
    try:
        proc = tmp_path / "proc"
        (proc / "self" / "fdinfo").mkdir(parents=True)
        (proc / "self" / "fdinfo" / str(fd)).write_text(
            "pos:\t0\nflags:\t0100000\nmnt_id:\t41\nino:\t777\n")
        (proc / "self" / "mountinfo").write_text(
            "40 1 0:30 / /tmp rw - tmpfs tmpfs rw\n41 40 0:52 / /tmp/m rw - overlay o rw\n")
        st = os.fstat(fd)
        assert vmmwords._identities(fd, str(proc)) == {
            (st.st_ino, (os.major(st.st_dev), os.minor(st.st_dev))), (777, (0, 52))}
        (proc / "self" / "fdinfo" / str(fd)).write_text("pos:\t0\nflags:\t0100000\n")
        assert len(vmmwords._identities(fd, str(proc))) == 1  # no ino there: stat's alone
    finally:
        os.close(fd)


def test_a_path_from_above_kvmtraces_root_is_found_by_its_tail(tmp_path):
    """The kernel walks to its mount namespace's root; kvmtrace in a chroot below it (the
    kernel tier's Debian 13 root: measured there) sees the same file by the path's tail.
    The struct is BUILT BY HAND: the real file's parts under a root three levels up."""
    log = tmp_path / "domain.log"
    log.write_text("qemu: gone\n")
    names = [p for p in reversed(str(log).split("/")) if p] + ["root", "trixie", "userland"]
    where = vmmwords.from_kernel(_kernel_view(log, names=names))
    try:
        assert (where.kind, where.target) == ("file", str(log)), where
    finally:
        vmmwords.release(where)
