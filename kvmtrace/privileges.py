"""What kvmtrace really needs from the host's access control, instead of "be root": the
requirements judged on a process's facts (pure; the facts are read by kvmtrace.access,
the capabilities dropped by kvmtrace.capdrop).

Measured on a 6.18 kernel as a non-root uid with ambient capabilities (docs/service.md,
"Capabilities"):

- CAP_BPF + CAP_PERFMON load and attach the programs (CAP_SYS_ADMIN stands in for both,
  and is the only way before 5.8, which has neither);
- except where kernel.perf_event_paranoid is above 2 (3 is the default of every Debian
  kernel, from Debian's patch "security,perf: Allow further restriction of
  perf_event_open", which Ubuntu carries too): there perf_event_open(2) -- through which
  every tracepoint and kprobe attaches -- is refused with EACCES without CAP_SYS_ADMIN,
  whatever CAP_PERFMON says. Measured in the kernel tier's guests, uid 65534 with CAP_BPF
  + CAP_PERFMON + CAP_DAC_READ_SEARCH attaching sched:sched_process_exit: Debian 6.1.0-57
  and 6.12.95+deb12 refuse it at 3, allow it at 2 or with CAP_SYS_ADMIN (mainline treats
  any value above 2 as 2). Which one this kernel is, :func:`kvmtrace.access.gather` asks
  the kernel itself: a user-only software event on this process
  (:func:`kvmtrace.access.perf_open_probe`);
- tracefs (at /sys/kernel/debug/tracing or /sys/kernel/tracing) is mode 0700 root: bcc
  reads the tracepoints' ids there, so CAP_DAC_READ_SEARCH (or root) is needed;
- /dev/kvm (0660 root:kvm) is asked for the host's VM types at each scrape: the kvm group
  (or CAP_DAC_OVERRIDE);
- the kernel headers (bcc compiles at run time) and /proc/kallsyms (names only: no
  CAP_SYSLOG) must be readable.

The loader child (kvmtrace.handoff) is a new program: a non-root process passes it only
its *ambient* capabilities (and the python binary's file capabilities), so they are what
is judged here. After the hand-over the exporter holds only fds and drops every
capability the kernel does not still want (:func:`keep_after_attach`, then
:func:`kvmtrace.capdrop.drop`): before 6.5 with kernel.unprivileged_bpf_disabled set, map
reads on held fds still need CAP_BPF.

Everything here is pure, so tests hand in other hosts' values. :func:`requirements` is
what ``kvmtrace doctor`` reports.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass
from typing import NamedTuple

# include/uapi/linux/capability.h
CAPS = {
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYSLOG": 34,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}
CAP_NAMES = {v: k for k, v in CAPS.items()}
# CAP_BPF and CAP_PERFMON exist from 5.8 (commits a17b53c4a4b5, 980737282232).
SPLIT_CAPS_KERNEL = (5, 8)
# 6.5 moved the bpf() permission checks to the commands (commit "bpf: Centralize
# permissions checks for all BPF map types"): map operations on an fd one already holds
# need no capability since, whatever unprivileged_bpf_disabled says.
FD_MAP_OPS_FREE_KERNEL = (6, 5)
# What a non-root service needs where perf_event_open follows mainline's rules
# (kernel.perf_event_paranoid <= 2)...
BASE_CAPS = ("CAP_BPF", "CAP_PERFMON", "CAP_DAC_READ_SEARCH")
# ...and the set deploy/systemd ships, for Debian's default of 3: CAP_SYS_ADMIN only
# for the attach (dropped after it; CAP_BPF is what stays where map reads still want a
# capability, so it is kept in the set though CAP_SYS_ADMIN implies it), CAP_SYSLOG only
# to open /dev/kmsg at start (kernel.dmesg_restrict=1, Debian's default; dropped after).
SERVICE_CAPS = (*BASE_CAPS, "CAP_SYS_ADMIN", "CAP_SYSLOG")
# Mainline's highest level; above it only a kernel with Debian's patch restricts more.
PERF_PARANOID_MAINLINE_MAX = 2
SERVICE_GROUP = "kvm"
# include/uapi/linux/capability.h: struct vfs_cap_data's magic_etc
VFS_CAP_FLAGS_EFFECTIVE = 0x000001


class PrivilegeError(Exception):
    """Something this process lacks; ``lines`` has one line per missing piece."""

    def __init__(self, lines: list[str]):
        super().__init__("\nERROR: ".join(lines))  # printed after "ERROR: ", one a line
        self.lines = lines


class Requirement(NamedTuple):
    """One requirement: ``ok`` True (met), False (missing: ``detail`` is the one-line
    error naming the capability or group and the fix) or None (does not apply here,
    e.g. no /dev/kvm at all: ``detail`` says why)."""

    name: str
    ok: bool | None
    detail: str


@dataclass(frozen=True)
class Access:
    """The facts the requirements are judged on (this process's, or another host's)."""

    kernel: tuple[int, int]
    euid: int
    effective: int  # CapEff
    ambient: int = 0  # CapAmb: what a non-root loader child gets...
    file_caps: int = 0  # ...plus the python binary's file capabilities (effective ones)
    bounding: int = (1 << 41) - 1
    groups: tuple[int, ...] = ()  # real + supplementary gids
    unprivileged_bpf_disabled: int | None = None  # None: unknown
    perf_event_paranoid: int | None = None  # None: unknown
    # access.perf_open_probe() in this process: 0 opened, else the errno; None: not tried
    perf_open_errno: int | None = None
    # tracefs candidates that exist: (path, None when its events/ can be read, else why)
    tracefs: tuple[tuple[str, str | None], ...] = ()
    kvm_path: str = "/dev/kvm"
    kvm_exists: bool = True
    kvm_error: str | None = None  # os.open(O_RDWR)'s refusal, None: opened
    kvm_mode: int = 0o660
    kvm_uid: int = 0
    kvm_gid: int = 0
    kvm_group: str | None = "kvm"  # the name of kvm_gid, None when it has none
    # the gid of the group named kvm on this host (None: there is none), and whether udev
    # runs (its control socket; None: unknown) -- where it does not, nothing gave /dev/kvm
    # Debian's 0660 root:kvm and it stays devtmpfs's 0600 root:root
    kvm_group_gid: int | None = None
    udev_running: bool | None = None
    headers_path: str = ""
    headers_error: str | None = None
    kallsyms_error: str | None = None

    def has(self, cap: str) -> bool:
        return bool(self.effective >> CAPS[cap] & 1)

    def child_has(self, cap: str) -> bool:
        """Whether the loader child (a new execve) will have ``cap``."""
        bit = 1 << CAPS[cap]
        if self.euid == 0:  # root's execve gets the bounding set (no SECBIT_NOROOT here)
            return bool(self.bounding & bit)
        return bool((self.ambient | (self.file_caps & self.bounding)) & bit)


def names(mask: int) -> list[str]:
    """Capability names of a mask (unknown bits as cap_N)."""
    return [CAP_NAMES.get(b, f"cap_{b}") for b in range(64) if mask >> b & 1]


def mask_of(caps) -> int:
    out = 0
    for c in caps:
        out |= 1 << CAPS[c]
    return out


def parse_status(text: str) -> dict[str, int]:
    """/proc/PID/status → {"CapEff": mask, ..., "NoNewPrivs": 0|1} (the lines present)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if key.startswith("Cap"):
            out[key] = int(value, 16)
        elif key == "NoNewPrivs":
            out[key] = int(value)
    return out


