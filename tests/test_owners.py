"""kvmtrace.owners: cgroup paths decoded into the VM, unit and pod that own a process.

Each path below is as published, with where (long ids shortened nowhere); the few BUILT BY
HAND are marked so."""

from __future__ import annotations

import pytest

from kvmtrace import owners
from kvmtrace.owners import Owner

CTR_A = "d7dfb4a21fe1703a8537e60d5af248af729315d187b24a538102d14874c8117d"
CTR_B = "dbc9f149296cec5d12b78385eb5b2c0cfe20b476f117c15c76d981cff44053c1"
CTR_C = "32da98c8522068be05a7510a3eddb09cad6ed2f03286180d0e931d0d0b6224a6"
CTR_D = "89e8f450417b56acf3089925dfd8f050dd50e950e18cfe83ea923269df601102"
CTR_E = "0e768f8db752fcd648adb264498daa1d8f31562320e881d6a9ec593d24b1f779"

PUBLISHED = [
    # ceems-dev/ceems PR #377 (pkg/collector/cgroup.go's comment): libvirt, cgroup v2.
    ("/machine.slice/machine-qemu\\x2d2\\x2dinstance\\x2d00000001.scope",
     Owner(unit="machine-qemu-2-instance-00000001.scope", vm="instance-00000001")),
    ("/machine.slice/machine-qemu\\x2d2\\x2dinstance\\x2d00000001.scope/libvirt",
     Owner(unit="machine-qemu-2-instance-00000001.scope", vm="instance-00000001")),
    # the same comment: libvirt without systemd.
    ("/machine/qemu-1-instance1.libvirt-qemu", Owner(vm="instance1")),
    # gist major/a8d6a068bd1fdceef97c (2014): libvirt before the id was in the name.
    ("/machine.slice/machine-qemu\\x2dinstance\\x2dc51f7c4b\\x2d12a1\\x2d4cfe\\x2d87e0"
     "\\x2d55b237ef31d2.scope",
     Owner(unit="machine-qemu-instance-c51f7c4b-12a1-4cfe-87e0-55b237ef31d2.scope",
           vm="instance-c51f7c4b-12a1-4cfe-87e0-55b237ef31d2")),
    # containerd/nri PR #227: kind, kubelet systemd driver, containerd.
    ("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
     "kubelet-kubepods-besteffort-pod1e597579_417e_482f_bf65_5fe170c3aebd.slice/"
     f"cri-containerd-{CTR_A}.scope",
     Owner(unit=f"cri-containerd-{CTR_A}.scope",
           pod_uid="1e597579-417e-482f-bf65-5fe170c3aebd", runtime="containerd",
           container=CTR_A)),
    # containerd/runwasi issue #821: the pod's own slice (no container).
    ("/kubepods.slice/kubepods-besteffort.slice/"
     "kubepods-besteffort-podb7c2cbdb_9ab5_47ef_977e_97e39a73da6d.slice",
     Owner(pod_uid="b7c2cbdb-9ab5-47ef-977e-97e39a73da6d")),
    # containers/crun issue #729: cgroupfs driver, a bare container id.
    (f"/kubepods/besteffort/pod85401dd3-38cd-47b6-a90a-e16c0e1c06e6/{CTR_B}",
     Owner(pod_uid="85401dd3-38cd-47b6-a90a-e16c0e1c06e6", container=CTR_B)),
    # opencontainers/runc issue #4620: CRI-O's conmon scope.
    ("/kubepods.slice/kubepods-burstable.slice/"
     "kubepods-burstable-pod207aaad1_659f_4db8_88e0_46e0cdcc3004.slice/"
     f"crio-conmon-{CTR_C}.scope",
     Owner(unit=f"crio-conmon-{CTR_C}.scope", pod_uid="207aaad1-659f-4db8-88e0-46e0cdcc3004",
           runtime="cri-o", container=CTR_C)),
    # kubernetes/minikube issue #11280: CRI-O in a node that is itself a docker container.
    ("/docker/d6701ec289c56e4391acb11d07474b3139466857a305490575508a8b7a9fcf22/kubepods.slice/"
     "kubepods-besteffort.slice/kubepods-besteffort-pod2ca4a155_3599_498d_bb9d_4446693fa3ea.slice/"
     f"crio-{CTR_D}.scope",
     Owner(unit=f"crio-{CTR_D}.scope", pod_uid="2ca4a155-3599-498d-bb9d-4446693fa3ea",
           runtime="cri-o", container=CTR_D)),
    # containerd/cri PR #290: a containerd scope under a systemd slice, no pod.
    (f"/system.slice/system-getty.slice/cri-containerd-{CTR_E}.scope",
     Owner(unit=f"cri-containerd-{CTR_E}.scope", runtime="containerd", container=CTR_E)),
]

