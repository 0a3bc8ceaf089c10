"""Privileged tier: who owns a VM start, from the cgroup its VMM ran in.

Cgroups shaped like a libvirt scope, a systemd service and a containerd container of a
Kubernetes pod (systemd driver) are made under a directory of this test's own in the
host's cgroup v2 hierarchy (kvmtrace decodes the path at any depth; systemd's own slices
are not touched). In each, a real process (tests/vmmaker.py) makes a failed VM start on
the real /dev/kvm and exits at once: the shared `explain --json` session must attribute
each start to its domain, unit, pod and container (the kernel keeps the cgroup id of a
process at its first KVM call, so one gone before kvmtrace looks is still attributed).
Host only for now: the kernel tier's guests may have no v2 hierarchy mounted.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kvmtrace import cgroups
from tests.privileged.conftest import VMMAKER

pytestmark = [pytest.mark.privileged, pytest.mark.host_only]

POD = "1e597579-417e-482f-bf65-5fe170c3aebd"


@pytest.fixture(scope="module")
def owned(shared):
    explain = shared.explain  # attached before any of this module's processes run
    mount = cgroups.v2_mount(Path("/proc/self/mountinfo").read_text())
    assert mount, "no cgroup v2 hierarchy is mounted on this host"
    tag = f"ko{os.getpid() % 10000}{os.urandom(2).hex()}"
    ctr = (tag * 64)[:64].encode().hex()[:64]
    top = Path(mount) / f"kvmtrace-test-{tag}"
    shapes = {
        "libvirt": f"machine.slice/machine-qemu\\x2d7\\x2d{tag}\\x2dvm.scope",
        "service": f"system.slice/{tag}-vm.service",
        "pod": (f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
                f"{POD.replace('-', '_')}.slice/cri-containerd-{ctr}.scope"),
    }
    made = []
    try:
        for kind, rel in shapes.items():
            where = top / rel
            where.mkdir(parents=True)
            made.append(where)
            procs = str(where / "cgroup.procs")

            def enter(procs=procs):
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))

            subprocess.run([*VMMAKER, "--name", f"{tag}-{kind}"[:15], "--types", "0",
                            "--step", "memfd", "--exit", "1"], preexec_fn=enter,
                           capture_output=True, timeout=60, check=False)
        comms = {f"{tag}-{kind}"[:15]: kind for kind in shapes}
        got = explain.wait(lambda r: r.get("kind") == "start" and r["comm"] in comms,
                                  len(comms))
        yield {"tag": tag, "ctr": ctr, "top": f"/kvmtrace-test-{tag}", "shapes": shapes,
               **{comms[r["comm"]]: r for r in got}}
    finally:
        for where in sorted({p for m in made for p in [m, *m.parents]
                             if str(p).startswith(str(top))}, key=lambda p: -len(p.parts)):
            try:
                where.rmdir()
            except OSError:
                pass


def test_a_libvirt_domains_start_is_its_domains(owned):
    s = owned["libvirt"]
    assert s["cgroup"] == f"{owned['top']}/{owned['shapes']['libvirt']}", s
    assert s["owner"] == {"unit": f"machine-qemu-7-{owned['tag']}-vm.scope",
                          "vm": f"{owned['tag']}-vm"}, s
    assert s["cgroup_id"], s


def test_a_services_start_is_its_units(owned):
    s = owned["service"]
    assert s["owner"] == {"unit": f"{owned['tag']}-vm.service"}, s


def test_a_pods_start_names_its_pod_runtime_and_container(owned):
    s = owned["pod"]
    assert s["owner"] == {"unit": f"cri-containerd-{owned['ctr']}.scope", "pod_uid": POD,
                          "runtime": "containerd", "container": owned["ctr"]}, s
    assert s["owner_note"] is None