def parse_file_caps(raw: bytes | None) -> int:
    """The effective file capabilities in a ``security.capability`` xattr (struct
    vfs_cap_data, include/uapi/linux/capability.h): the permitted set when its effective
    flag is set, else 0 (a binary that is not capability-aware raises none)."""
    if not raw or len(raw) < 12:
        return 0
    magic, lo = struct.unpack_from("<II", raw)
    hi = struct.unpack_from("<I", raw, 12)[0] if len(raw) >= 20 else 0
    return (lo | hi << 32) if magic & VFS_CAP_FLAGS_EFFECTIVE else 0


def _dac_allows(mode: int, uid: int, gid: int, euid: int, groups: tuple[int, ...],
                want: int = 0o6) -> bool:
    """Whether the mode bits alone grant ``want`` (rw = 6) to euid/groups."""
    if euid == uid:
        bits = mode >> 6
    elif gid in groups:
        bits = mode >> 3
    else:
        bits = mode
    return bits & want == want


def _kernel_text(k: tuple[int, int]) -> str:
    return f"{k[0]}.{k[1]}"


def _kvm_setup_fix(a: Access) -> str | None:
    """The fix where no group may open /dev/kvm (its group is root, or has no rw): what
    Debian's udev rule does (0660 root:kvm), spelled out. None where a group may."""
    if a.kvm_gid != 0 and a.kvm_mode & 0o060 == 0o060:
        return None
    group = a.kvm_group or str(a.kvm_gid)
    mode = stat.filemode(stat.S_IFCHR | a.kvm_mode)[1:]
    why = (" and no udev runs here to give it Debian's 0660 root:kvm" if a.udev_running
           is False else "")
    create = ("" if a.kvm_group_gid is not None
              else f"there is no {SERVICE_GROUP} group: groupadd --system {SERVICE_GROUP}; ")
    return (f"no group may open it ({mode} {group}){why}: make it what Debian's udev rule "
            f"makes it ({create}chgrp {SERVICE_GROUP} {a.kvm_path}; chmod 0660 "
            f"{a.kvm_path}), then add the user to group {SERVICE_GROUP} (systemd "
            f"SupplementaryGroups={SERVICE_GROUP}), or grant CAP_DAC_OVERRIDE")


