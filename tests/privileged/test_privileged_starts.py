"""Privileged tier for VM starts: a real QEMU >= 9 (tests/qemu.py installs it), the real
kernel, the real /dev/kvm. Never skips: see tests/privileged/conftest.py.

Every process here runs under a comm of its own (QEMU through a symlink named for the
test: the kernel takes a task's comm from the file it executes, while QEMU still gets
"qemu-system-x86_64" as argv[0]), and only those processes' records are looked at, so
other VMs starting on a busy host cannot change the outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmtrace import causes, kvmabi, kvmdev, tables
from tests.privileged.conftest import VMMAKER, samples

pytestmark = pytest.mark.privileged

QEMU = shutil.which("qemu-system-x86_64")
BASE = ["qemu-system-x86_64", "-accel", "kvm", "-display", "none", "-nodefaults"]
CGS = ["-machine", "q35,confidential-guest-support=cgs0"]
OBJ = "id=cgs0,cbitpos=51,reduced-phys-bits=1"
INIT2 = 22  # KVM_SEV_INIT2


def qemu_major() -> int:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True,
                         timeout=60).stdout
    return int(out.split("version ", 1)[1].split(".", 1)[0])


def run_as(link: Path, argv: list[str], **kw) -> subprocess.Popen:
    """QEMU with ``link``'s name as its comm and ``argv`` as its argv."""
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(argv, executable=str(link), stdout=subprocess.PIPE, text=True,
                            **kw)


