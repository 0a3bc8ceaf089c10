"""scripts/kvm_device.py: what the test set-up does to /dev/kvm, decided on other hosts'
facts (pure; the facts below are written by hand after the hosts they name)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import HERE

_spec = importlib.util.spec_from_file_location("kvm_device", HERE.parent / "scripts" /
                                               "kvm_device.py")
kd = importlib.util.module_from_spec(_spec)
sys.modules["kvm_device"] = kd
_spec.loader.exec_module(kd)

# Measured on this machine kind (2026-12-05): no udev, no kvm group, devtmpfs's defaults.
FRESH = kd.Device(udev_running=False, mode=0o600, uid=0, gid=0, gid_name="root", kvm_gid=None)
# A Debian host: udev's rule has made it 0660 root:kvm.
DEBIAN = kd.Device(udev_running=True, mode=0o660, uid=0, gid=994, gid_name="kvm", kvm_gid=994)


def after(d: kd.Device, plan: kd.Plan, new_gid: int = 990) -> kd.Device:
    """The facts once ``plan`` is applied (groupadd with no gid picks ``new_gid``)."""
    kvm_gid = d.kvm_gid
    if plan.create_group is not None:
        kvm_gid = new_gid if plan.create_group < 0 else plan.create_group
    gid = kvm_gid if plan.chgrp else d.gid
    return kd.Device(udev_running=d.udev_running, mode=d.mode if plan.chmod is None
                     else plan.chmod, uid=d.uid, gid=gid,
                     gid_name="kvm" if gid == kvm_gid else d.gid_name, kvm_gid=kvm_gid)


def test_a_fresh_machine_gets_what_udev_would_give_and_is_told_so():
    plan = kd.decide(FRESH)
    assert (plan.create_group, plan.chgrp, plan.chmod) == (-1, True, 0o660)
    assert plan.why == ("no udev runs here to give /dev/kvm Debian's 0660 root:kvm "
                        "(50-udev-default.rules): created system group kvm; /dev/kvm 0600 "
                        "root:root -> 0660 root:kvm")
    assert kd.decide(after(FRESH, plan)).changes is False  # the second run changes nothing


@pytest.mark.parametrize("device", [
    DEBIAN,
    # udev runs and someone chose otherwise (upstream systemd's 0666, another group):
    kd.Device(udev_running=True, mode=0o666, gid=0, gid_name="root", kvm_gid=None),
    kd.Device(udev_running=True, mode=0o600, gid=0, gid_name="root", kvm_gid=994),
])
def test_where_udev_runs_nothing_is_changed(device):
    plan = kd.decide(device)
    assert not plan.changes and "udev runs here" in plan.why


def test_no_device_nothing_to_do():
    plan = kd.decide(kd.Device(udev_running=False, exists=False))
    assert not plan.changes and "does not exist" in plan.why


@pytest.mark.parametrize(("device", "expect"), [
    # the group exists (a package made it) but the device is devtmpfs's
    (kd.Device(udev_running=False, mode=0o600, gid=0, gid_name="root", kvm_gid=994),
     (None, True, 0o660)),
    # a chroot whose /dev is a set-up host's: name the device's gid kvm, touch nothing
    (kd.Device(udev_running=False, mode=0o660, gid=994, gid_name=None, kvm_gid=None),
     (994, False, None)),
    # ...unless that gid cannot open it: a new group, and group rw
    (kd.Device(udev_running=False, mode=0o600, gid=994, gid_name=None, kvm_gid=None),
     (-1, True, 0o660)),
    # 0666 (upstream's default) is never tightened nor loosened: only the group changes
    (kd.Device(udev_running=False, mode=0o666, gid=0, gid_name="root", kvm_gid=994),
     (None, True, None)),
    # owner or others' bits stay as they were; group rw is all that is added
    (kd.Device(udev_running=False, mode=0o400, gid=0, gid_name="root", kvm_gid=994),
     (None, True, 0o460)),
])
def test_only_what_debians_rule_gives_is_added_and_it_is_idempotent(device, expect):
    plan = kd.decide(device)
    assert (plan.create_group, plan.chgrp, plan.chmod) == expect
    done = after(device, plan)
    assert done.mode & 0o060 == 0o060 and done.gid == done.kvm_gid
    assert done.mode & ~0o060 == device.mode & ~0o060  # nothing but group rw added
    again = kd.decide(done)
    assert not again.changes and "already" in again.why


@pytest.mark.privileged
def test_this_machine_is_set_up_after_the_test_set_up():
    """`make test` ran scripts/setup-host.sh --test: whatever this machine is, the set-up
    left nothing to do (udev runs, or /dev/kvm is now 0660 root:kvm)."""
    plan = kd.decide(kd.gather())
    assert not plan.changes, plan.why
