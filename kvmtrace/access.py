"""What this process may do on this host, read from the machine: its capabilities, groups
and sysctls, tracefs, /dev/kvm, the kernel headers and /proc/kallsyms as it meets them.

Beside kvmtrace.facts (what the probe plan depends on), this is the other module that
gathers the host's facts: :func:`gather` returns a :class:`kvmtrace.privileges.Access`,
on which kvmtrace.privileges judges the requirements (a pure function, so tests hand in
other hosts' values). :func:`check` is both together: one error line per missing piece.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import os
import stat
import struct
import sys
from pathlib import Path

from kvmtrace import facts as factsmod
from kvmtrace.privileges import (
    SERVICE_GROUP,
    Access,
    PrivilegeError,
    missing,
    parse_file_caps,
    parse_status,
)

# perf_event_open(2)'s number, per `uname -m`, as checked against the headers here
# (asm/unistd_64.h, unistd_32.h, asm-generic/unistd.h) and powerpc's syscall.tbl; the
# probe is not tried elsewhere (a wrong number would be another syscall).
PERF_EVENT_OPEN_NR = {"x86_64": 298, "i686": 336, "i386": 336, "aarch64": 241,
                      "riscv64": 241, "loongarch64": 241, "ppc64le": 319, "ppc64": 319}
# include/uapi/linux/perf_event.h
PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_DUMMY = 9
PERF_FLAG_FD_CLOEXEC = 1 << 3


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _tracefs(root: Path) -> tuple[tuple[str, str | None], ...]:
    out = []
    for p in factsmod.TRACEFS_PATHS:  # bcc's order
        base = root / p.lstrip("/")
        try:
            os.listdir(base / "events")
            out.append((p, None))
        except FileNotFoundError:
            continue  # not mounted there
        except PermissionError:
            # which directory refused: /sys/kernel/debug itself is 0700 too
            where = next((q for q in (base.parent, base) if not os.access(q, os.X_OK)), base)
            out.append((p, f"permission denied on {'/' / where.relative_to(root)}"))
        except OSError as exc:
            out.append((p, exc.strerror or str(exc)))
    return tuple(out)


def _headers(root: Path, release: str) -> tuple[str, str | None]:
    src = os.environ.get("BCC_KERNEL_SOURCE")
    build = Path(src) if src else root / "lib/modules" / release / "build"
    try:
        resolved = build.resolve()
        if not resolved.is_dir():
            return str(build), f"are not at {build}"
        os.listdir(resolved / "include")
    except PermissionError:
        return str(build), f"at {build} are not readable (permission denied)"
    except OSError as exc:
        return str(build), f"at {build} cannot be read ({exc.strerror or exc})"
    return str(resolved), None


def _kallsyms(root: Path) -> str | None:
    """None when /proc/kallsyms can be read, else why not."""
    try:
        with open(root / "proc/kallsyms", "rb") as f:
            # An inaccessible node bound over it (systemd InaccessiblePaths=) reads as
            # empty where CAP_DAC_READ_SEARCH lets it be opened at all.
            return None if f.readline().strip() else "it is empty: hidden"
    except OSError as exc:
        return exc.strerror or str(exc)


def _kvm(path: str) -> dict:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {"kvm_exists": False}
    except OSError as exc:
        return {"kvm_error": exc.strerror or str(exc)}
    try:
        group: str | None = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = None
    error = None
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        error = exc.strerror or str(exc)
    try:
        kvm_group_gid: int | None = grp.getgrnam(SERVICE_GROUP).gr_gid
    except KeyError:
        kvm_group_gid = None
    return {"kvm_error": error, "kvm_mode": stat.S_IMODE(st.st_mode), "kvm_uid": st.st_uid,
            "kvm_gid": st.st_gid, "kvm_group": group, "kvm_group_gid": kvm_group_gid}


def _udev_running(root: Path) -> bool:
    """Whether udev runs: its control socket (systemd-udevd's /run/udev/control)."""
    try:
        return stat.S_ISSOCK(os.stat(root / "run/udev/control").st_mode)
    except OSError:
        return False


def perf_open_probe(machine: str | None = None) -> int | None:
    """Ask the kernel whether this process may call perf_event_open(2) at all: a disabled,
    user-only software event (PERF_COUNT_SW_DUMMY) on this process, closed at once --
    what mainline allows any process at every perf_event_paranoid level, so a refusal is
    Debian's level 3 (EACCES), a seccomp filter or an LSM. 0 when it opened, else the
    errno; None where the syscall's number is not known (``uname -m``)."""
    nr = PERF_EVENT_OPEN_NR.get(machine or os.uname().machine)
    if nr is None:
        return None
    # struct perf_event_attr, PERF_ATTR_SIZE_VER0 (64 bytes): type, size, config,
    # sample_period, sample_type, read_format, flags (disabled | exclude_kernel |
    # exclude_hv), then wakeup_events, bp_type, config1 as zeros.
    attr = ctypes.create_string_buffer(struct.pack(
        "=IIQQQQQ16x", PERF_TYPE_SOFTWARE, 64, PERF_COUNT_SW_DUMMY, 0, 0, 0,
        1 | 1 << 5 | 1 << 6), 64)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(ctypes.c_long(nr), attr, ctypes.c_int(0), ctypes.c_int(-1),
                      ctypes.c_int(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        return ctypes.get_errno() or errno.EPERM
    os.close(fd)
    return 0


def gather(root: str | os.PathLike = "/", kvm_path: str = "/dev/kvm") -> Access:
    """This process's facts (``root``: a fixture tree for tests)."""
    root = Path(root)
    release = (_read(root / "proc/sys/kernel/osrelease") or os.uname().release).strip()
    status = parse_status(_read("/proc/self/status") or "")
    try:
        raw = os.getxattr(os.path.realpath(sys.executable), "security.capability")
    except OSError:
        raw = None
    ubd = _read(root / "proc/sys/kernel/unprivileged_bpf_disabled")
    paranoid = (_read(root / "proc/sys/kernel/perf_event_paranoid") or "").strip()
    headers_path, headers_error = _headers(root, release)
    return Access(
        kernel=factsmod.kernel_version(release), euid=os.geteuid(),
        effective=status.get("CapEff", 0), ambient=status.get("CapAmb", 0),
        file_caps=parse_file_caps(raw), bounding=status.get("CapBnd", 0),
        groups=tuple({os.getegid(), *os.getgroups()}),
        unprivileged_bpf_disabled=int(ubd) if ubd and ubd.strip().isdigit() else None,
        perf_event_paranoid=int(paranoid) if paranoid.lstrip("-").isdigit() else None,
        perf_open_errno=perf_open_probe() if root == Path("/") else None,
        tracefs=_tracefs(root), kvm_path=kvm_path, **_kvm(kvm_path),
        udev_running=_udev_running(root),
        headers_path=headers_path, headers_error=headers_error,
        kallsyms_error=_kallsyms(root))


def check(root: str | os.PathLike = "/") -> Access:
    """This process's facts; PrivilegeError (one line per missing piece) unless
    everything is there."""
    a = gather(root)
    lines = missing(a)
    if lines:
        raise PrivilegeError(lines)
    return a