BY_HAND = [
    # BUILT BY HAND: a service, a user's transient scope, docker's two drivers, the root.
    ("/system.slice/kvmtrace-vm.service", Owner(unit="kvmtrace-vm.service")),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/run-r1.scope",
     Owner(unit="run-r1.scope")),
    (f"/system.slice/docker-{CTR_B}.scope",
     Owner(unit=f"docker-{CTR_B}.scope", runtime="docker", container=CTR_B)),
    (f"/docker/{CTR_B}", Owner(runtime="docker", container=CTR_B)),
    # BUILT BY HAND: CRI-O with the cgroupfs manager ("crio-<ID>", cri-o/cri-o PR #812).
    (f"/kubepods/burstable/pod85401dd3-38cd-47b6-a90a-e16c0e1c06e6/crio-{CTR_C}",
     Owner(pod_uid="85401dd3-38cd-47b6-a90a-e16c0e1c06e6", runtime="cri-o", container=CTR_C)),
    ("/", Owner()),
    ("", Owner()),
]


@pytest.mark.parametrize(("path", "owner"), PUBLISHED + BY_HAND)
def test_a_cgroup_path_names_its_owner(path, owner):
    assert owners.decode(path) == owner


def test_every_pattern_is_met_by_a_path_here():
    """The table has no row the paths above never reach."""
    met = set()
    for path, _ in PUBLISHED + BY_HAND:
        for part in filter(None, path.split("/")):
            hit = next((p.name for p in owners.PATTERNS if p.regex.fullmatch(part)), None)
            met.add(hit)
    assert {p.name for p in owners.PATTERNS} - met == set()


def test_systemds_escapes_are_undone():
    assert owners.unescape("machine-qemu\\x2d3\\x2dmy\\x2dvm\\x2e1.scope") \
        == "machine-qemu-3-my-vm.1.scope"
    assert owners.unescape("no escapes") == "no escapes"


def test_the_command_lines_name_and_the_cgroups_are_both_kept_and_compared():
    owner = owners.decode("/machine.slice/machine-qemu\\x2d4\\x2dweb01.scope")
    assert owners.disagreement("web01", owner) is None
    assert owners.disagreement(None, owner) is None
    assert owners.disagreement("web01-long-name", owner) == (
        "the command line names VM 'web01-long-name', its cgroup libvirt domain 'web01'")


def test_a_kubevirt_vm_is_its_pods_qemu_named_namespace_underscore_name():
    # kubevirt/kubevirt issue #4614: virt-launcher's domain "default_testvm".
    pod = owners.decode(PUBLISHED[4][0])
    assert owners.kubevirt_vm("default_testvm", pod) == ("default", "testvm")
    assert owners.kubevirt_vm("default_testvm", Owner()) == (None, None)
    assert owners.kubevirt_vm("testvm", pod) == (None, None)


def test_labels_leave_out_what_is_not_known():
    assert owners.decode(BY_HAND[0][0]).labels() == {"unit": "kvmtrace-vm.service"}
