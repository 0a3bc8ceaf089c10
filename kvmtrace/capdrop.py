"""Drop this process's capabilities to what the kernel still wants once the probes are
attached (kvmtrace.privileges.keep_after_attach says which): prctl(2) and capset(2)
through ctypes, and /proc/self/status read back to check that they took."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from kvmtrace.privileges import CAPS, PrivilegeError, names, parse_status

# prctl(2) and capset(2) (include/uapi/linux/prctl.h, capability.h)
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def drop(keep: int) -> dict[str, int]:
    """Keep only the capabilities in ``keep``: clear the ambient set, drop the bounding
    set when CAP_SETPCAP allows it, capset() effective = permitted = ``keep`` (inheritable
    empty) and set no_new_privs. capset() changes the calling thread only, so this must
    run before any other thread starts (checked). Returns /proc/self/status's view after
    (CapEff, CapPrm, CapAmb, CapBnd, NoNewPrivs); raises PrivilegeError on a refusal."""
    threads = _threads()
    if threads != 1:
        raise PrivilegeError([f"cannot drop capabilities: {threads} threads are running "
                              "(capset changes one thread only; drop before starting any)"])
    libc = ctypes.CDLL(None, use_errno=True)

    def prctl(*args: int) -> None:
        if libc.prctl(*(ctypes.c_ulong(x) for x in args)) != 0:
            err = ctypes.get_errno()
            raise PrivilegeError([f"prctl({args[0]}) failed: {os.strerror(err)}"])

    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    before = parse_status(_read("/proc/self/status"))
    if before.get("CapEff", 0) >> CAPS["CAP_SETPCAP"] & 1:
        last = int((_read("/proc/sys/kernel/cap_last_cap") or "40").strip())
        for cap in range(last + 1):
            if not keep >> cap & 1 and before.get("CapBnd", 0) >> cap & 1:
                prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in (0, 1):
        word = keep >> (32 * i) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = word
        data[i].inheritable = 0
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError([f"capset({', '.join(names(keep)) or 'nothing'}) failed: "
                              f"{os.strerror(err)}"])
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    after = parse_status(_read("/proc/self/status"))
    if after.get("CapEff") != keep or after.get("CapAmb") or after.get("NoNewPrivs") != 1:
        raise PrivilegeError([f"capabilities not dropped as asked: {after}"])
    return after
