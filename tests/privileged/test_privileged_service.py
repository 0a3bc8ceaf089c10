"""kvmtrace serve as a service: an unprivileged uid with exactly the documented
capabilities (setpriv, util-linux), the systemd unit's ExecStart under the unit's
credentials, sd_notify, the capability drop, and one test per missing piece.

Needs root to hand out capabilities (CI runs as root): fails, never skips."""

from __future__ import annotations

import grp
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kvmtrace import privileges
from tests.conftest import HERE, free_port, unique_comm
from tests.privileged.conftest import START_TIMEOUT, VMMAKER, held_bpf, maps_alive, samples

pytestmark = pytest.mark.privileged

REPO = HERE.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")
UNIT = REPO / "deploy" / "systemd" / "kvmtrace.service"
ENV_FILE = REPO / "deploy" / "systemd" / "kvmtrace.env"
UID = 65534  # nobody
DYNAMIC_UID = 61184  # the first uid systemd's DynamicUser= hands out
TYPES = {0: "DEFAULT", 2: "SEV", 99: "unknown:99"}
REPEAT = 3


def kvm_gid() -> int:
    return os.stat("/dev/kvm").st_gid


def setpriv(caps, groups, uid: int = UID, nnp: bool = True) -> list[str]:
    tool = shutil.which("setpriv")
    if tool is None:
        pytest.fail("setpriv (util-linux) is not installed")
    spec = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
    cmd = [tool, f"--reuid={uid}", f"--regid={uid}",
           f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
           f"--inh-caps={spec}", f"--ambient-caps={spec}", f"--bounding-set={spec}"]
    return [*cmd, "--no-new-privs"] if nnp else cmd


def paranoid() -> int:
    return int(Path("/proc/sys/kernel/perf_event_paranoid").read_text())


def restricted() -> bool:
    """Debian's kernels (the kernel tier's guests) default to perf_event_paranoid=3, at
    which their patch refuses perf_event_open without CAP_SYS_ADMIN; this machine's
    mainline 6.18 has 2 (and would treat 3 as 2)."""
    return paranoid() > 2


def documented_caps() -> tuple[str, ...]:
    """The documented set for this kernel (docs/service.md)."""
    return privileges.SERVICE_CAPS if restricted() else privileges.BASE_CAPS


def kept_after_attach() -> list[str]:
    """What docs/service.md says serve keeps once attached from the documented set:
    CAP_DAC_READ_SEARCH (the VMMs' words: their logs), and CAP_BPF before 6.5 with
    kernel.unprivileged_bpf_disabled set (Debian 12's 6.1)."""
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    ubd = int(Path("/proc/sys/kernel/unprivileged_bpf_disabled").read_text())
    return ["CAP_DAC_READ_SEARCH", *(["CAP_BPF"] if (major, minor) < (6, 5) and ubd else [])]


PARANOID_LINE = "kernel.perf_event_paranoid is 3: this kernel (Debian's restriction"


@pytest.fixture(scope="module", autouse=True)
def reachable_by_the_uid():
    """The venv and the checkout must be readable by an unprivileged uid."""
    proc = subprocess.run([*setpriv([], [], nnp=False), PYTHON, "-c", "import kvmtrace"],
                          capture_output=True, text=True, timeout=30, check=False, cwd="/")
    if proc.returncode != 0:
        pytest.fail(f"uid {UID} cannot import kvmtrace from {REPO}: {proc.stderr.strip()} "
                    "(the checkout must be world-readable for this tier)")


