"""The VMM's own words: the last lines a process wrote to its standard error.

Where a VMM's stderr goes is resolved while it lives (:func:`resolve`: /proc/PID/fd/2,
its offset, and whether systemd made it the journal), as soon as kvmtrace first sees it
(the kernel wakes the reader for a process's first KVM call, so a VMM that gives up
within milliseconds is still there), and read back once its start failed
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
import subprocess
from dataclasses import dataclass
from pathlib import Path

WORDS_MAX = 4096
LIBVIRT_QEMU_LOGS = "/var/log/libvirt/qemu"  # libvirt's domain logs: NAME.log
JOURNAL_TIMEOUT = 5.0


@dataclass(frozen=True)
class Stderr:
    """Where a process's fd 2 went: ``kind`` file, journal, pipe, socket, tty, null or
    other; ``target`` what /proc/PID/fd/2 links to; ``offset`` the file position then."""

    kind: str
    target: str
    offset: int = 0


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


def resolve(pid: int, proc: str | os.PathLike = "/proc") -> Stderr | str:
    """Where process ``pid``'s stderr goes, or why that cannot be told (a string)."""
    proc = Path(proc)
    try:
        target = os.readlink(proc / str(pid) / "fd" / "2")
    except FileNotFoundError:
        return "not resolved: the process ended before kvmtrace could look at it"
    except PermissionError:
        return ("not resolved: /proc/PID/fd is not readable by kvmtrace (another user's "
                "process: run as root, or grant CAP_SYS_PTRACE)")
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
        try:
            info = (proc / str(pid) / "fdinfo" / "2").read_text()
            pos = next(int(ln.split()[1]) for ln in info.splitlines() if ln.startswith("pos:"))
        except (OSError, StopIteration, ValueError, IndexError):
            pos = 0
        return Stderr("file", target, pos)
    return Stderr("other", target)


def _read_file(path: str, offset: int) -> tuple[str | None, str | None]:
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            start = max(offset, end - WORDS_MAX) if offset <= end else max(0, end - WORDS_MAX)
            f.seek(start)
            raw = f.read(end - start)
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
            text, why = _read_file(where.target, where.offset)
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