@pytest.fixture(scope="module")
def started(tmp_path_factory, shared):
    """Three QEMUs and a driver under the session's exporter, `trace --json` and
    `explain --json`; what each showed of this module's processes (by pid and comm)."""
    if QEMU is None or qemu_major() < 9:
        pytest.fail("needs qemu-system-x86_64 >= 9 (python3 tests/qemu.py install; "
                    "make setup-test does it)")
    tag = f"ks{os.getpid() % 10000}{os.urandom(1).hex()}"
    d = tmp_path_factory.mktemp("qemu")
    links = {}
    for kind in ("snp", "sev", "run"):
        links[kind] = d / f"{tag}-{kind}"
        links[kind].symlink_to(QEMU)
    serve, trace, explain = shared.serve, shared.trace, shared.explain
    plan = json.loads(serve.get("/api/plan"))
    out: dict = {"tag": tag, "plan": {r["probe"]: r for r in plan}}

    snp = run_as(links["snp"], [*BASE, *CGS, "-object", f"sev-snp-guest,{OBJ}",
                                "-name", f"guest={tag}-vm-snp,debug-threads=on"])
    out["snp"] = (snp.pid, snp.wait(timeout=120), snp.communicate()[1])
    # Its stderr into a log file, as libvirt gives QEMU its domain log.
    sev_log = d / f"{tag}-vm-sev.log"
    with open(sev_log, "w") as log:
        sev = run_as(links["sev"], [*BASE, *CGS, "-object", f"sev-guest,{OBJ}",
                                    "-name", f"{tag}-vm-sev"], stderr=log)
        out["sev"] = (sev.pid, sev.wait(timeout=120), sev_log.read_text())
    out["sev_log"] = str(sev_log)
    # A plain QEMU, stopped by the operator once it has made its VM.
    plain = run_as(links["run"], [*BASE, "-M", "none", "-S", "-name", f"{tag}-vm-run"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            p["pid"] == plain.pid and p["vm_create_attempts"]
            for p in json.loads(serve.get("/api/processes"))):
        time.sleep(0.2)
    plain.send_signal(signal.SIGTERM)
    out["run"] = (plain.pid, plain.wait(timeout=60), plain.communicate()[1])
    # A driver's KVM_MEMORY_ENCRYPT_OP(SEV INIT2) on a DEFAULT VM.
    drv = subprocess.run([*VMMAKER, "--name", f"{tag}-enc", "--types", "0", "--sev-cmd",
                          str(INIT2)], capture_output=True, text=True, timeout=60)
    assert drv.returncode == 0, drv.stderr
    out["enc"] = [json.loads(ln) for ln in drv.stdout.splitlines()]
    out["enc_comm"] = f"{tag}-enc"

    # Every followed process's end is a start record in trace (explain: failed ones).
    pids = {out[k][0] for k in ("snp", "sev", "run")}
    trace.wait(lambda r: r.get("kind") == "start" and r["pid"] in pids, len(pids))
    trace.wait(lambda r: r.get("kind") == "start" and r["comm"] == out["enc_comm"])
    time.sleep(3.0)  # retirement passes (--retire-interval 0.5) and polls settle
    out["rejections"] = json.loads(serve.get("/api/rejections"))
    out["metrics"] = serve.metrics()
    ours = {*pids, *(r["pid"] for r in trace.records() if r.get("comm") == out["enc_comm"])}
    out["trace"] = [r for r in trace.records() if r.get("pid") in ours]
    out["explain"] = [r for r in explain.records() if r.get("pid") in ours]
    out["live_view"] = serve.out.text()
    yield out


def _off_at_bringup(requested: str) -> str | None:
    """Whether this host's vendor module parameters, read here, switch ``requested`` off
    (kvmtrace.causes' rule over what the test reads itself)."""
    params = {}
    for module, names in (("kvm_amd", ("sev", "sev_es", "sev_snp")), ("kvm_intel", ("tdx",))):
        for name in names:
            p = Path(f"/sys/module/{module}/parameters/{name}")
            if p.exists():
                params[f"{module}.{name}"] = p.read_text()
    return causes.disabled_at_bringup(requested, params)


def _starts(records: list[dict], pid: int) -> list[dict]:
    return [r for r in records if r.get("kind") == "start" and r["pid"] == pid]


# A VM start's later steps, each made to fail for real on this host's /dev/kvm by the
# driver (tests/vmmaker.py --step; measured here: a DEFAULT VM has no guest_memfd and no
# memory attributes, ENOTTY; slot 0xffff is past every VM's slots, EINVAL; a vCPU with no
# memory cannot run, ENOSPC), and a real-mode guest whose first KVM_RUN comes back with
# an I/O exit: it ran. Unknown SEV command 9999: ENOTTY, the kernel does not take it.
# (Short names: a comm is 15 bytes.)
STEPS = {
    # ENOTTY where the kernel has no guest_memfd for a DEFAULT VM (this host); EINVAL
    # for the bad flags where it has (Debian's 6.12 and 7.x, measured in the guests).
    "memfd": (["--step", "memfd"], "during_launch", "setup_failed", "memory_setup",
              ("calls", "KVM_CREATE_GUEST_MEMFD", ("ENOTTY", "EINVAL"))),
    # EINVAL; ENOTTY on a kernel without KVM_SET_USER_MEMORY_REGION2 (before 6.8: 6.1).
    "reg2": (["--step", "region2"], "during_launch", "setup_failed", "memory_setup",
                ("calls", "KVM_SET_USER_MEMORY_REGION2", ("EINVAL", "ENOTTY"))),
    "attr": (["--step", "attributes"], "during_launch", "setup_failed", "memory_setup",
                   ("calls", "KVM_SET_MEMORY_ATTRIBUTES", ("ENOTTY", "EINVAL"))),
    "run": (["--step", "run-nomem"], "at_first_run", "first_run_failed", "first_run_failed",
            ("run", "UNKNOWN", "ENOSPC")),
    "abi": (["--sev-cmd", "9999"], "during_launch", "launch_failed", "abi_skew",
            ("launch", "unknown:9999", "ENOTTY")),
}


@pytest.fixture(scope="module")
def stepped(shared):
    """Each of STEPS (exit 1, as a VMM gives up) and a start that ran (then exit 1: still
    no failed start), under the session's exporter, trace and explain."""
    tag = f"kt{os.getpid() % 10000}{os.urandom(1).hex()}"
    trace, explain, serve = shared.trace, shared.explain, shared.serve
    out: dict = {"tag": tag}
    for name, (args, *_) in {**STEPS, "ran": (["--step", "run-io"],)}.items():
        drv = subprocess.run([*VMMAKER, "--name", f"{tag}-{name}", "--types", "0", *args,
                              "--exit", "1"], capture_output=True, text=True, timeout=60)
        assert drv.returncode == 1, drv.stderr
        out[name] = [json.loads(ln) for ln in drv.stdout.splitlines()]
    comms = {f"{tag}-{name}" for name in (*STEPS, "ran")}
    trace.wait(lambda r: r.get("kind") == "start" and r["comm"] in comms, len(comms))
    explain.wait(lambda r: r.get("kind") == "start" and r["comm"] in comms, len(STEPS))
    time.sleep(1.0)  # a retirement pass more (--retire-interval 0.5)
    out["trace"] = [r for r in trace.records() if r.get("comm") in comms]
    out["explain"] = [r for r in explain.records() if r.get("comm") in comms]
    out["rejections"] = [r for r in json.loads(serve.get("/api/rejections"))
                         if r.get("comm") in comms]
    out["metrics"] = serve.metrics()
    out["live_view"] = serve.out.text()
    return out


@pytest.mark.parametrize("name", list(STEPS))
def test_each_failing_step_of_a_start_is_reported_with_command_errno_and_cause(stepped, name):
    _, stage, reason, cause, (where, command, errno) = STEPS[name]
    comm = f"{stepped['tag']}-{name}"
    (step,) = [r for r in stepped[name] if "step" in r or "sev_cmd" in r]
    if name == "run" and step["ret"] == 0:
        # The kernel ran it: under the kernel tier's emulation a vCPU with no memory exits
        # to userspace (its accesses are MMIO) instead of failing. Then what kvmtrace says
        # is what that exit means: a start that ended there, or one that ran.
        if step["exit_reason"] not in kvmabi.ENDING_EXITS:
            (s,) = [r for r in stepped["trace"] if r.get("kind") == "start"
                    and r["comm"] == comm]
            assert s["outcome"] == "ran", (step, s)
            assert not [r for r in stepped["rejections"] if r["comm"] == comm]
            return
        errno = None
    seen = tables.errno_name(step["errno"]) if errno is not None else None
    if errno is not None:
        assert step["ret"] == -1 and seen in ((errno,) if isinstance(errno, str) else errno), \
            step
        errno = seen  # what the driver met is what kvmtrace must report
    for source in ("rejections", "explain"):
        (s,) = [r for r in stepped[source] if r.get("kind") == "start" and r["comm"] == comm]
        assert (s["outcome"], s["stage"], s["reason"], s["cause"]) == (
            "failed", stage, reason, cause), (source, s)
        assert s["cause_evidence"] and s["cause_hint"]
        if where == "calls":
            assert [(c["command"], c["errno"], c["vm_type_name"]) for c in s["calls"]] == [
                (command, errno, "DEFAULT")], s
        elif where == "run":
            assert (s["run"]["errno"], s["run"]["vm_type_name"]) == (errno, "DEFAULT"), s
            if step["ret"] == 0:  # ended by its exit reason
                assert s["run"]["exit_reason"] == kvmabi.exit_reason_name(step["exit_reason"])
        else:
            assert [(op["command"], op["errno"]) for op in s["launch"]] == [
                (command, errno)], s
    got = samples(stepped["metrics"], "kvmtrace_vm_start_failures_total")
    assert {k: v for k, v in got.items() if ("comm", comm) in k} == {frozenset({
        ("comm", comm), ("stage", stage), ("reason", reason), ("cause", cause),
        ("requested_type", "not_known")}): 1.0}
    # trace --json shows the failing call (or run) itself, named.
    evs = [e for e in stepped["trace"] if e.get("kind") == "event" and e["comm"] == comm
           and e["probe"] in ("failed KVM ioctl", "first KVM_RUN")]
    if where == "calls":
        assert [(e["command"], e["errno"]) for e in evs] == [(command, errno)], evs
    elif where == "run":
        assert [(e["probe"], e["errno"]) for e in evs] == [("first KVM_RUN", errno)], evs
    assert f"cause {cause}" in stepped["live_view"]


def test_a_start_whose_vcpu_ran_is_no_failure_and_later_calls_cost_nothing(stepped):
    comm = f"{stepped['tag']}-ran"
    (run,) = [r for r in stepped["ran"] if r.get("step") == "run-io"]
    assert (run["ret"], run["exit_reason"]) == (0, 2)  # KVM_EXIT_IO: it ran
    (s,) = [r for r in stepped["trace"] if r.get("kind") == "start" and r["comm"] == comm]
    assert (s["outcome"], s["stage"], s["cause"]) == ("ran", None, None), s
    assert s["exit"] == {"how": "exited", "status": 1}
    assert not [r for r in stepped["rejections"] if r["comm"] == comm]
    assert not [e for e in stepped["trace"] if e.get("comm") == comm
                and e.get("probe") in ("failed KVM ioctl", "first KVM_RUN")]


def test_qemu_refusing_snp_before_create_is_a_rejected_start(started):
    pid, rc, stderr = started["snp"]
    assert rc == 1 and "not supported by KVM" in stderr, stderr
    mask = kvmdev.query().vm_types_mask
    # QEMU exits within a millisecond of its query: what it asked for is known from the
    # argv kept at execve where that point is planned (syscall-tracepoint hosts); on
    # kprobe hosts it is not (the plan says why), and the start says "not known".
    kept = started["plan"]["command line at exec"]["attached"] == "yes"
    (first,) = _starts(started["rejections"], pid)
    wanted = "SNP" if kept or first["requested_type"] == "SNP" else "not_known"
    for where in ("rejections", "explain"):
        (s,) = _starts(started[where], pid)
        assert (s["stage"], s["reason"], s["requested_type"]) == \
            ("before_create", "vmm_refused_type", wanted), (where, s)
        # Where kvm_amd is loaded with SEV off (the kernel tier's guests), the bring-up
        # says why the type is not offered: the more precise cause.
        cause = "feature_disabled_at_bringup" if _off_at_bringup(wanted) else "type_not_offered"
        assert s["cause"] == cause and s["cause_hint"], s
        assert s["mask"] == mask and s["exit"] == {"how": "exited", "status": 1}
        assert s["creates"] == [] and "SNP" not in s["offered"] and s["hint"]
        if wanted == "SNP":  # its argv kept at execve (or /proc read while it lived)
            assert (s["vm_name"], s["vmm"]) == (f"{started['tag']}-vm-snp", "qemu"), s
        else:  # gone before /proc could be read, and nothing kept: said so
            assert s["vm_name"] is None and "no command line" in s["request_evidence"]
    got = samples(started["metrics"], "kvmtrace_vm_start_failures_total")
    comm = f"{started['tag']}-snp"
    mine = {k: v for k, v in got.items() if ("comm", comm) in k}
    want = frozenset({("comm", comm), ("stage", "before_create"),
                      ("reason", "vmm_refused_type"), ("cause", cause),
                      ("requested_type", wanted)})
    assert mine == {want: 1.0}, mine
    assert f"VM start failed before_create: pid {pid} " in started["live_view"]


def test_qemu_failing_sev_after_a_default_create_is_a_failed_launch(started):
    pid, rc, stderr = started["sev"]
    assert rc == 1, stderr
    kept = started["plan"]["command line at exec"]["attached"] == "yes"
    for where in ("rejections", "explain"):
        (s,) = _starts(started[where], pid)
        assert s["stage"] == "during_launch", s
        # Without argv kept at execve, /proc is read only if a retirement pass saw it live.
        assert s["requested_type"] in (("SEV",) if kept else ("SEV", "not_known")), s
        # Here QEMU gives up before any KVM_MEMORY_ENCRYPT_OP (cbitpos check); a host
        # with kvm_amd may see SEV INIT fail instead: both are a failed launch.
        assert s["reason"] in ("exited_after_create", "launch_failed"), s
        assert s["exit"] == {"how": "exited", "status": 1}
        assert [c["vm_type_name"] for c in s["creates"]] == ["DEFAULT"]
        assert s["creates"][0]["result"] == "ok"
        # No kernel call failed (QEMU's own cbitpos check gave up): the VMM's config;
        # a host with kvm_amd may fail SEV INIT instead (then the launch decides).
        assert s["cause"] in (("vmm_config",) if s["reason"] == "exited_after_create"
                              else ("firmware_error", "abi_skew", "feature_disabled_at_bringup",
                                    "kvm_rejected_arguments", "capacity")), s
        # QEMU's own words, read back from its log file: the error line it printed.
        said = [ln for ln in stderr.splitlines() if "kvm" in ln.lower()]
        assert said and said[-1] in (s["vmm_words"] or ""), (s["vmm_words_note"], stderr)
        assert s["vmm_words_note"] == f"stderr: {started['sev_log']}", s
        if s["cause"] == "vmm_config":
            assert f"it said: {said[-1]}" in s["cause_evidence"], s


def test_a_plain_qemu_stopped_with_sigterm_is_no_failure(started):
    pid, rc, stderr = started["run"]
    # QEMU's SIGTERM handler exits 0; a QEMU still setting up (slow under emulation)
    # dies of SIGTERM's default action. Either is the operator's stop.
    assert rc in (0, -signal.SIGTERM), stderr
    assert not _starts(started["rejections"], pid)
    assert not _starts(started["explain"], pid)
    (s,) = _starts(started["trace"], pid)  # trace shows every followed end
    assert (s["outcome"], s["stage"]) == ("clean_exit" if rc == 0 else "stopped", None), s
    ends = [e for e in started["trace"] if e.get("kind") == "event" and e["pid"] == pid
            and e["probe"] == "process exit"]
    assert len(ends) == 1, ends
    exit_ = {k: v for k, v in ends[0]["exit"].items() if k != "basis"}
    # A fatal signal's group exit reaches the threads as SIGKILL (and do_group_exit's
    # argument is then 9): kvmtrace reports what the kernel showed it.
    assert exit_ in ([{"how": "exited", "status": 0}] if rc == 0 else [
        {"how": "killed", "signal": "SIGTERM"}, {"how": "killed", "signal": "SIGKILL"}]), ends[0]
    got = samples(started["metrics"], "kvmtrace_vm_start_failures_total")
    assert not [k for k in got if ("comm", f"{started['tag']}-run") in k]


def test_the_encrypt_op_is_traced_with_its_command_and_errno(started):
    (op,) = [r for r in started["enc"] if "sev_cmd" in r]
    (create,) = [r for r in started["enc"] if "vm_type" in r]
    assert op["ret"] == -1 and op["errno"]  # ENOTTY on a host without SEV
    comm = started["enc_comm"]
    evs = [e for e in started["trace"] if e.get("kind") == "event" and e["comm"] == comm
           and e["probe"] == "KVM_MEMORY_ENCRYPT_OP"]
    assert len(evs) == 1, evs
    ev = evs[0]
    assert (ev["family"], ev["command"]) == ("SEV", "INIT2")
    assert ev["errno"] == tables.errno_name(op["errno"]) and ev["result"] == -op["errno"]
    assert ev["vm_type"] == 0 and ev["fd"] in (create["ret"], -1)  # -1: kprobe hosts
    assert ev["status"] == op["error"]
    got = samples(started["metrics"], "kvmtrace_encrypt_ops_total")
    mine = {k: v for k, v in got.items() if ("comm", comm) in k}
    assert len(mine) == 1 and list(mine.values()) == [1.0], mine
    labels = dict(next(iter(mine)))
    assert (labels["command"], labels["errno"], labels["vm_type_name"]) == \
        ("INIT2", tables.errno_name(op["errno"]), "DEFAULT")
    # Where kprobes exist, sev_mem_enc_ioctl (kvm_amd) gives its own verdict.
    plan = started["plan"]["sev_mem_enc_ioctl"]
    checks = samples(started["metrics"], "kvmtrace_vm_type_check_rejected_total")
    seen = {k: v for k, v in checks.items()
            if ("probe", "sev_mem_enc_ioctl") in k and ("comm", comm) in k}
    assert list(seen.values()) == ([1.0] if plan["attached"] == "yes" else []), (plan, seen)
    verdicts = [e["result"] for e in started["trace"] if e.get("kind") == "event"
                and e["comm"] == comm and e["probe"] == "sev_mem_enc_ioctl"]
    assert verdicts == ([-op["errno"]] if plan["attached"] == "yes" else []), verdicts
    # The driver exited 0 after the failed op: a clean exit, not a failed start.
    pid = next(e["pid"] for e in evs)
    assert not _starts(started["rejections"], pid)



@pytest.fixture(scope="module")
def told(shared, tmp_path_factory):
    """Two failed starts that say why on their stderr -- one into a file, one into a
    pipe -- and log a kvm line and another subsystem's line in their windows."""
    tag = f"kw{os.getpid() % 10000}{os.urandom(1).hex()}"
    log = tmp_path_factory.mktemp("words") / "vmm.log"

    def common(run: str) -> list[str]:
        return ["--name", f"{tag}-{run}", "--types", "0", "--step", "memfd", "--exit", "1",
                "--kmsg", f"kvm: kvmtrace test {tag}-{run}: guest_memfd refused",
                "--kmsg", f"usb 1-1: kvmtrace test {tag}-{run}: not the kvm subsystem",
                "--say", f"{tag}: giving up: guest_memfd refused"]

    with open(log, "w") as f:
        subprocess.run([*VMMAKER, *common("f")], stdout=subprocess.DEVNULL, stderr=f,
                       timeout=60, check=False)
    subprocess.run([*VMMAKER, *common("p")], capture_output=True, timeout=60, check=False)
    comms = {f"{tag}-f", f"{tag}-p"}
    got = shared.explain.wait(lambda r: r.get("kind") == "start" and r["comm"] in comms, 2)
    return {"tag": tag, "log": str(log), **{r["comm"].rsplit("-", 1)[1]: r for r in got}}


def test_the_vmms_own_words_come_back_from_its_stderr_file(told):
    s = told["f"]
    said = f"{told['tag']}: giving up: guest_memfd refused"
    assert (s["vmm_words"] or "").rstrip().endswith(said), s["vmm_words_note"]
    assert s["vmm_words_note"] == f"stderr: {told['log']}"


def test_words_written_to_a_pipe_cannot_be_had_and_the_start_says_so(told):
    s = told["p"]
    assert s["vmm_words"] is None
    assert s["vmm_words_note"].startswith("stderr: a pipe (pipe:["), s["vmm_words_note"]
    assert s["vmm_words_note"].endswith("), not captured")


def test_the_kernels_kvm_lines_of_a_starts_window_are_attached_and_only_those(told):
    """Its own kvm line (written between its first KVM call and its end) is attached;
    the other subsystem's line of the same moment is not. (The log is the host's: a
    start's window may also hold other processes' kvm lines of that moment.)"""
    for run in ("f", "p"):
        s = told[run]
        texts = [ln.split("] ", 1)[1] for ln in s["kernel_log"]]
        assert f"kvm: kvmtrace test {told['tag']}-{run}: guest_memfd refused" in texts, texts
        assert not [t for t in texts if "not the kvm subsystem" in t], texts
        assert s["kernel_log_note"] is None


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