class Notify:
    """A $NOTIFY_SOCKET the unprivileged service can write to."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="kvmtrace-notify-")
        os.chmod(self.dir, 0o755)
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)
        self.messages: list[list[str]] = []

    def wait_for(self, line: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not any(line in m for m in self.messages):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {line} within {timeout:.0f} s; got {self.messages}")
            if proc is not None and proc.poll() is not None:  # it exited: say why, now
                _, err = proc.communicate(timeout=30)
                pytest.fail(f"exited {proc.returncode} before {line}: {err.strip()[-2000:]}")
            self.sock.settimeout(min(left, 0.5))
            try:
                self.messages.append(self.sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                continue

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Service:
    """``cmd`` (a kvmtrace serve) started with NOTIFY_SOCKET, ready at READY=1."""

    def __init__(self, cmd: list[str], port: int, path: str = "/metrics", env=None):
        self.port, self.path = port, path
        self.notify = Notify()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
            env={**os.environ, **(env or {}), "NOTIFY_SOCKET": self.notify.path})
        try:
            self.notify.wait_for("READY=1", START_TIMEOUT, self.proc)
        except BaseException:
            if self.proc.poll() is None:  # (an early exit was communicated already)
                self.proc.kill()
                out, err = self.proc.communicate(timeout=30)
                print(out, err, file=sys.stderr)
            raise

    def get(self, path: str) -> str:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    def status(self) -> dict[str, int]:
        return privileges.parse_status(Path(f"/proc/{self.proc.pid}/status").read_text())

    def stop(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        self.notify.wait_for("STOPPING=1", 5)
        self.notify.close()
        return self.proc.returncode, out, err


def make_vms(comm: str) -> None:
    subprocess.run([*VMMAKER, "--name", comm, "--types", ",".join(map(str, TYPES)),
                    "--repeat", str(REPEAT), "--queries", "2"],
                   capture_output=True, text=True, check=True, timeout=60)


def assert_exact_counts(text: str, comm: str) -> None:
    attempts = samples(text, "kvmtrace_vm_create_attempts_total")
    rejected = samples(text, "kvmtrace_vm_create_rejected_total")
    for t, name in TYPES.items():
        labels = {"comm": comm, "vm_type": str(t), "vm_type_name": name}
        assert attempts.get(frozenset(labels.items())) == REPEAT, (t, attempts)
        mine = {k: v for k, v in rejected.items() if ("comm", comm) in k
                and ("vm_type", str(t)) in k}
        assert sum(mine.values()) == (0 if t == 0 else REPEAT), (t, mine)
        if t:  # reasons need /dev/kvm's mask: the kvm group is what gives it
            assert mine == {frozenset({**labels, "errno": "EINVAL",
                                       "reason": "type_unsupported"}.items()): REPEAT}
    queries = samples(text, "kvmtrace_vm_types_queries_total")
    assert queries.get(frozenset({("comm", comm)})) == 2, queries
    assert samples(text, "kvmtrace_host_kvm_up") == {frozenset(): 1.0}


@pytest.fixture(scope="module")
def documented():
    """serve as uid 65534 with CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH (and CAP_SYS_ADMIN
    where perf_event_paranoid is Debian's 3) and the kvm group, nothing else (bounding set
    too, no_new_privs), on a non-default path."""
    port = free_port()
    cmd = [*setpriv(documented_caps(), [kvm_gid()]), PYTHON, "-m", "kvmtrace",
           "serve", "--web.listen-address", f"127.0.0.1:{port}", "-q",
           "--retire-interval", "0.5", "--web.telemetry-path", "/kvm/metrics"]
    svc = Service(cmd, port, "/kvm/metrics")
    status = svc.status()
    comm = unique_comm("kvms")
    make_vms(comm)
    time.sleep(1.5)  # one retirement pass folds the exited vmmaker
    text = svc.get("/kvm/metrics")
    yield svc, status, comm, text
    if svc.proc.poll() is None:
        svc.stop()


@pytest.fixture(scope="module")
def told_root(documented, tmp_path_factory):
    """Root VMMs' failed starts that write why into a file in a 0700 root directory: one
    on the directory's own filesystem, one on an overlayfs mounted in it (as virtme-ng's
    /tmp, or a container's root: there stat(2) names the real file, the fd the overlay's
    inode). serve (uid 65534, no CAP_SYS_PTRACE) cannot read root's /proc/PID/fd/2: only
    the kernel's view of fd 2 (read at its first KVM call) can name the file."""
    svc = documented[0]
    where = tmp_path_factory.mktemp("rootwords")
    os.chmod(where, 0o700)
    for d in ("lower", "rw", "merged"):
        (where / d).mkdir()
    # Its layers on two filesystems of their own (tmpfs: an overlay's upper layer cannot
    # be an overlay, as /tmp is in the kernel tier's guests), xino off: virtme-ng's /tmp.
    for d in ("lower", "rw"):
        subprocess.run(["mount", "-t", "tmpfs", d, str(where / d)], check=True,
                       capture_output=True, timeout=30)
    for d in ("upper", "work"):
        (where / "rw" / d).mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={where}/lower,upperdir={where}/rw/upper,"
                    f"workdir={where}/rw/work,xino=off", str(where / "merged")],
                   check=True, capture_output=True, timeout=30)
    runs = {}
    try:
        for kind, log in (("plain", where / "vmm.log"), ("overlay", where / "merged" / "vmm.log")):
            comm = unique_comm("kvmw")
            said = f"{comm}: giving up: guest_memfd refused"
            with open(log, "w") as f:
                run = subprocess.run([*VMMAKER, "--name", comm, "--types", "0", "--step",
                                      "memfd", "--exit", "1", "--say", said],
                                     stdout=subprocess.DEVNULL, stderr=f, timeout=60,
                                     check=False)
            runs[kind] = (comm, run.returncode, str(log), said)
        deadline = time.monotonic() + START_TIMEOUT
        comms = {comm: kind for kind, (comm, *_) in runs.items()}
        while True:
            mine = {comms[r["comm"]]: r for r in json.loads(svc.get("/api/rejections"))
                    if r.get("kind") == "start" and r["comm"] in comms}
            if len(mine) == len(comms) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        yield {kind: (*runs[kind][1:], mine.get(kind)) for kind in runs}
    finally:
        for d in ("merged", "rw", "lower"):
            subprocess.run(["umount", str(where / d)], check=False, timeout=30)


