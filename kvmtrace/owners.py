"""Who owns a process, from its cgroup v2 path: one table of path patterns.

Every VMM is called qemu-system-x86; its cgroup says which VM and workload it is:
libvirt puts a domain in a systemd scope (``machine.slice/machine-qemu\\x2d1\\x2dNAME.scope``,
or ``machine/qemu-1-NAME.libvirt-qemu`` without systemd), systemd a service in its unit,
and the kubelet a container under its pod (``kubepods.slice/...-pod<UID>.slice/
cri-containerd-<ID>.scope`` with the systemd driver, ``kubepods/<qos>/pod<UID>/<ID>`` with
cgroupfs). Each component of the path is matched against ``PATTERNS`` in order; the first
pattern a component matches says what that component tells. Pure: the path comes in as a
string (kvmtrace.cgroups resolves ids to paths).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

_HEX64 = r"[0-9a-f]{64}"
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"


@dataclass(frozen=True)
class Owner:
    """What a cgroup path says owns a process; None where it says nothing."""

    unit: str | None = None  # the innermost systemd service or scope
    vm: str | None = None  # libvirt's domain name
    pod_uid: str | None = None  # Kubernetes pod UID (dashes, as the API shows it)
    runtime: str | None = None  # containerd, cri-o, docker
    container: str | None = None  # the container's id (64 hex)

    def labels(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Pattern:
    """One kind of cgroup path component: a regex over the whole component, and the
    Owner fields its groups fill (a literal for runtime)."""

    name: str
    regex: re.Pattern[str]
    sets: tuple[str, ...]  # the Owner field of each group, in order
    runtime: str | None = None
    is_unit: bool = False  # the component is itself a systemd unit name


def _p(name: str, regex: str, sets: tuple[str, ...] = (), runtime: str | None = None,
       is_unit: bool = False) -> Pattern:
    return Pattern(name, re.compile(regex), sets, runtime, is_unit)


PATTERNS: tuple[Pattern, ...] = (
    # libvirt with systemd-machined: the scope's name is "machine-" + the machine name
    # escaped the systemd way ("qemu-ID-NAME"; before libvirt 1.3.2 "qemu-NAME").
    _p("libvirt scope", r"machine-qemu\\x2d(?:\d+\\x2d)?(.+)\.scope", ("vm",), is_unit=True),
    # libvirt without systemd: the partition's cgroup "qemu-ID-NAME.libvirt-qemu".
    _p("libvirt cgroup", r"qemu-(?:\d+-)?(.+)\.libvirt-qemu", ("vm",)),
    # The kubelet's pod: systemd driver ("kubepods-<qos>-pod<UID with _>.slice"), or
    # cgroupfs ("pod<UID>").
    _p("pod slice", rf"(?:[\w-]*-)?pod({_UID})\.slice", ("pod_uid",)),
    _p("pod cgroup", rf"pod({_UID})", ("pod_uid",)),
    # Containers: the systemd driver's scopes, then cgroupfs' bare ids.
    _p("containerd scope", rf"cri-containerd-({_HEX64})\.scope", ("container",), "containerd",
       is_unit=True),
    _p("cri-o conmon scope", rf"crio-conmon-({_HEX64})\.scope", ("container",), "cri-o",
       is_unit=True),
    _p("cri-o scope", rf"crio-({_HEX64})\.scope", ("container",), "cri-o", is_unit=True),
    _p("cri-o cgroup", rf"crio-({_HEX64})", ("container",), "cri-o"),
    _p("docker scope", rf"docker-({_HEX64})\.scope", ("container",), "docker", is_unit=True),
    _p("container id", rf"({_HEX64})", ("container",)),
    # Any other systemd unit: a service or a scope (innermost wins).
    _p("unit", r"(.+\.(?:service|scope))", ("unit",), is_unit=True),
)


def unescape(name: str) -> str:
    """systemd's unit-name escaping undone: ``\\xNN`` is the byte NN."""
    raw = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]),
                 name.encode(errors="surrogateescape"))
    return raw.decode(errors="replace")


def _docker_parent(parts: list[str], i: int) -> bool:
    return i > 0 and parts[i - 1] == "docker"


def decode(path: str) -> Owner:
    """The owner a cgroup v2 path (as /proc/PID/cgroup's ``0::`` line gives it) names."""
    found: dict[str, str] = {}
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        for pat in PATTERNS:
            m = pat.regex.fullmatch(part)
            if m is None:
                continue
            for key, value in zip(pat.sets, m.groups(), strict=True):
                if key == "vm":
                    value = unescape(value)
                elif key == "pod_uid":
                    value = value.replace("_", "-")
                found[key] = value
            if pat.runtime:
                found["runtime"] = pat.runtime
            elif pat.name == "container id" and _docker_parent(parts, i):
                found["runtime"] = "docker"
            if pat.is_unit:
                found["unit"] = unescape(part)
            break
    return Owner(**found)


def kubevirt_vm(argv_name: str | None, owner: Owner) -> tuple[str | None, str | None]:
    """(namespace, VM) of a KubeVirt VM: in a pod, virt-launcher names QEMU's guest
    ``NAMESPACE_NAME`` (``-name guest=default_testvm``); else (None, None)."""
    if owner.pod_uid is None or not argv_name or "_" not in argv_name:
        return None, None
    namespace, _, vm = argv_name.partition("_")
    return (namespace, vm) if namespace and vm else (None, None)


def disagreement(argv_name: str | None, owner: Owner) -> str | None:
    """Where the command line's VM name and libvirt's scope name differ, say so (libvirt
    shortens long names and drops characters a unit name cannot hold)."""
    if argv_name is None or owner.vm is None or argv_name == owner.vm:
        return None
    return f"the command line names VM {argv_name!r}, its cgroup libvirt domain {owner.vm!r}"


# The owner labels `serve --metrics.labels` can add to the per-process families, in the
# order they are exported, and where each value comes from (a dict as
# kvmtrace.starts.owner_of makes it: the cgroup's owner, a KubeVirt VM's namespace and
# name). "vm": libvirt's domain or KubeVirt's VM, else the name on the VMM's command line.
METRIC_LABELS: dict[str, str] = {"vm": "vm", "unit": "unit", "pod": "pod_uid",
                                 "namespace": "namespace"}


def metric_label_values(owner: dict, argv_name: str | None, names: tuple[str, ...]
                        ) -> tuple[str, ...]:
    """The values of the owner labels ``names`` (of METRIC_LABELS) for a process whose
    owner is ``owner`` and whose command line names VM ``argv_name``; "" where not known."""
    values = {label: owner.get(field) or "" for label, field in METRIC_LABELS.items()}
    values["vm"] = values["vm"] or argv_name or ""
    return tuple(values[n] for n in names)


def summary(owner: dict) -> str:
    """A start's or an attempt's owner (a dict as kvmtrace.starts.owner_of makes it) in
    one short phrase: its vm, unit, pod and namespace, where known ("" where none is)."""
    keys = (("vm", "vm"), ("unit", "unit"), ("pod_uid", "pod"), ("namespace", "namespace"))
    return ", ".join(f"{label} {owner[k]}" for k, label in keys if owner.get(k))