def _kvm_requirement(a: Access) -> Requirement:
    if not a.kvm_exists:
        return Requirement("/dev/kvm", None, f"{a.kvm_path} does not exist (KVM not "
                           "loaded): nothing to open")
    setup = _kvm_setup_fix(a)
    if a.kvm_error is None:
        detail = f"{a.kvm_path}: opened read-write"
        if setup and a.euid == 0:  # root opens anything: say what a service user would meet
            detail += f"; a service user could not: {setup}"
        return Requirement("/dev/kvm", True, detail)
    group = a.kvm_group or str(a.kvm_gid)
    mode = stat.filemode(stat.S_IFCHR | a.kvm_mode)
    if _dac_allows(a.kvm_mode, a.kvm_uid, a.kvm_gid, a.euid, a.groups) \
            or a.has("CAP_DAC_OVERRIDE"):
        fix = "the mode bits allow it: check ACLs, the LSM and the device cgroup"
    elif setup:
        fix = setup
    else:
        fix = (f"add the user to group {group} (gid {a.kvm_gid}; systemd "
               f"SupplementaryGroups={group}, Kubernetes supplementalGroups: "
               f"[{a.kvm_gid}]), or grant CAP_DAC_OVERRIDE")
    return Requirement("/dev/kvm", False, f"cannot open {a.kvm_path} ({mode} uid {a.kvm_uid} "
                       f"gid {a.kvm_gid}): {a.kvm_error}: {fix}")