@pytest.mark.parametrize("kind", ["plain", "overlay"])
def test_a_root_vmms_words_are_read_through_the_kernels_view_of_its_stderr(told_root, kind):
    rc, log, said, s = told_root[kind]
    assert rc == 1 and s is not None, told_root
    assert s["vmm_words_note"] == f"stderr: {log}", s
    assert (s["vmm_words"] or "").rstrip().endswith(said), s


def test_documented_set_serves_exact_counts(documented):
    _, _, comm, text = documented
    assert_exact_counts(text, comm)


def test_capabilities_are_dropped_after_attach(documented):
    svc, status, _, _ = documented
    keep = privileges.mask_of(kept_after_attach())  # CAP_SYS_ADMIN is never kept
    assert (status["CapEff"], status["CapPrm"], status["CapAmb"], status["NoNewPrivs"]) \
        == (keep, keep, 0, 1), status
    assert Path(f"/proc/{svc.proc.pid}").stat().st_uid == UID


def test_sd_notify_status_then_ready(documented):
    svc, _, _, _ = documented
    first, *_ = svc.notify.messages
    assert first[0].startswith("STATUS=compiling") and "READY=1" not in first
    (ready,) = [m for m in svc.notify.messages if "READY=1" in m]
    assert f"MAINPID={svc.proc.pid}" in ready
    assert any(x.startswith("STATUS=") and "probe points attached" in x for x in ready)


def test_telemetry_path_is_the_only_metrics_path(documented):
    svc, _, _, _ = documented
    with pytest.raises(urllib.error.HTTPError) as exc:
        svc.get("/metrics")
    assert exc.value.code == 404
    assert "href='/kvm/metrics'" in svc.get("/")


