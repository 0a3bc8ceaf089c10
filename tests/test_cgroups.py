"""kvmtrace.cgroups: the v2 mount, a live process's path, and ids resolved to paths.

This host's own mount table and hierarchy (hybrid here: v2 at /sys/fs/cgroup/unified),
mountinfo lines BUILT BY HAND for the layouts this host does not have, and a directory
tree under tmp standing in for a hierarchy where the walk and the cache are tested
(BUILT BY HAND: creating real cgroups needs root; the privileged tier does)."""

from __future__ import annotations

import os
from pathlib import Path

from kvmtrace import cgroups


def test_this_hosts_v2_hierarchy_and_our_own_cgroup_in_it():
    mount = cgroups.v2_mount(Path("/proc/self/mountinfo").read_text())
    assert mount is not None and (Path(mount) / "cgroup.controllers").exists(), mount
    mine = cgroups.of_pid(os.getpid())
    assert mine is not None and mine.startswith("/"), mine
    r = cgroups.Resolver(mount)
    assert r.path(Path(mount).stat().st_ino) == "/"
    here = Path(mount) / mine.lstrip("/")
    assert r.path(here.stat().st_ino) == mine


def test_mount_tables_of_other_layouts():
    # BUILT BY HAND in the kernel's mountinfo format (proc(5)).
    pure_v2 = ("24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw\n"
               "30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - "
               "cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n")
    assert cgroups.v2_mount(pure_v2) == "/sys/fs/cgroup"
    v1_only = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    assert cgroups.v2_mount(v1_only) is None
    spaced = "41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n"
    assert cgroups.v2_mount(spaced) == "/mnt/my cgroups"
    assert cgroups.v2_mount("") is None


def test_an_id_is_walked_for_once_and_kept_bounded(tmp_path):
    root = tmp_path / "cg"
    deep = root / "machine.slice" / "machine-qemu\\x2d1\\x2dvm1.scope" / "libvirt"
    deep.mkdir(parents=True)
    (root / "system.slice" / "a.service").mkdir(parents=True)
    r = cgroups.Resolver(root)
    assert r.path(deep.stat().st_ino) == "/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope/libvirt"
    assert r.walks == 1
    assert r.path((root / "system.slice" / "a.service").stat().st_ino) == "/system.slice/a.service"
    assert r.walks == 1  # cached on the first walk
    gone = 2**63 + 5
    assert r.path(gone) is None and r.path(gone) is None
    assert r.walks == 2  # a vanished id is not walked for twice
    small = cgroups.Resolver(root, cache_max=2)
    small.path(deep.stat().st_ino)
    assert len(small._cache) == 2


def test_a_process_that_is_gone_has_no_path(tmp_path):
    assert cgroups.of_pid(2**22 + 1) is None
    proc = tmp_path / "proc" / "7"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text("12:pids:/\n0::/machine.slice/x.scope\n")  # BUILT BY HAND
    assert cgroups.of_pid(7, tmp_path / "proc") == "/machine.slice/x.scope"
    (proc / "cgroup").write_text("0::\n")
    assert cgroups.of_pid(7, tmp_path / "proc") == "/"


def test_the_locator_takes_procs_path_only_where_it_is_the_kernels_cgroup():
    loc = cgroups.Locator.of_host()
    assert loc.mount is not None
    mine = cgroups.of_pid(os.getpid())
    cid = (loc.mount / mine.lstrip("/")).stat().st_ino
    assert loc(os.getpid(), cid) == mine
    assert loc.resolver.walks == 0  # /proc's path was the very cgroup: no walk
    assert loc(os.getpid(), None) == mine  # the kernel kept no id: /proc's
    assert loc(os.getpid(), 2**63 + 7) is None  # another, vanished, cgroup: not /proc's
    assert loc(2**22 + 1, cid) == mine  # gone from /proc: the kernel's id, resolved
    nothing = cgroups.Locator(None)
    assert nothing(os.getpid(), cid) == mine and nothing(2**22 + 1, cid) is None