def requirements(a: Access) -> list[Requirement]:
    """Every requirement of loading, attaching and serving, judged on ``a``.

    Pure. The capability requirements are judged on what the loader child will have."""
    out: list[Requirement] = []
    child = "the loader child"
    ambient_hint = ("as an ambient capability (systemd AmbientCapabilities=, "
                    "setpriv --ambient-caps, Kubernetes capabilities.add)")

    def cap_line(cap: str, why: str) -> str:
        if a.has(cap) and not a.child_has(cap):
            return (f"{cap} ({why}) is effective here but not ambient, so {child} (a new "
                    f"program) would not have it: grant it {ambient_hint}")
        return f"missing capability {cap} ({why}): grant it {ambient_hint}, or run as root"

    admin = a.child_has("CAP_SYS_ADMIN")
    if a.kernel >= SPLIT_CAPS_KERNEL:
        for cap, why in (("CAP_BPF", "load BPF programs and create maps"),
                         ("CAP_PERFMON", "attach tracepoints and kprobes")):
            if a.child_has(cap):
                out.append(Requirement(cap, True, f"{cap}: held"))
            elif admin:
                out.append(Requirement(cap, True, f"{cap}: CAP_SYS_ADMIN stands in for it"))
            else:
                out.append(Requirement(cap, False, cap_line(cap, why)))
    else:
        why = (f"load and attach BPF programs; kernel {_kernel_text(a.kernel)} predates "
               "CAP_BPF and CAP_PERFMON (5.8)")
        out.append(Requirement("CAP_SYS_ADMIN", admin, "CAP_SYS_ADMIN: held" if admin
                               else cap_line("CAP_SYS_ADMIN", why)))

    if a.kernel >= SPLIT_CAPS_KERNEL:  # (before 5.8 CAP_SYS_ADMIN is asked for above)
        out.append(_perf_open(a, ambient_hint))

    if not a.tracefs:
        out.append(Requirement("tracefs", None, "tracefs is not mounted (tracepoints "
                               "cannot attach; kprobes through the kprobe PMU can): "
                               "mount -t tracefs nodev /sys/kernel/tracing"))
    elif any(err is None for _, err in a.tracefs):
        path = next(p for p, err in a.tracefs if err is None)
        out.append(Requirement("tracefs", True, f"{path}: readable"))
    else:
        path, err = a.tracefs[0]
        fix = ("grant CAP_DAC_READ_SEARCH (tracefs is mode 0700, owner root)"
               if not a.child_has("CAP_DAC_READ_SEARCH") and not a.child_has(
                   "CAP_DAC_OVERRIDE") and a.euid != 0
               else "check its mount and the service's sandbox (it must not be hidden)")
        out.append(Requirement("tracefs", False,
                               f"tracefs at {path} is not readable ({err}): {fix}"))

    out.append(_kvm_requirement(a))

    if a.headers_error is None:
        out.append(Requirement("kernel headers", True, f"{a.headers_path}: readable"))
    else:
        out.append(Requirement("kernel headers", False,
                               f"kernel headers {a.headers_error}: install them (make setup) "
                               "and do not hide /lib/modules or /usr/src from the service "
                               "(systemd ProtectKernelModules=)"))

    if a.kallsyms_error is None:
        out.append(Requirement("/proc/kallsyms", True, "/proc/kallsyms: readable"))
    else:
        out.append(Requirement("/proc/kallsyms", False,
                               f"cannot read /proc/kallsyms ({a.kallsyms_error}): do not hide "
                               "it from the service (systemd ProtectKernelTunables=, "
                               "ProcSubset=pid)"))
    return out