def test_stop_notifies_and_exits_cleanly(documented):
    """SIGTERM: a clean exit, and the kernel frees every map (and so every program) the
    exporter held -- nothing of it stays attached."""
    svc, _, _, _ = documented
    map_ids, _ = held_bpf(svc.proc.pid)
    assert len(map_ids) >= 4 and maps_alive(map_ids) == map_ids
    code, out, err = svc.stop()
    assert code == 0, err
    assert "Traceback" not in err
    kept = kept_after_attach()
    assert f"capabilities after attach: {', '.join(kept) or 'none'}" in out, out
    deadline = time.monotonic() + 10  # maps are freed after an RCU grace period
    while maps_alive(map_ids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not maps_alive(map_ids), "maps (and programs) outlived serve"


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


# one_guest: kvmtrace's own checks and flags file; what the kernel decides
# (perf_event_paranoid, CAP_BPF before 6.5) the documented-set tests check in every guest
@pytest.mark.one_guest
def test_unit_execstart_under_the_units_credentials():
    """What systemd would run (no systemd as PID 1 here: systemd-run cannot): the unit's
    ExecStart with $KVMTRACE_ARGS from kvmtrace.env, as a DynamicUser-range uid with the
    unit's AmbientCapabilities, CapabilityBoundingSet, SupplementaryGroups and
    NoNewPrivileges. Only the listen address is added (a free port)."""
    unit = unit_settings()
    caps = unit["AmbientCapabilities"][0].split()
    assert unit["CapabilityBoundingSet"][0].split() == caps
    groups = []
    for g in unit["SupplementaryGroups"][0].split():
        try:
            groups.append(grp.getgrnam(g).gr_gid)
        except KeyError:
            if g == "systemd-journal" and not shutil.which("journalctl"):
                continue  # systemd makes it, and where systemd is not the unit cannot run
            pytest.fail(f"the unit's group {g} does not exist here (scripts/setup-host.sh "
                        "--test creates the kvm group where no udev runs)")
    env_args = next(ln.partition("=")[2] for ln in ENV_FILE.read_text().splitlines()
                if ln.startswith("KVMTRACE_ARGS="))
    exec_start = shlex.split(unit["ExecStart"][0].replace("$KVMTRACE_ARGS", env_args))
    assert exec_start[0] == "/opt/kvmtrace/.venv/bin/kvmtrace"
    exec_start[0] = str(REPO / ".venv" / "bin" / "kvmtrace")
    port = free_port()
    cmd = [*setpriv(caps, groups, DYNAMIC_UID, nnp=unit["NoNewPrivileges"] == ["yes"]),
           *exec_start, "--web.listen-address", f"127.0.0.1:{port}", "--retire-interval",
           "0.5"]
    svc = Service(cmd, port)
    try:
        comm = unique_comm("kvmu")
        make_vms(comm)
        time.sleep(1.5)
        assert_exact_counts(svc.get("/metrics"), comm)
        assert svc.status()["CapEff"] == privileges.mask_of(kept_after_attach())
    finally:
        code, _, err = svc.stop()
    assert code == 0 and "Traceback" not in err, err


# In a mount namespace of its own: /proc made private there first (not "/": in a chroot,
# such as the Debian 13 root of the kernel tier, "/" is no mount point and unshare's
# default --propagation private fails), so the bind never reaches the host's.
KALLSYMS_HIDDEN = ("mount --make-rprivate /proc && mount --bind {noread} /proc/kallsyms "
                   "&& exec \"$@\"")


def run_as(caps, groups, command: str, env=None, prefix=()) -> list[str]:
    """``kvmtrace COMMAND`` as the uid with ``caps``: its exit must be 1, no traceback;
    returns its stderr lines."""
    args = ["--web.listen-address", f"127.0.0.1:{free_port()}"] if command == "serve" else []
    proc = subprocess.run([*prefix, *setpriv(caps, groups), PYTHON, "-m", "kvmtrace",
                           command, *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd="/", check=False)
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()


# one_guest: kvmtrace's own checks and flags file; what the kernel decides
# (perf_event_paranoid, CAP_BPF before 6.5) the documented-set tests check in every guest
@pytest.mark.one_guest
@pytest.mark.parametrize(("piece", "needle"), [
    ("CAP_BPF", "missing capability CAP_BPF (load BPF programs and create maps)"),
    ("CAP_PERFMON", "missing capability CAP_PERFMON (attach tracepoints and kprobes)"),
    ("CAP_DAC_READ_SEARCH", "tracefs at /sys/kernel/debug/tracing is not readable"),
    ("kvm group", "cannot open /dev/kvm"),
    ("headers", "kernel headers are not at /nonexistent/headers"),
    ("kallsyms", "cannot read /proc/kallsyms (it is empty: hidden)"),
])
# trace's half host_only: serve and trace meet the same requirement check before loading
# (kvmtrace.commands.common), so one command shows it under kprobes (85 s of that guest)
@pytest.mark.parametrize("command", ["serve", pytest.param("trace", marks=pytest.mark.host_only)])
def test_each_missing_piece_is_one_error_line(piece, needle, command, tmp_path):
    """The documented set for this kernel without one piece: that piece's line. Where
    CAP_SYS_ADMIN is in the set (Debian's paranoid 3) it stands in for CAP_BPF and
    CAP_PERFMON, so those two go with it, and the perf_event_paranoid line comes too."""
    caps = [c for c in documented_caps() if c != piece]
    expected = [needle]
    if piece in ("CAP_BPF", "CAP_PERFMON") and restricted():
        caps.remove("CAP_SYS_ADMIN")
        expected.append(PARANOID_LINE)
    groups = [] if piece == "kvm group" else [kvm_gid()]
    env = dict(os.environ)
    if piece == "headers":
        env["BCC_KERNEL_SOURCE"] = "/nonexistent/headers"
    prefix: list[str] = []
    if piece == "kallsyms":  # as ProtectKernelTunables= does: an unreadable node over it
        noread = tmp_path / "noread"
        noread.touch(mode=0)
        prefix = [shutil.which("unshare") or "unshare", "-m", "--propagation", "unchanged",
                  "sh", "-c",
                  KALLSYMS_HIDDEN.format(noread=shlex.quote(str(noread))), "sh"]
    lines = run_as(caps, groups, command, env, prefix)
    assert len(lines) == len(expected), lines
    for line, want in zip(lines, expected, strict=True):
        assert line.startswith("ERROR: ") and want in line, (line, want)


@pytest.mark.parametrize("command", ["serve", "trace"])
def test_perf_event_paranoid_decides_whether_cap_sys_admin_is_needed(command):
    """CAP_BPF + CAP_PERFMON + CAP_DAC_READ_SEARCH and the kvm group: at Debian's
    perf_event_paranoid=3 (the guests) one line naming the sysctl, CAP_SYS_ADMIN and both
    fixes; at mainline's 2 (this machine) the perf_event_open requirement is met with
    CAP_PERFMON alone (doctor's JSON), and the documented-set tests serve with it."""
    caps, groups = privileges.BASE_CAPS, [kvm_gid()]
    if restricted():
        (line,) = run_as(caps, groups, command)
        assert line.startswith("ERROR: " + PARANOID_LINE) and "CAP_SYS_ADMIN" in line \
            and "/etc/sysctl.d" in line, line
        return
    proc = subprocess.run([*setpriv(caps, groups), PYTHON, "-m", "kvmtrace", "doctor",
                           "--json"], capture_output=True, text=True, cwd="/", check=False,
                          timeout=max(120, START_TIMEOUT))  # a bcc compile
    assert "Traceback" not in proc.stderr, proc.stderr
    (req,) = [r for r in json.loads(proc.stdout)["requirements"]
              if r["name"] == "perf_event_open"]
    assert req == {"name": "perf_event_open", "ok": True, "detail":
                   f"kernel.perf_event_paranoid={paranoid()}: CAP_PERFMON is enough for "
                   "perf_event_open"}, req


CHILD = """
import json, socket, struct, subprocess, sys
ours, theirs = socket.socketpair()
proc = subprocess.Popen([sys.executable, "-m", "kvmtrace.handoff", str(theirs.fileno())],
                        pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE, text=True)
theirs.close()
req = sys.argv[1].encode()
ours.sendall(struct.pack("<I", len(req)) + req)
head = ours.recv(4, socket.MSG_WAITALL)
reply = json.loads(ours.recv(struct.unpack("<I", head)[0], socket.MSG_WAITALL)) \\
    if len(head) == 4 else None
err = proc.stderr.read()
print(json.dumps({"rc": proc.wait(), "stderr": err,
                  "error": reply and reply.get("error")}))
"""


def run_child(prefix: list[str], request: str) -> dict:
    proc = subprocess.run([*prefix, PYTHON, "-c", CHILD, request], capture_output=True,
                          text=True, timeout=120, cwd="/", check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# one_guest: kvmtrace's own checks and flags file; what the kernel decides
# (perf_event_paranoid, CAP_BPF before 6.5) the documented-set tests check in every guest
@pytest.mark.one_guest
def test_loader_child_names_a_missing_capability_in_one_line():
    """The loader child run on its own (as kvmtrace.handoff starts it) without CAP_BPF:
    its reply is the one line, not bcc's "Failed to compile BPF module"."""
    caps = [c for c in privileges.BASE_CAPS if c != "CAP_BPF"]
    got = run_child(setpriv(caps, [kvm_gid()]), '{"self_tgid": 0, "filter_tgid": 0}')
    assert got["rc"] == 0 and "Traceback" not in got["stderr"], got
    lines = got["error"].split("\nERROR: ")  # one line each (printed after "ERROR: ")
    assert lines[0].startswith("missing capability CAP_BPF ("), got
    # at Debian's perf_event_paranoid=3 the child also names CAP_SYS_ADMIN
    assert lines[1:] == ([] if not restricted() else [lines[1]]), got
    assert not restricted() or lines[1].startswith(PARANOID_LINE), got
    assert all("\n" not in ln for ln in lines)


# one_guest: kvmtrace's own checks and flags file; what the kernel decides
# (perf_event_paranoid, CAP_BPF before 6.5) the documented-set tests check in every guest
@pytest.mark.one_guest
def test_loader_child_never_prints_a_traceback():
    got = run_child([], '{"self_tgid": "not a pid"')  # a request that is not JSON
    assert got["rc"] == 1 and got["error"] is None, got
    lines = got["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: the loader child failed: "), got
    assert "Traceback" not in got["stderr"]
