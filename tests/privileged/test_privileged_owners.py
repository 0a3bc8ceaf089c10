"""Privileged tier: who owns a VM start, from the cgroup its VMM ran in.

Cgroups shaped like a libvirt scope, a systemd service and a containerd container of a
Kubernetes pod (systemd driver) are made under a directory of this test's own in the
host's cgroup v2 hierarchy (kvmtrace decodes the path at any depth; systemd's own slices
are not touched). In each, a real QEMU (>= 9) refuses an SNP guest and a real process
(tests/vmmaker.py) makes a failed VM start on the real /dev/kvm, both exiting at once: the
shared `explain --json` session must attribute each start to its domain, unit, pod and
container (the kernel keeps the cgroup id of a process at its first KVM call, so one gone
before kvmtrace looks is still attributed), and the pod's QEMU, named the way KubeVirt's
virt-launcher names it (`-name guest=NAMESPACE_VM`), to its KubeVirt namespace and VM.
The kernel tier's guests run the attribution too (guest.sh mounts a v2 hierarchy where
their init did not): the id comes from bpf_get_current_cgroup_id() in each kernel's
programs. `top`'s terminal, its session of its own, and `serve --metrics.labels` (owner
labels are user space: a serve of its own) are host_only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmtrace import cgroups
from tests.privileged.conftest import KVMTRACE, VMMAKER, Serve, samples
from tests.privileged.test_privileged_starts import BASE, CGS, OBJ, QEMU, qemu_major, run_as

pytestmark = pytest.mark.privileged

POD = "1e597579-417e-482f-bf65-5fe170c3aebd"
NAMESPACE = "ns1"  # the pod's QEMU is named as virt-launcher names it: NAMESPACE_VM


def _shapes(tag: str, ctr: str) -> dict[str, str]:
    """Cgroup paths (relative to this test's directory) shaped like a libvirt domain's
    scope, a systemd service, and a containerd container of a pod (systemd driver)."""
    return {
        "libvirt": f"machine.slice/machine-qemu\\x2d7\\x2d{tag}\\x2dvm.scope",
        "service": f"system.slice/{tag}-vm.service",
        "pod": (f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
                f"{POD.replace('-', '_')}.slice/cri-containerd-{ctr}.scope"),
    }


# The VM name each shape's QEMU is started with (-name guest=...).
QEMU_NAMES = {"libvirt": "{tag}-vm", "service": "{tag}-svc", "pod": NAMESPACE + "_{tag}"}


@contextlib.contextmanager
def shaped(tag: str) -> Iterator[tuple[Path, dict[str, Path]]]:
    """This test's directory in the v2 hierarchy with each shape made under it, removed
    (deepest first) at the end."""
    mount = cgroups.v2_mount(Path("/proc/self/mountinfo").read_text())
    assert mount, "no cgroup v2 hierarchy is mounted on this host"
    top = Path(mount) / f"kvmtrace-test-{tag}"
    ctr = (tag * 64)[:64].encode().hex()[:64]
    made = {kind: top / rel for kind, rel in _shapes(tag, ctr).items()}
    try:
        for where in made.values():
            where.mkdir(parents=True)
        yield top, made
    finally:
        for where in sorted({p for m in made.values() for p in [m, *m.parents]
                             if str(p).startswith(str(top))}, key=lambda p: -len(p.parts)):
            for _ in range(50):  # a killed process leaves its cgroup as it is reaped
                try:
                    where.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def entering(where: Path):
    """A preexec_fn: the child moves itself into ``where`` before it execs."""
    def enter() -> None:
        with open(where / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
    return enter


def qemu_links(d: Path, tag: str) -> dict[str, Path]:
    """A QEMU symlink per shape, so each QEMU has a comm of this test's own."""
    if QEMU is None or qemu_major() < 9:
        pytest.fail("needs qemu-system-x86_64 >= 9 (python3 tests/qemu.py install; "
                    "make setup-test does it)")
    links = {}
    for kind in QEMU_NAMES:
        links[kind] = d / f"{tag}-q{kind[0]}"
        links[kind].symlink_to(QEMU)
    return links


def run_in(made: dict[str, Path], links: dict[str, Path], tag: str) -> None:
    """In each shaped cgroup: QEMU refusing an SNP guest, and a driver's failed start."""
    for kind, where in made.items():
        name = QEMU_NAMES[kind].format(tag=tag)
        qemu = run_as(links[kind], [*BASE, *CGS, "-object", f"sev-snp-guest,{OBJ}",
                                    "-name", f"guest={name}"], preexec_fn=entering(where))
        qemu.communicate(timeout=120)
        assert qemu.returncode != 0, f"QEMU started an SNP guest in {kind}"
        subprocess.run([*VMMAKER, "--name", f"{tag}-{kind}"[:15], "--types", "0",
                        "--step", "memfd", "--exit", "1"], preexec_fn=entering(where),
                       capture_output=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def owned(shared, tmp_path_factory):
    explain = shared.explain  # attached before any of this module's processes run
    tag = f"ko{os.getpid() % 10000}{os.urandom(2).hex()}"
    links = qemu_links(tmp_path_factory.mktemp("owners"), tag)
    with shaped(tag) as (top, made):
        run_in(made, links, tag)
        comms = {f"{tag}-{kind}"[:15]: kind for kind in made}
        comms |= {link.name: f"qemu-{kind}" for kind, link in links.items()}
        got = explain.wait(lambda r: r.get("kind") == "start" and r["comm"] in comms,
                           len(comms))
        ctr = made["pod"].name.removeprefix("cri-containerd-").removesuffix(".scope")
        yield {"tag": tag, "ctr": ctr, "top": f"/{top.name}",
               "shapes": {k: str(v.relative_to(top)) for k, v in made.items()},
               **{comms[r["comm"]]: r for r in got}}


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


def test_each_real_qemus_refused_start_is_its_owners(owned, shared):
    """QEMU gives up on SNP before KVM_CREATE_VM and exits at once: its start is its
    domain's, its unit's, and (named as virt-launcher names it) its KubeVirt VM's. Where
    the command line is not kept at execve (kprobe hosts: the plan says so) and /proc was
    gone, the name is not known and nothing is guessed: the pod's KubeVirt VM too."""
    plan = {r["probe"]: r for r in json.loads(shared.serve.get("/api/plan"))}
    kept = plan["command line at exec"]["attached"] == "yes"
    tag, ctr = owned["tag"], owned["ctr"]
    want = {
        "libvirt": {"unit": f"machine-qemu-7-{tag}-vm.scope", "vm": f"{tag}-vm"},
        "service": {"unit": f"{tag}-vm.service"},
        "pod": {"unit": f"cri-containerd-{ctr}.scope", "pod_uid": POD, "runtime": "containerd",
                "container": ctr, "namespace": NAMESPACE, "vm": tag},
    }
    for kind, owner in want.items():
        s = owned[f"qemu-{kind}"]
        assert s["stage"] == "before_create", s  # explain: failed starts only
        assert s["cgroup"] == f"{owned['top']}/{owned['shapes'][kind]}" and s["cgroup_id"], s
        if kept or s["vm_name"] is not None:
            assert (s["vmm"], s["requested_type"]) == ("qemu", "SNP"), s
            assert s["vm_name"] == QEMU_NAMES[kind].format(tag=tag), s
        else:
            assert "no command line" in s["request_evidence"], s
            if kind == "pod":
                owner = {k: v for k, v in owner.items() if k not in ("namespace", "vm")}
        assert s["owner"] == owner, (kind, s)
        assert s["owner_note"] is None, s  # the command line's name and the domain agree


@pytest.fixture(scope="module")
def held(shared):
    """A live process in a libvirt-shaped cgroup with one accepted and one rejected
    KVM_CREATE_VM, held alive; the shared serve's URL."""
    serve = shared.serve
    mount = cgroups.v2_mount(Path("/proc/self/mountinfo").read_text())
    tag = f"kt{os.getpid() % 10000}{os.urandom(2).hex()}"
    top = Path(mount) / f"kvmtrace-test-{tag}"
    where = top / "machine.slice" / f"machine-qemu\\x2d8\\x2d{tag}.scope"
    where.mkdir(parents=True)

    def enter():
        with open(where / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    proc = subprocess.Popen([*VMMAKER, "--name", tag, "--types", "0,1", "--hold", "120"],
                            preexec_fn=enter, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{serve.port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = [p for p in json.loads(serve.get("/api/processes")) if p["pid"] == proc.pid]
            if rows and rows[0]["vm_create_attempts"] == 2 and rows[0]["owner"]:
                break
            time.sleep(0.3)
        yield {"tag": tag, "url": url, "pid": proc.pid, "rows": rows}
    finally:
        proc.kill()
        proc.wait()
        for p in (where, where.parent, top):
            for _ in range(50):  # the killed process leaves the cgroup as it is reaped
                try:
                    p.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def test_the_live_processes_api_names_its_owner(held):
    (row,) = held["rows"]
    assert row["owner"] == {"unit": f"machine-qemu-8-{held['tag']}.scope", "vm": held["tag"]}


def test_a_rejected_attempt_names_its_owner(held, shared):
    """The held process's rejected KVM_CREATE_VM (SW_PROTECTED: not offered by the
    kernels the tiers run) in /api/rejections carries its domain and unit."""
    deadline = time.monotonic() + 30
    while True:
        mine = [r for r in json.loads(shared.serve.get("/api/rejections"))
                if r.get("kind") == "attempt" and r["pid"] == held["pid"]]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert mine, "no rejected attempt of the held process in /api/rejections"
    for a in mine:
        assert a["owner"] == {"unit": f"machine-qemu-8-{held['tag']}.scope",
                              "vm": held["tag"]}, a
        assert a["cgroup"].endswith(f"machine-qemu\\x2d8\\x2d{held['tag']}.scope"), a


# host_only: top's view of the exporter's API, not the kernel
@pytest.mark.host_only
def test_top_once_prints_the_vms_row_with_its_rejection(held):
    p = subprocess.run([*KVMTRACE, "top", "--from", held["url"], "--once", "--sort", "n"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith(held["tag"] + " ")]
    cells = line.split()
    assert cells[1].startswith(f"machine-qemu-8-{held['tag']}"), line  # cut to its column
    assert cells[2:6] == [str(held["pid"]), held["tag"], "1", "1"], line
    assert cells[-2:] == ["DEFAULT:1/0", "SW_PROTECTED:0/1"], line


# host_only: top's view of the exporter's API, not the kernel
@pytest.mark.host_only
def test_top_on_a_terminal_sorts_on_a_key_and_quits_on_q(held):
    """A real pseudo-terminal (pty(7)) of 40 x 220: the table is drawn with the VM's
    row, `r` sorts by rejected (the status line says so), `q` exits 0."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 220, 0, 0))
    proc = subprocess.Popen([*KVMTRACE, "top", "--from", held["url"], "--interval", "0.5"],
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env={**os.environ, "TERM": "xterm"}, start_new_session=True)
    os.close(slave)
    seen = b""

    def until(needle: bytes, timeout: float = 30) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while needle not in seen:
            assert time.monotonic() < deadline, (needle, seen[-2000:])
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
    try:
        until(held["tag"].encode())
        until(b"sort failures")
        seen = b""
        os.write(master, b"r")
        until(b"rejected")
        os.write(master, b"q")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


# host_only: top's own session (a bcc compile of its own) and its table, not the kernel
@pytest.mark.host_only
def test_top_once_on_a_session_of_its_own():
    """No exporter: top attaches (one loader), reads for --interval, prints the table
    with the row of a process that made its creates meanwhile."""
    tag = f"ks{os.getpid() % 10000}{os.urandom(2).hex()}"
    top = subprocess.Popen([*KVMTRACE, "top", "--once", "--interval", "10", "--sort", "n"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = top.stderr.readline()
        assert line.startswith("top: attached"), line + top.stderr.read()
        held = subprocess.Popen([*VMMAKER, "--name", tag, "--types", "0,1", "--hold", "15"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out, err = top.communicate(timeout=120)
        held.kill()
        held.wait()
    finally:
        if top.poll() is None:
            top.kill()
    assert top.returncode == 0, err
    (row,) = [ln for ln in out.splitlines() if f" {tag} " in ln]
    assert row.split()[-2:] == ["DEFAULT:1/0", "SW_PROTECTED:0/1"], row


def _owners(text: str, name: str, comm: str) -> set[tuple[str, ...]]:
    """The (vm, pod) label values of ``name``'s samples of ``comm``, and any unit label."""
    return {(d.get("vm", "-"), d.get("pod", "-"), *([d["unit"]] if "unit" in d else []))
            for d in map(dict, samples(text, name)) if d.get("comm") == comm}


# host_only: the owner labels are the exporter's user space (a serve of its own); the
# kernel's part, each process's cgroup id, is what the attribution tests hold in the guests
@pytest.mark.host_only
def test_serve_with_owner_labels_exports_them_and_promtool_accepts_it(tmp_path):
    """`serve --metrics.labels=vm,pod`: the QEMUs' and drivers' series and failed starts
    in each shaped cgroup carry their VM and pod (a process gone before any scrape too,
    and a live one, whose series keep their labels once it is gone); no unit label; the
    exposition passes `promtool check metrics`."""
    tag = f"kl{os.getpid() % 10000}{os.urandom(2).hex()}"
    links = qemu_links(tmp_path, tag)
    serve = Serve("--metrics.labels=vm,pod", "--retire-interval", "0.5", "-q")
    try:
        with shaped(tag) as (_, made):
            held = subprocess.Popen([*VMMAKER, "--name", f"{tag}-h", "--types", "0,1",
                                     "--hold", "120"], preexec_fn=entering(made["libvirt"]),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                run_in(made, links, tag)
                deadline = time.monotonic() + 60
                while True:
                    live = serve.metrics()
                    failed = {c for c in [*(link.name for link in links.values()),
                                          *(f"{tag}-{k}"[:15] for k in made)]
                              if _owners(live, "kvmtrace_vm_start_failures_total", c)}
                    if (len(failed) == 6 and _owners(
                            live, "kvmtrace_vm_create_rejected_total", f"{tag}-h")):
                        break
                    assert time.monotonic() < deadline, (failed, live[-3000:])
                    time.sleep(0.5)
            finally:
                held.kill()
                held.wait()
            time.sleep(2.0)  # retirement passes: the held process's series are folded
            text = serve.metrics()
    finally:
        code, _, err = serve.stop()
    assert code == 0 and "Traceback" not in err, err
    failures = "kvmtrace_vm_start_failures_total"
    assert _owners(text, failures, links["libvirt"].name) == {(f"{tag}-vm", "")}
    assert _owners(text, failures, links["service"].name) == {(f"{tag}-svc", "")}
    assert _owners(text, failures, links["pod"].name) == {(tag, POD)}  # KubeVirt's VM
    assert _owners(text, "kvmtrace_vm_types_queries_total", links["pod"].name) == {(tag, POD)}
    attempts = "kvmtrace_vm_create_attempts_total"
    assert _owners(text, attempts, f"{tag}-libvirt"[:15]) == {(f"{tag}-vm", "")}  # the domain
    assert _owners(text, attempts, f"{tag}-service"[:15]) == {("", "")}
    assert _owners(text, attempts, f"{tag}-pod"[:15]) == {("", POD)}
    for t in (live, text):  # alive, then folded once it exited
        assert _owners(t, "kvmtrace_vm_create_rejected_total", f"{tag}-h") == {
            (f"{tag}-vm", "")}
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: 'make test' installs Debian's prometheus"
    out = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                         capture_output=True, check=False, timeout=60)
    assert out.returncode == 0 and out.stdout == b"" and out.stderr == b"", out