def _perf_open(a: Access, ambient_hint: str) -> Requirement:
    """perf_event_open(2) for the loader child: kernel.perf_event_paranoid and the probe."""
    name, p, err = "perf_event_open", a.perf_event_paranoid, a.perf_open_errno
    if err not in (None, 0) and not (err == errno.EACCES and p is not None
                                     and p > PERF_PARANOID_MAINLINE_MAX):
        what = f"{errno.errorcode.get(err, f'errno {err}')}: {os.strerror(err)}"
        return Requirement(name, False, (
            f"perf_event_open(2) is refused to this process ({what}; "
            f"kernel.perf_event_paranoid={'unknown' if p is None else p}) and every "
            "tracepoint and kprobe attaches through it: allow it in the seccomp filter "
            "(systemd SystemCallFilter=perf_event_open, the container's seccomp profile) "
            "and the LSM policy"))
    if p is None:
        return Requirement(name, None, "kernel.perf_event_paranoid cannot be read: whether "
                           "perf_event_open needs CAP_SYS_ADMIN here is unknown")
    if p <= PERF_PARANOID_MAINLINE_MAX:
        return Requirement(name, True, f"kernel.perf_event_paranoid={p}: CAP_PERFMON is "
                           "enough for perf_event_open")
    if a.child_has("CAP_SYS_ADMIN"):
        return Requirement(name, True, f"kernel.perf_event_paranoid={p}: CAP_SYS_ADMIN held "
                           "(dropped once the probes are attached)")
    if err == 0 and not a.has("CAP_SYS_ADMIN"):
        return Requirement(name, True, (
            f"kernel.perf_event_paranoid={p}, but perf_event_open is allowed without "
            "CAP_SYS_ADMIN (a kernel without Debian's restriction treats it as 2)"))
    if a.has("CAP_SYS_ADMIN"):
        how = ("CAP_SYS_ADMIN is effective here but not ambient, so the loader child (a new "
               f"program) would not have it: grant it {ambient_hint}")
    else:
        how = f"grant CAP_SYS_ADMIN {ambient_hint}"
    return Requirement(name, False, (
        f"kernel.perf_event_paranoid is {p}: this kernel (Debian's restriction, which Ubuntu "
        "carries too) refuses perf_event_open, through which every tracepoint and kprobe "
        f"attaches, without CAP_SYS_ADMIN (CAP_PERFMON is not enough): {how} (kvmtrace "
        "drops it once attached), or set kernel.perf_event_paranoid=2 (mainline's "
        "default) in /etc/sysctl.d"))


def missing(a: Access) -> list[str]:
    """One line per requirement that is not met (empty: everything is there)."""
    return [r.detail for r in requirements(a) if r.ok is False]


def keep_after_attach(a: Access, words: bool = True) -> tuple[int, str]:
    """(the capability mask the exporter still needs once it holds the fds, why).

    Pure. Map reads on held fds need CAP_BPF (CAP_SYS_ADMIN before 5.8) on kernels before
    6.5 when kernel.unprivileged_bpf_disabled is set (or unknown); /dev/kvm opened only
    thanks to CAP_DAC_OVERRIDE keeps it (the exporter asks it at every scrape). With
    ``words`` (the VMMs' stderr read back, kvmtrace.vmmwords), CAP_SYS_PTRACE and
    CAP_DAC_READ_SEARCH where held: /proc/PID/fd of a VMM of another user (or with
    capabilities the exporter dropped) asks the first, its log file (libvirt's are 0600
    root) the second. Read-only uses; the unit forbids ptrace(2) itself."""
    keep, why = 0, []
    for cap, use in (("CAP_SYS_PTRACE", "resolves a VMM's stderr at /proc/PID/fd/2"),
                     ("CAP_DAC_READ_SEARCH", "reads a VMM's stderr file back")):
        if words and a.has(cap):
            keep |= mask_of([cap])
            why.append(f"{cap}: {use} (--no-vmm-words drops it)")
    if a.kernel < FD_MAP_OPS_FREE_KERNEL and a.unprivileged_bpf_disabled != 0:
        cap = next((c for c in ("CAP_BPF", "CAP_SYS_ADMIN")
                    if a.has(c) and (c != "CAP_BPF" or a.kernel >= SPLIT_CAPS_KERNEL)), None)
        if cap:
            keep |= mask_of([cap])
            setting = ("unknown" if a.unprivileged_bpf_disabled is None
                       else str(a.unprivileged_bpf_disabled))
            why.append(f"{cap}: kernel {_kernel_text(a.kernel)} < 6.5 with "
                       f"unprivileged_bpf_disabled={setting} checks it on every map read")
    if (a.kvm_exists and a.kvm_error is None and a.has("CAP_DAC_OVERRIDE")
            and not _dac_allows(a.kvm_mode, a.kvm_uid, a.kvm_gid, a.euid, a.groups)):
        keep |= mask_of(["CAP_DAC_OVERRIDE"])
        why.append(f"CAP_DAC_OVERRIDE: {a.kvm_path} is opened with it (no {SERVICE_GROUP} "
                   "group)")
    return keep, "; ".join(why)
