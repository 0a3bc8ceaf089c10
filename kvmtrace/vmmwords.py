"""The VMM's own words: the last lines a process wrote to its standard error.

Where a VMM's stderr goes is resolved while it lives (:func:`resolve`: /proc/PID/fd/2,
its offset, and whether systemd made it the journal), as soon as kvmtrace first sees it
(the kernel wakes the reader for a process's first KVM call, so a VMM that gives up
within milliseconds is still there). A file is opened then, through /proc/PID/fd/2: the
very file, whatever mount namespace either process has (systemd's PrivateTmp) and
whatever becomes of its name (rotated, deleted). Read back once its start failed
(:func:`words`): from a file, what was written since it was first seen; from the journal,
``journalctl _PID=``. A pipe, a terminal or a socket cannot be read back: then the note
says so, never nothing. Where fd 2 could not be resolved, QEMU started by libvirt still
has its domain log, found by the VM's name. At most WORDS_MAX bytes, the last ones,
escaped (printable ASCII, newlines; the rest as \\xNN). Never in a metric label.

No capture in the kernel: a hook on write(2) would slow every write on the host
(docs/benchmarks.md measures what kvmtrace costs a write loop: nothing).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvmtrace import contract

WORDS_MAX = 4096
LIBVIRT_QEMU_LOGS = "/var/log/libvirt/qemu"  # libvirt's domain logs: NAME.log
JOURNAL_TIMEOUT = 5.0


@dataclass(frozen=True)
class Stderr:
    """Where a process's fd 2 went: ``kind`` file, journal, pipe, socket, tty, null or
    other; ``target`` what /proc/PID/fd/2 links to; ``offset`` the file position then;
    ``fd`` the file opened through /proc (None: not opened; read by ``target``). Whoever
    holds one closes it with :func:`release`."""

    kind: str
    target: str
    offset: int = 0
    fd: int | None = field(default=None, compare=False)


def release(where: Stderr | str | None) -> None:
    """Close the file a :class:`Stderr` holds (a start that did not fail, an eviction)."""
    if isinstance(where, Stderr) and where.fd is not None:
        try:
            os.close(where.fd)
        except OSError:
            pass


def escape(raw: bytes) -> str:
    """The last WORDS_MAX bytes, cut at a line start where there is one, as text:
    printable ASCII and newlines as they are, everything else as \\xNN."""
    raw = raw[-WORDS_MAX:]
    if len(raw) == WORDS_MAX and b"\n" in raw[:-1]:
        raw = raw[raw.index(b"\n") + 1:]
    return "".join(chr(b) if 0x20 <= b < 0x7F or b == 0x0A else f"\\x{b:02x}" for b in raw)


def _journal(proc: Path, pid: int, target: str) -> bool:
    """systemd set $JOURNAL_STREAM=DEVICE:INODE for the stream it gave the process."""
    try:
        env = (proc / str(pid) / "environ").read_bytes()
    except OSError:
        return False
    for var in env.split(b"\0"):
        if var.startswith(b"JOURNAL_STREAM="):
            inode = var.split(b":")[-1].decode(errors="replace")
            return target == f"socket:[{inode}]"
    return False


def _open(link: Path) -> int | None:
    """The regular file behind ``link`` opened for reading (never a pipe or a socket:
    reading those would take the bytes from whoever they are for), or None."""
    try:
        fd = os.open(link, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def resolve(pid: int, proc: str | os.PathLike = "/proc", hold: bool = True) -> Stderr | str:
    """Where process ``pid``'s stderr goes, or why that cannot be told (a string);
    ``hold``: a regular file is opened (see :class:`Stderr`)."""
    proc = Path(proc)
    link = proc / str(pid) / "fd" / "2"
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return "not resolved: the process ended before kvmtrace could look at it"
    except PermissionError:
        return ("not resolved: /proc/PID/fd is not readable by kvmtrace (another user's "
                "process, or one with capabilities kvmtrace does not hold: run as root, or "
                "grant CAP_SYS_PTRACE)")
    except OSError as exc:
        return f"not resolved: {exc.strerror or exc}"
    if target == "/dev/null":
        return Stderr("null", target)
    if target.startswith("pipe:"):
        return Stderr("pipe", target)
    if target.startswith("socket:"):
        return Stderr("journal" if _journal(proc, pid, target) else "socket", target)
    if target.startswith(("/dev/pts/", "/dev/tty")) or target == "/dev/console":
        return Stderr("tty", target)
    if target.startswith("/"):
        # stat() first: only a regular file is ever opened (see _open).
        fd = None
        if hold:
            try:
                if stat.S_ISREG(os.stat(link).st_mode):
                    fd = _open(link)
            except OSError:
                pass
        try:
            info = (proc / str(pid) / "fdinfo" / "2").read_text()
            pos = next(int(ln.split()[1]) for ln in info.splitlines() if ln.startswith("pos:"))
        except (OSError, StopIteration, ValueError, IndexError):
            pos = 0
        return Stderr("file", target, pos, fd)
    return Stderr("other", target)


def _kernel_dev(dev: int) -> tuple[int, int]:
    """(major, minor) of a kernel dev_t (MAJOR << 20 | MINOR)."""
    return dev >> 20, dev & 0xFFFFF


def _tty(major: int) -> bool:
    return major in (4, 5) or 136 <= major <= 143  # ttys, /dev/tty and the console, pts


def _identities(fd: int, proc: str = "/proc") -> set[tuple[int, tuple[int, int]]]:
    """(inode number, (major, minor)) of an open file as stat(2) says, and as the kernel
    holds it (``/proc/self/fdinfo``'s ino, and its mount's device in mountinfo). They
    differ on overlayfs: stat gives the real file's, the fd holds the overlay's inode --
    which is what the kernel read of fd 2."""
    st = os.fstat(fd)
    out = {(st.st_ino, (os.major(st.st_dev), os.minor(st.st_dev)))}
    try:
        info = dict(line.split(":", 1) for line in
                    Path(proc, "self", "fdinfo", str(fd)).read_text().splitlines() if ":" in line)
        ino, mnt_id = int(info["ino"]), info["mnt_id"].strip()
        for line in Path(proc, "self", "mountinfo").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[0] == mnt_id:
                major, minor = parts[2].split(":")
                out.add((ino, (int(major), int(minor))))
                break
    except (OSError, KeyError, ValueError):
        pass  # an older kernel's fdinfo has no ino: stat's alone
    return out


def from_kernel(raw: bytes) -> Stderr | str:
    """Where fd 2 went, from what the kernel read of it when the process was first
    followed (struct vmm_stderr), or why that cannot be used (a string). A file is
    opened at the path the kernel walked and held only if it is the very inode."""
    ino, pos, dev, rdev, mode, depth, flags, names = contract.VMM_STDERR.unpack(raw)
    if flags & contract.STDERR_NO_FILE:
        return "fd 2 was not open"
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFIFO:
        return Stderr("pipe", f"pipe:[{ino}]")
    if kind == stat.S_IFSOCK:
        return Stderr("socket", f"socket:[{ino}]")
    if kind == stat.S_IFCHR:
        major, minor = _kernel_dev(rdev)
        if (major, minor) == (1, 3):
            return Stderr("null", "/dev/null")
        return Stderr("tty" if _tty(major) else "other", f"char device {major}:{minor}")
    if kind != stat.S_IFREG:
        return f"the kernel read fd 2 as mode {mode:#o}, not a file it can name"
    size = contract.STDERR_NAME_LEN
    parts = [names[i * size:(i + 1) * size].split(b"\0", 1)[0].decode(errors="replace")
             for i in range(min(depth, contract.STDERR_NAMES))]
    path = "/" + "/".join(reversed(parts))
    if flags & contract.STDERR_TRUNCATED:
        return f"{path} is only the end of its path (deeper than {contract.STDERR_NAMES})"
    # The kernel walks up to its mount namespace's root; kvmtrace may live below it (a
    # chroot, a container's root): the path's tails too -- the very inode, or nothing.
    why = None
    for k in range(len(parts), 0, -1):
        tail = "/" + "/".join(reversed(parts[:k]))
        try:
            fd = os.open(tail, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            why = why or f"{path} (as the kernel saw it): {exc.strerror or exc}"
            continue
        if (ino, _kernel_dev(dev)) in _identities(fd):
            return Stderr("file", tail, max(pos, 0), fd)
        os.close(fd)
        why = why or (f"{path} (as the kernel saw it) is another file here (another mount "
                      "namespace, or it was replaced)")
    return why or f"{path}: no name to open"


def combine(where: Stderr | str | None, raw: bytes | None) -> Stderr | str | None:
    """Where /proc said stderr went (``where``) and what the kernel read of fd 2 when the
    process was first followed (``raw``, or None): /proc's file from the kernel's
    offset where both name the same inode (the kernel looked first: before any word);
    else the kernel's view where /proc had none; else both reasons."""
    if raw is None:
        return where
    if isinstance(where, Stderr):
        if where.kind != "file" or where.fd is None:
            return where
        ino, pos = contract.VMM_STDERR.unpack(raw)[:2]
        try:
            same = os.fstat(where.fd).st_ino == ino
        except OSError:
            same = False
        return replace(where, offset=min(where.offset, max(pos, 0))) if same else where
    kernel = from_kernel(raw)
    if isinstance(kernel, Stderr):
        return kernel
    return f"{where or 'not resolved from /proc'}; the kernel's view: {kernel}"


