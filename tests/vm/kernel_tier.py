"""The kernel tier (`make test-kernels`): kvmtrace's kprobe paths on real stock kernels.

For every line of tests/vm/kernels.txt (a Debian suite and kernel flavour) this
host-side test

1. resolves the build that suite serves now and fetches and unpacks it
   (tests/vm/kernels.py; cached by version), printing what it resolved,
2. for a line with a userland other than the host's (``userland=trixie``), uses the
   Debian root that tests/vm/userland.py debootstrapped and set up with
   scripts/setup-host.sh --test (the README's set-up, on that release),
3. builds tests/vm/seedsim/ -- a test-only SIMULATION of the 2023 TDX v12 vm_type
   dispatch, not the patch itself -- against that kernel's unpacked headers, with the
   guest userland's compiler (the host's, or in a chroot of that root),
4. boots the kernel with virtme-ng under QEMU/TCG (--disable-kvm gives `-cpu max`,
   whose svm lets kvm_amd load in the guest) on the host root (read-only) or that
   userland's root, and runs tests/vm/guest.sh there: modprobe kvm_amd,
   tracefs/debugfs, then the privileged tests its tests= class names (tests/vm/kernels.py
   GUEST_TESTS: tests/privileged/ and tests/vm/guest_kprobes.py, or a core of them) with
   the checkout's .venv of that userland,
5. fails -- never skips -- when the kernel does not boot, runs out of its time bound,
   or any guest test fails or skips, quoting the reason and naming the guest.

Each userland other than the host's also gets test_readme_commands: the README's two
commands, `make test` and `make run` (answering a scrape), in a chroot of that root on
this machine's kernel.

The guests and the README jobs run side by side in lanes, as many at a time as the
machine has CPUs and memory for (KVMTRACE_VM_PARALLEL overrides): a guest runs its vCPUs
on one host thread, so a 2-core machine runs two at once. One thread prepares them (steps
1-3: downloads, the debootstrap, builds) one after another while the lanes run what is
ready, longest first (:func:`job_order`). Every job has a time bound and the tier a
deadline (KVMTRACE_TIER_DEADLINE), so the worst case is bounded too; each failure is
printed the moment it happens, not only in pytest's summary.

Results land in build/vm/<kernel>/ (kernel.json: the resolved build; console.log,
guest.log, junit.xml, facts.json, timing.json, seedsim/) and build/vm/userland-<codename>/.
The file name does not match test_*.py: `make test` never boots VMs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.vm import kernels as kernelsmod
from tests.vm import userland as userlandmod

pytestmark = pytest.mark.privileged

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = Path(os.environ.get("KVMTRACE_VM_RESULTS", REPO / "build" / "vm"))
VNG = Path(os.environ.get("KVMTRACE_VNG", kernelsmod.CACHE / "vng-venv" / "bin" / "vng"))

# Each guest's time bound (vng start to power-off) is its tests= class's (tests/vm/kernels.py
# GUEST_TESTS; KVMTRACE_VM_TIMEOUT overrides them all); past it the VM is killed and the test
# fails naming the guest. The whole tier also has a deadline, from its start: no guest or
# README job runs past it, so the worst case -- every job at its bound -- still ends in
# time (CI has 90 minutes; the host's `make test` and the set-up come first).
VM_TIMEOUT = int(os.environ.get("KVMTRACE_VM_TIMEOUT", "0")) or None
TIER_DEADLINE = int(os.environ.get("KVMTRACE_TIER_DEADLINE", "3900"))
# The README job: the Debian 13 root's `make test` and `make run` in a chroot.
README_BOUND = 1200
# The guest script must have started by then, or the kernel did not boot.
# Only these test paths or node ids in every guest (space-separated), to reproduce one
# failure quickly; the tier's checks of what a guest ran then fail, as they should.
GUEST_PATHS = os.environ.get("KVMTRACE_GUEST_PATHS", "").split()
# (Under a loaded machine a 7.3 guest has taken over 180 s to reach it.)
BOOT_TIMEOUT = int(os.environ.get("KVMTRACE_VM_BOOT_TIMEOUT", "300"))
GUEST_MEMORY = os.environ.get("KVMTRACE_VM_MEMORY", "4G")
GUEST_CPUS = os.environ.get("KVMTRACE_VM_CPUS", "2")
# TCG threading. Multi-threaded TCG (QEMU's default) let a 6.12 guest die in CI with
# "Oops: int3" in __schedule: a CPU trapped on the int3 of a text_poke_bp() (jump label /
# kprobe / ftrace patching, which every attach and detach does) after the patch had
# completed, a cross-modifying-code race of the emulator, not of the guest kernel. With
# thread=single the guest keeps its 2 vCPUs (SMP, per-CPU maps, IPIs) but QEMU runs them
# round-robin on one host thread, so patching is never observed half-done.
GUEST_TCG = os.environ.get("KVMTRACE_VM_TCG", "tcg,thread=single")
# Directories virtme-ng's init mounts a tmpfs over in the guest (virtme/guest/virtme-init,
# mount_sys_filesystems; /tmp by its overlays): a checkout there is invisible to a guest
# that boots on this root. The kernel cache and results are passed in explicitly.
GUEST_HIDDEN = tuple(Path(d) for d in ("/tmp", "/var/tmp", "/var/log", "/var/cache", "/run"))


def _bytes(size: str) -> int:
    """QEMU's -m size ("4G", "4096M", "4096" in MiB) in bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    size = size.strip().upper()
    if size[-1:] in units:
        return int(float(size[:-1]) * units[size[-1]])
    return int(size) << 20


