"""Privileged tier: who owns a VM start, from the cgroup its VMM ran in.

Cgroups shaped like a libvirt scope, a systemd service and a containerd container of a
Kubernetes pod (systemd driver) are made under a directory of this test's own in the
host's cgroup v2 hierarchy (kvmtrace decodes the path at any depth; systemd's own slices
are not touched). In each, a real process (tests/vmmaker.py) makes a failed VM start on
the real /dev/kvm and exits at once: the shared `explain --json` session must attribute
each start to its domain, unit, pod and container (the kernel keeps the cgroup id of a
process at its first KVM call, so one gone before kvmtrace looks is still attributed).
The kernel tier's guests run the attribution too (guest.sh mounts a v2 hierarchy where
their init did not): the id comes from bpf_get_current_cgroup_id() in each kernel's
programs. `top`'s terminal and its session of its own are host_only (a view, not the kernel).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from kvmtrace import cgroups
from tests.privileged.conftest import KVMTRACE, VMMAKER

pytestmark = pytest.mark.privileged

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