def _tail(fd: int, offset: int) -> bytes:
    end = os.fstat(fd).st_size
    start = max(offset, end - WORDS_MAX) if offset <= end else max(0, end - WORDS_MAX)
    return os.pread(fd, end - start, start)


def _read_file(path: str, offset: int, fd: int | None = None) -> tuple[str | None, str | None]:
    try:
        if fd is not None:
            raw = _tail(fd, offset)
        else:
            with open(path, "rb") as f:
                raw = _tail(f.fileno(), offset)
    except OSError as exc:
        return None, f"{path}: {exc.strerror or exc}"
    if not raw.strip():
        return None, f"{path}: nothing written since kvmtrace first saw the process"
    return escape(raw), None


def _read_journal(pid: int) -> tuple[str | None, str | None]:
    tool = shutil.which("journalctl")
    if tool is None:
        return None, "the journal (journalctl is not installed here)"
    try:
        p = subprocess.run([tool, f"_PID={pid}", "-o", "cat", "-q", "--no-pager", "-n", "50"],
                           capture_output=True, timeout=JOURNAL_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"the journal: journalctl failed ({exc})"
    if p.returncode != 0 or not p.stdout.strip():
        return None, (f"the journal: journalctl _PID={pid} gave nothing (exit {p.returncode}; "
                      "reading it needs group systemd-journal or root)")
    return escape(p.stdout), None


def words(where: Stderr | str | None, pid: int, vm_name: str | None = None,
          libvirt_logs: str = LIBVIRT_QEMU_LOGS) -> tuple[str | None, str]:
    """(the words, or None; and where they come from, or why there are none)."""
    if isinstance(where, Stderr):
        if where.kind == "file":
            text, why = _read_file(where.target, where.offset, where.fd)
            return text, f"stderr: {where.target}" if text else f"stderr: {why}"
        if where.kind == "journal":
            text, why = _read_journal(pid)
            return text, "stderr: the journal" if text else f"stderr: {why}"
        what = {"pipe": "a pipe", "socket": "a socket", "tty": "a terminal",
                "null": "/dev/null (discarded)"}.get(where.kind, "not a file")
        return None, f"stderr: {what} ({where.target}), not captured"
    why = where or "not resolved: kvmtrace never saw the process alive"
    if vm_name:
        log = Path(libvirt_logs) / f"{vm_name}.log"
        if log.exists():
            text, err = _read_file(str(log), 0)
            if text:
                return text, (f"libvirt's domain log of VM {vm_name} ({log}; stderr itself "
                              f"was {why})")
            return None, f"stderr: {why}; libvirt's domain log: {err}"
    return None, f"stderr: {why}"