def _mem_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) << 10
    return 0


def parallel_guests(n: int, env: dict[str, str] | None = None) -> int:
    """How many of ``n`` guests to run at once: KVMTRACE_VM_PARALLEL, else one per CPU
    this process may use (thread=single: one busy host thread per guest), no more than
    fit in the available memory with 1 GiB each to spare for QEMU and the page cache."""
    env = os.environ if env is None else env
    if env.get("KVMTRACE_VM_PARALLEL"):
        return max(1, min(n, int(env["KVMTRACE_VM_PARALLEL"])))
    cpus = len(os.sched_getaffinity(0))
    fit = _mem_available() // (_bytes(GUEST_MEMORY) + (1 << 30))
    return max(1, min(n, cpus, fit))


_OOPS = re.compile(r"\] (Oops|BUG|kernel BUG|general protection|WARNING|Kernel panic)")


def _tail(path: Path, n: int = 25) -> str:
    """The console's last ``n`` lines, preceded by the first oops/BUG/WARNING if earlier."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(none)"
    first = next((i for i, line in enumerate(lines) if _OOPS.search(line)), None)
    head = []
    if first is not None and first < len(lines) - n:
        head = ["--- first oops/warning on the console:", *lines[first:first + 30],
                "--- console tail:"]
    return "\n".join(head + lines[-n:])


@pytest.fixture(scope="module", autouse=True)
def host_ready():
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    if not VNG.exists():
        problems.append(f"no virtme-ng at {VNG} (run tests/vm/setup.sh)")
    if not shutil.which("qemu-system-x86_64"):
        problems.append("qemu-system-x86_64 missing (apt-get install qemu-system-x86)")
    if not (REPO / ".venv" / "bin" / "python").exists():
        problems.append(f"{REPO}/.venv missing (make setup-test)")
    hidden = next((d for d in GUEST_HIDDEN if REPO.is_relative_to(d)), None)
    if hidden:
        problems.append(f"this checkout is under {hidden}, which virtme-ng's init covers "
                        "with a tmpfs in the guest (the guests that share this root would "
                        "not find it): clone it elsewhere")
    if problems:
        pytest.fail("kernel tier cannot run here: " + "; ".join(problems))


def build_seedsim(kernel: kernelsmod.Kernel, out: Path, root: Path | None) -> Path:
    """Build the SIMULATION module against ``kernel``'s unpacked headers, in ``out``.

    ``out`` is in this run's results directory (the guest sees it through --rwdir), so
    two checkouts running the tier at once never share a build. With a userland ``root``
    the build runs chrooted there, with that release's compiler (its kernels' own).
    """
    out.mkdir(parents=True)
    for f in ("seedsim.c", "Kbuild", "Makefile"):
        shutil.copy2(HERE / "seedsim" / f, out / f)
    make = ["make", "-C", str(kernel.headers), f"M={out}", "modules"]
    if root is None:
        p = subprocess.run(make, capture_output=True, text=True, timeout=300, check=False)
    else:
        p = userlandmod.run_in(root, " ".join(make), timeout=300,
                               binds=(kernelsmod.CACHE, out))
    ko = out / "seedsim.ko"
    if p.returncode != 0 or not ko.exists():
        pytest.fail(f"{kernel.name}: building seedsim against {kernel.headers} failed: "
                    + "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:]))
    return ko


def _pump(stream, path: Path) -> None:
    with open(path, "wb") as f:
        for chunk in iter(lambda: stream.read1(65536), b""):
            f.write(chunk)
            f.flush()


def boot(kernel: kernelsmod.Kernel, run: Path, ko: Path, root: Path | None,
         stop: threading.Event, bound: int) -> dict:
    """Boot ``kernel`` and run guest.sh; returns timings. Never waits past ``bound``
    seconds, nor past ``stop`` (the run was interrupted: the VM would outlive it).

    ``root`` None: the host's root, read-only, with this checkout at its own path.
    Otherwise that userland root (read-only too), with its copy of the checkout at
    userland.SRC and ``run`` at userland.GUEST_RUN.
    """
    guest_timeout = max(60, bound - 90)
    if root is None:
        where, repo, grun = [], REPO, run
        rwdir = str(run)
    else:
        repo, grun = userlandmod.SRC, userlandmod.GUEST_RUN
        where = ["--root", str(root)]
        rwdir = f"{grun}={run}"
    gko = grun / ko.relative_to(run)
    paths = shlex.join(GUEST_PATHS or kernel.spec.paths)
    cmd = [str(VNG), "-v", "-r", str(kernel.image), *where, "--disable-kvm", "--force-9p",
           "-m", GUEST_MEMORY, "-p", GUEST_CPUS, f"--qemu-opts=-accel {GUEST_TCG}",
           f"--rodir={kernelsmod.CACHE}={kernelsmod.CACHE}", f"--rwdir={rwdir}",
           "--exec", f"{repo / 'tests/vm/guest.sh'} {grun} {repo} {gko} {guest_timeout} "
                     f"{shlex.quote(kernel.spec.markers)} {paths}"]
    (run / "vng-command.txt").write_text(" ".join(cmd) + "\n")
    env = dict(os.environ, PATH=f"{VNG.parent}:{os.environ.get('PATH', '')}")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=run, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    pump = threading.Thread(target=_pump, args=(proc.stdout, run / "console.log"), daemon=True)
    pump.start()
    booted_at = None
    why = None
    while proc.poll() is None:
        now = time.monotonic() - t0
        if booted_at is None and (run / "booted").exists():
            booted_at = now
        if booted_at is None and now > BOOT_TIMEOUT:
            why = f"the kernel did not boot (guest script not started) within {BOOT_TIMEOUT} s"
        elif now > bound:
            why = f"ran out of time: the VM did not finish within its bound of {bound} s"
        elif stop.is_set():
            why = "the test run was interrupted"
        if why:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.5)
    pump.join(timeout=10)
    total = time.monotonic() - t0
    if booted_at is None and (run / "booted").exists():
        booted_at = total
    timing = {"kernel": kernel.name, "release": kernel.release, "version": kernel.version,
              "userland": kernel.spec.userland, "vm_seconds": round(total, 1),
              "boot_seconds": None if booted_at is None else round(booted_at, 1),
              "vng_exit": proc.returncode}
    (run / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    if why:
        pytest.fail(f"{kernel.name} ({kernel.release}): {why}; console tail:\n"
                    + _tail(run / "console.log"))
    return timing


def junit_report(path: Path) -> tuple[dict[str, int], list[str], set[str]]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    bad = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                bad.append(f"{tag.upper()} {case.get('classname')}::{case.get('name')}: "
                           f"{msg[0][:300] if msg else ''}")
    # classname: "tests.privileged.test_privileged" (module), or "….test_x.TestY" (class)
    classnames = {c.get("classname", "") for c in root.iter("testcase")}
    return counts, bad, classnames


def junit_nodeids(path: Path) -> set[str]:
    """pytest node ids of the test cases in a junit report (module-level tests)."""
    out = set()
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        out.add(f"{module}.py::{case.get('name')}")
    return out


def one_guest_tests() -> set[str]:
    """The one_guest tests as this checkout collects them (node ids; a parameter of one
    marked host_only too is the host's alone)."""
    p = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "pytest", "-q", "--collect-only",
                        "-p", "no:cacheprovider", "-m", "one_guest and not host_only",
                        "tests/privileged"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    ids = {ln.strip() for ln in p.stdout.splitlines() if "::" in ln}
    if p.returncode != 0 or not ids:
        pytest.fail(f"collecting the one_guest tests failed (exit {p.returncode}): "
                    + (p.stdout + p.stderr)[-1000:])
    return ids


_roots: dict[str, Path] = {}
# Held while a root, a kernel or seedsim is being prepared: those share apt's lists, the
# kernel cache and the root's mounts. Only the boots run side by side.
_preparing = threading.RLock()


def userland_root(codename: str) -> Path:
    """The set-up root of ``codename`` (prepared once per run; the debootstrap is cached)."""
    with _preparing:
        if codename not in _roots:
            out = RESULTS / f"userland-{codename}"
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            t0 = time.monotonic()
            try:
                _roots[codename] = userlandmod.prepare(codename, out / "prepare.log")
            except (userlandmod.UserlandError, kernelsmod.FetchError) as exc:
                pytest.fail(f"userland {codename}: {exc} (log: {out / 'prepare.log'})")
            info = {"codename": codename, "os_release": userlandmod.os_release(_roots[codename]),
                    "prepare_seconds": round(time.monotonic() - t0, 1)}
            (out / "userland.json").write_text(json.dumps(info, indent=2) + "\n")
            print(f"\nuserland {codename}: {info['os_release']} set up by scripts/setup-host.sh "
                  f"--test in {info['prepare_seconds']} s")
        return _roots[codename]


SPECS = kernelsmod.read_kernels()
USERLANDS = sorted({s.userland for s in SPECS} - {"host"})


@dataclass
class Job:
    """One unit of the tier: prepared one at a time (``prepare``: fetches, debootstraps,
    builds, under ``_preparing``), then run in a lane (``run(prepared, bound)``) as soon
    as one is free and the job is prepared."""

    name: str
    bound: int
    prepare: Callable[[], object]
    run: Callable[[object, int], None]


def job_order(specs: list[kernelsmod.Spec], userlands: list[str]) -> list[str]:
    """The order jobs are prepared and started in: the longest first where it can start
    at once -- the one_guest line's guest, then the other guests on this host's root (nothing to
    debootstrap), then the guests on another userland, newest kernels first (slower under
    TCG), then each userland's README commands (the shortest)."""
    def key(i_spec: tuple[int, kernelsmod.Spec]) -> tuple:
        i, spec = i_spec
        return (not spec.one_guest, spec.userland != "host", -spec.bound, -i)
    guests = [spec.name for _, spec in sorted(enumerate(specs), key=key)]
    return guests + [f"readme:{codename}" for codename in userlands]


def worst_case(bounds: list[int], lanes: int) -> int:
    """Seconds until the last of jobs (started in this order, each as soon as a lane is
    free) ends when every one runs to its bound."""
    ends = [0] * lanes
    for b in bounds:
        i = ends.index(min(ends))
        ends[i] += b
    return max(ends, default=0)


def _bound(job: Job, deadline: float) -> int:
    left = int(deadline - time.monotonic())
    if left < 120:
        pytest.fail(f"{job.name}: not started: the kernel tier's deadline of {TIER_DEADLINE} s "
                    f"(KVMTRACE_TIER_DEADLINE) leaves {max(left, 0)} s")
    return min(job.bound, left)


def _lane(job: Job, prepared: Future, deadline: float) -> None:
    """Wait for ``job``'s preparation, then run it within its bound and the deadline;
    a failure is printed as it happens (with jobs side by side pytest's summary comes
    only after the last, and a run cut short would never show it)."""
    try:
        left = deadline - time.monotonic()
        try:
            what = prepared.result(timeout=max(left, 1))
        except TimeoutError:
            pytest.fail(f"{job.name}: still being prepared when the kernel tier's deadline "
                        f"of {TIER_DEADLINE} s passed")
        job.run(what, _bound(job, deadline))
    except BaseException as exc:
        print(f"\n{job.name}: FAILED: {exc}", flush=True)
        raise


def _prepared(job: Job) -> object:
    with _preparing:
        return job.prepare()


# ---- the guests ------------------------------------------------------------------------

def prepare_kernel(spec: kernelsmod.Spec) -> tuple:
    """Steps 1-3 for one line of kernels.txt: fetch, the results directory, the userland
    root, seedsim; the kernel's modules made the root's own."""
    try:
        kernel = kernelsmod.fetch(spec)
    except kernelsmod.FetchError as exc:
        pytest.fail(f"{spec.name}: {exc}")
    run = RESULTS / kernel.name
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    (run / "kernel.json").write_text(json.dumps(kernel.describe(), indent=2) + "\n")
    root = None if spec.userland == "host" else userland_root(spec.userland)
    ko = build_seedsim(kernel, run / "seedsim", root)
    if root is not None:
        try:
            (run / "modules.txt").write_text(userlandmod.provide_kernel(root, kernel) + "\n")
        except userlandmod.UserlandError as exc:
            pytest.fail(f"{spec.name}: {exc}")
    print(f"\n{kernel.name}: {spec.suite} {spec.image_meta} resolved to {kernel.release} "
          f"({kernel.version}{', forced' if kernel.forced else ''}); userland "
          f"{spec.userland}; tests -m {spec.markers!r} {' '.join(spec.paths)}; prepared",
          flush=True)
    return kernel, run, ko, root


def run_kernel(prepared: tuple, bound: int, stop: threading.Event) -> None:
    """Steps 4-5: boot and judge; raises pytest's Failed with the reason."""
    kernel, run, ko, root = prepared
    spec = kernel.spec
    print(f"\n{kernel.name}: booting ({bound} s bound)", flush=True)
    timing = boot(kernel, run, ko, root, stop, bound)
    print(f"\n{kernel.name} ({kernel.release}): boot {timing['boot_seconds']} s, VM "
          f"{timing['vm_seconds']} s; results in {run}", flush=True)
    where = f"{kernel.name} ({kernel.release})"
    if not (run / "booted").exists():
        pytest.fail(f"{where}: the kernel did not boot or the guest script never ran "
                    f"(vng exit {timing['vng_exit']}); console tail:\n"
                    + _tail(run / "console.log"))
    if (run / "failure").exists():
        pytest.fail(f"{where}: guest could not run the tests: "
                    f"{(run / 'failure').read_text().strip()}")
    if not (run / "pytest.rc").exists():
        pytest.fail(f"{where}: the guest stopped before its tests finished (panic? OOM?); "
                    "console tail:\n" + _tail(run / "console.log"))
    rc = int((run / "pytest.rc").read_text().strip() or -1)
    if not (run / "junit.xml").exists():
        pytest.fail(f"{where}: guest pytest exited {rc} without a report (timeout 124 = "
                    f"its time budget); guest log tail:\n" + _tail(run / "guest.log"))
    counts, bad, classnames = junit_report(run / "junit.xml")
    if rc != 0 or bad or counts["tests"] == 0:
        pytest.fail(f"{where}: guest pytest exited {rc}, {counts}:\n" + "\n".join(bad)
                    + f"\n(full log: {run / 'guest.log'})")
    if spec.one_guest:
        ran = junit_nodeids(run / "junit.xml")
        missing = sorted(one_guest_tests() - ran)
        if missing:
            pytest.fail(f"{where}: the one_guest line's guest did not run {len(missing)} one_guest "
                        f"tests (they run in no other guest): {missing[:5]}")
    for module in ("tests.privileged.test_privileged", "tests.vm.guest_kprobes"):
        if not any(c == module or c.startswith(f"{module}.") for c in classnames):
            pytest.fail(f"{where}: the guest ran no test of {module} ({sorted(classnames)})")
    if not (run / "done").exists():
        pytest.fail(f"{where}: the guest script did not reach its end; guest log tail:\n"
                    + _tail(run / "guest.log"))


# ---- the README's commands on another userland -------------------------------------------

def run_readme(codename: str, root: Path, bound: int) -> None:
    """The README's Quick start on another Debian release: `make test`, then `make run`.

    In a chroot of the userland root on this machine's kernel (real /dev/kvm, real bcc of
    that release, the root's own /dev/kvm node); `make run` must answer a scrape with
    kvmtrace's metrics. Both within ``bound``.
    """
    out = RESULTS / f"userland-{codename}"
    t0 = time.monotonic()
    try:
        p = userlandmod.run_in(root, f"cd {userlandmod.SRC} && make test",
                               out / "make-test.log", timeout=max(60, bound - 120))
    except userlandmod.UserlandError as exc:
        pytest.fail(f"readme:{codename}: ran out of time: {exc}")
    test_seconds = round(time.monotonic() - t0, 1)
    summary = [ln for ln in p.stdout.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    if p.returncode != 0:
        pytest.fail(f"userland {codename}: `make test` exited {p.returncode}: "
                    f"{summary[-1:] or (p.stdout + p.stderr).strip().splitlines()[-10:]}"
                    f" (log: {out / 'make-test.log'})")
    port = free_port()
    t1 = time.monotonic()
    left = max(60, int(bound - (t1 - t0)))
    try:
        r = userlandmod.run_in(root, f"{userlandmod.SRC}/tests/vm/make_run_check.sh {port}",
                               out / "make-run.log", timeout=min(600, left))
    except userlandmod.UserlandError as exc:
        pytest.fail(f"readme:{codename}: ran out of time: {exc}")
    run_seconds = round(time.monotonic() - t1, 1)
    metrics = r.stdout.split("### /metrics", 1)[-1]
    (out / "timing.json").write_text(json.dumps(
        {"make_test_seconds": test_seconds, "make_run_seconds": run_seconds,
         "make_test_summary": summary[-1:]}, indent=2) + "\n")
    print(f"\nuserland {codename}: make test {test_seconds} s ({summary[-1:]}), make run "
          f"answered a scrape in {run_seconds} s", flush=True)
    if r.returncode != 0 or "kvmtrace_probe_attached{" not in metrics:
        pytest.fail(f"userland {codename}: `make run` did not serve kvmtrace's metrics on "
                    f":{port} and stop on SIGTERM (exit {r.returncode}): "
                    + r.stdout[-2000:] + r.stderr[-1000:])


# ---- the schedule ------------------------------------------------------------------------

def _jobs(specs: list[kernelsmod.Spec], userlands: list[str],
          stop: threading.Event) -> dict[str, Job]:
    jobs = {}
    for spec in specs:
        jobs[spec.name] = Job(
            spec.name, VM_TIMEOUT or spec.bound,
            lambda spec=spec: prepare_kernel(spec),
            lambda prepared, bound: run_kernel(prepared, bound, stop))
    for codename in userlands:
        jobs[f"readme:{codename}"] = Job(
            f"readme:{codename}", README_BOUND,
            lambda codename=codename: userland_root(codename),
            lambda root, bound, codename=codename: run_readme(codename, root, bound))
    return jobs


@pytest.fixture(scope="module")
def tier(request):
    """Every selected job, prepared one after another by one thread and run side by side
    in lanes, one per CPU (KVMTRACE_VM_PARALLEL), in :func:`job_order`. A Debian 13 root's
    README job runs only once every preparation is done: its chroot holds the root's
    mounts, which a seedsim build in that root would otherwise share."""
    items = request.session.items
    specs = [i.callspec.params["spec"] for i in items
             if getattr(i, "originalname", None) == "test_kernel"]
    userlands = [i.callspec.params["codename"] for i in items
                 if getattr(i, "originalname", None) == "test_readme_commands"]
    stop = threading.Event()
    jobs = _jobs(specs, userlands, stop)
    order = [n for n in job_order(specs, userlands) if n in jobs]
    lanes = parallel_guests(len(order))
    deadline = time.monotonic() + TIER_DEADLINE
    print(f"\nkernel tier: {len(order)} jobs ({', '.join(order)}), {lanes} at a time (CPUs "
          f"{len(os.sched_getaffinity(0))}, -m {GUEST_MEMORY} each, MemAvailable "
          f"{_mem_available() >> 30} GiB); bounds {[jobs[n].bound for n in order]} s, "
          f"worst case {worst_case([jobs[n].bound for n in order], lanes)} s, deadline "
          f"{TIER_DEADLINE} s", flush=True)
    # SIGTERM (make killed, CI's time limit) as ^C: pytest then tears this fixture down and
    # the VMs, in sessions of their own, are killed instead of running on unattended.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
    pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="lane")
    prepared = {n: preparer.submit(_prepared, jobs[n]) for n in order}
    runs = {n: pool.submit(_lane, jobs[n], prepared[n], deadline) for n in order}
    try:
        yield runs
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        preparer.shutdown(wait=True, cancel_futures=True)
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("codename", USERLANDS)
def test_readme_commands(codename: str, tier: dict[str, Future]):
    tier[f"readme:{codename}"].result()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_kernel(spec: kernelsmod.Spec, tier: dict[str, Future]):
    tier[spec.name].result()
