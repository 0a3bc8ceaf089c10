#!/usr/bin/python3
"""Give /dev/kvm what Debian's udev rule gives it, where no udev runs (test set-up only).

On a Debian host udev's rule (50-udev-default.rules: ``KERNEL=="kvm", GROUP="kvm",
MODE="0660"``) makes /dev/kvm 0660 root:kvm, and the system group ``kvm`` exists. Where
nothing runs udev (containers, microVMs, CI runners, the kernel tier's guests) the
device is devtmpfs's 0600 root:root and there may be no ``kvm`` group at all, so the
privileged tests' unprivileged exporter (the unit's user, in group kvm) could not open
it. ``scripts/setup-host.sh --test`` runs this to make such a host look like a Debian
host, and prints one line saying what it changed and why.

- udev runs (its control socket exists): nothing is changed -- udev owns the device.
- no /dev/kvm: nothing to do.
- otherwise: the ``kvm`` system group is created when missing (with the device's gid
  where the device already has an unnamed non-root group that may read and write it --
  a chroot whose /dev is the host's), then the device gets group kvm and group
  read-write. Nothing else is changed: the owner, the owner's and others' bits stay as
  they were, so nothing is loosened beyond Debian's 0660 root:kvm.

Run twice it changes nothing the second time. :func:`decide` is pure (tests hand it
other hosts); only :func:`main` looks at and changes this machine. Standard library
only: it runs with Debian's /usr/bin/python3 before the project's venv exists.
"""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
from dataclasses import dataclass

GROUP = "kvm"
# What Debian's rule gives the group: read-write.
GROUP_RW = 0o060
UDEV_CONTROL = "/run/udev/control"


@dataclass(frozen=True)
class Device:
    """The facts the decision is made on."""

    udev_running: bool
    exists: bool = True
    mode: int = 0o600  # permission bits only
    uid: int = 0
    gid: int = 0
    gid_name: str | None = "root"  # None: the gid has no name on this host
    kvm_gid: int | None = None  # gid of the group named kvm, None: no such group


@dataclass(frozen=True)
class Plan:
    """What to do: ``create_group`` (None: nothing; -1: any free system gid; else that
    gid), ``chgrp``/``chmod`` (None: leave), and ``why`` (one line, also when nothing)."""

    create_group: int | None = None
    chgrp: bool = False
    chmod: int | None = None
    why: str = ""

    @property
    def changes(self) -> bool:
        return self.create_group is not None or self.chgrp or self.chmod is not None


def _describe(mode: int, uid: int, group: str) -> str:
    owner = "root" if uid == 0 else str(uid)
    return f"{mode:04o} {owner}:{group}"


def decide(d: Device, path: str = "/dev/kvm") -> Plan:
    """Pure: what to change so that ``path`` is what Debian's udev rule makes it."""
    if not d.exists:
        return Plan(why=f"{path} does not exist (KVM not loaded): nothing to set up")
    if d.udev_running:
        return Plan(why=f"udev runs here ({UDEV_CONTROL}): it owns {path}; nothing changed")
    group_rw = d.mode & GROUP_RW == GROUP_RW
    create: int | None = None
    target = d.kvm_gid
    if target is None:
        if d.gid != 0 and d.gid_name is None and group_rw:
            # Set up from outside (a chroot sharing the host's /dev): name that gid kvm.
            create, target = d.gid, d.gid
        else:
            create = -1
    chgrp = target is None or d.gid != target
    chmod = None if group_rw else d.mode | GROUP_RW
    if create is None and not chgrp and chmod is None:
        return Plan(why=f"{path} is already {_describe(d.mode, d.uid, GROUP)}: nothing changed")
    done = []
    if create is not None:
        done.append(f"created system group {GROUP}"
                    + (f" with the device's gid {create}" if create >= 0 else ""))
    after_mode = d.mode if chmod is None else chmod
    before = _describe(d.mode, d.uid, d.gid_name or str(d.gid))
    after = _describe(after_mode, d.uid, GROUP)
    if chgrp or chmod is not None:
        done.append(f"{path} {before} -> {after}")
    return Plan(create_group=create, chgrp=chgrp, chmod=chmod,
                why=f"no udev runs here to give {path} Debian's 0660 root:{GROUP} "
                    f"(50-udev-default.rules): {'; '.join(done)}")


def gather(path: str = "/dev/kvm", udev_control: str = UDEV_CONTROL) -> Device:
    """This machine's facts."""
    try:
        udev = stat.S_ISSOCK(os.stat(udev_control).st_mode)
    except OSError:
        udev = False
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Device(udev_running=udev, exists=False)
    try:
        name: str | None = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        name = None
    try:
        kvm_gid: int | None = grp.getgrnam(GROUP).gr_gid
    except KeyError:
        kvm_gid = None
    return Device(udev_running=udev, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid,
                  gid=st.st_gid, gid_name=name, kvm_gid=kvm_gid)


def apply(plan: Plan, path: str = "/dev/kvm") -> None:
    if plan.create_group is not None:
        cmd = ["groupadd", "--system"]
        if plan.create_group >= 0:
            cmd += ["--gid", str(plan.create_group)]
        subprocess.run([*cmd, GROUP], check=True)
    if plan.chgrp:
        os.chown(path, -1, grp.getgrnam(GROUP).gr_gid)
    if plan.chmod is not None:
        os.chmod(path, plan.chmod)


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/dev/kvm"
    plan = decide(gather(path), path)
    if plan.changes:
        try:
            apply(plan, path)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"ERROR: setting up {path} as Debian's udev rule does failed: {exc}",
                  file=sys.stderr)
            return 1
        print(f"setup: {plan.why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
