"""Loader: compile bpf/kvmtrace.bpf.c with bcc and attach what the plan says.

The names it compiles and attaches with are the contract's: the #defines from
kvmtrace.contract, the programs and FN_* lines from kvmtrace.programs.

The returned :class:`Session` is the event and count *source* every view
reads from; it hands out raw tuples and bytes, which kvmtrace.decode turns
into typed records.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

from kvmtrace import contract, kvmabi, programs, tables
from kvmtrace import plan as planmod
from kvmtrace.plan import Attachment


class LoadError(Exception):
    """The BPF program could not be compiled or loaded; one line for the user."""


@dataclass(frozen=True)
class Options:
    self_tgid: int = 0  # calls from this process are not counted
    filter_tgid: int = 0  # only emit events of this process (0: all)
    counts_max: int = 10240
    # A process's share of the counts map: past it, its new keys fold into one
    # overflow key per (probe, VM type bucket, result) under comm "other".
    counts_per_process: int = contract.COUNTS_PER_PROC
    calls_max: int = 10240
    ringbuf_pages: int = 64
    use_ringbuf: bool = True
    use_task_storage: bool = True
    # Live-stream budget: events per CPU per window; the rest are counted as
    # throttled (kvmtrace_events_throttled_total). Counts are never affected.
    event_budget: int = 1000
    event_window_ns: int = 1_000_000_000


def bpf_source() -> str:
    # kvmtrace/bpf links to the repository's bpf/ (and is copied into wheels).
    return resources.files("kvmtrace").joinpath("bpf/kvmtrace.bpf.c").read_text()


def build_text(plan: planmod.Plan, opts: Options) -> str:
    """The exact BPF C that is compiled for ``plan`` (what --ebpf prints)."""
    defines = {
        "KVM_CREATE_VM": hex(kvmabi.KVM_CREATE_VM),
        "KVM_CHECK_EXTENSION": hex(kvmabi.KVM_CHECK_EXTENSION),
        "KVM_CAP_VM_TYPES": str(kvmabi.KVM_CAP_VM_TYPES),
        "KVM_MEMORY_ENCRYPT_OP": hex(kvmabi.KVM_MEMORY_ENCRYPT_OP),
        "KVM_RUN": hex(kvmabi.KVM_RUN),
        "KVM_GET_API_VERSION": hex(kvmabi.KVM_GET_API_VERSION),
        "KVMIO": hex(kvmabi.KVMIO),
        "ENDING_EXITS": f"{sum(1 << r for r in kvmabi.ENDING_EXITS):#x}ULL",
        "TDX_VM_TYPE": str(tables.vm_type_number("TDX")),
        **contract.defines(opts.counts_max, opts.calls_max, opts.ringbuf_pages,
                           opts.counts_per_process),
        "SELF_TGID": str(opts.self_tgid),
        "FILTER_TGID": str(opts.filter_tgid),
        "EVENT_BUDGET": str(opts.event_budget),
        "EVENT_WINDOW_NS": f"{opts.event_window_ns}ULL",
    }
    ioctl = plan.ioctl_mechanism
    if ioctl is not None:
        defines[contract.IOCTL_DEFINES[ioctl]] = "1"
    points = plan.by_id()
    launch = [p.id for p in plan.points
              if p.layer == planmod.Layer.LAUNCH and p.id >= contract.FIRST_TYPE_CHECK]
    defines["FIRST_LAUNCH"] = str(min(launch, default=contract.FIRST_TYPE_CHECK + len(plan.points)))
    if points[contract.PROBE_PROCESS_END].planned:
        defines[contract.FOLLOW_PROCS] = "1"
        status = points[contract.PROBE_EXIT_STATUS].mechanism
        if status is not None:
            defines[contract.EXIT_DEFINES[status]] = "1"
        if points[contract.PROBE_SIGNAL].planned:
            defines[contract.SIGNAL_DEFINE] = "1"
        if points[contract.PROBE_ENCRYPT_OP].mechanism == planmod.Mechanism.KPROBE:
            defines[contract.FD_IOCTL_KPROBE] = "1"
        if points[contract.PROBE_KVM_CALL].planned:
            defines[contract.KVM_CALLS] = "1"
        if points[contract.PROBE_KVM_RUN].planned:
            defines[contract.RUN_TRACEPOINT] = "1"
        if points[contract.PROBE_VMM_STDERR].planned:
            defines[contract.STDERR_CAPTURE] = "1"
            defines.update({contract.OFFSET_PREFIX + k: str(v) for k, v in plan.offsets})
    exec_point = points[contract.PROBE_EXEC]
    if exec_point.mechanism is not None:
        defines[contract.EXEC_DEFINES[exec_point.mechanism]] = "1"
        if "execveat" in (exec_point.target or ""):
            defines[contract.EXECVEAT_DEFINE] = "1"
    if opts.use_ringbuf:
        defines[contract.USE_RINGBUF] = "1"
    if opts.use_task_storage:
        defines[contract.USE_TASK_STORAGE] = "1"
    head = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    # The function points' programs: one FN_* line each (kvmtrace.programs); the ioctl
    # and process points' programs are in the C already.
    lines = [line for line in map(programs.fn_line, plan.points) if line]
    return head + bpf_source() + "".join(f"{ln}\n" for ln in lines)


def preflight(facts, plan: planmod.Plan) -> str | None:
    """What keeps bcc from compiling or attaching anything here (one line), or None."""
    if facts.bcc_version is None:
        return ("bcc is not importable: install python3-bpfcc and use the project's "
                ".venv (make setup)")
    if facts.headers.path is None:
        return (f"no kernel headers for {facts.kernel_release} "
                f"({facts.headers.error}): run 'make setup' or set BCC_KERNEL_SOURCE")
    if not any(p.planned for p in plan.points):
        return ("no probe point can attach here: "
                + "; ".join(f"{p.name}: {p.reason}" for p in plan.points[:3]))
    return None


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Route fd 2 (bcc and libbpf print there) into a list of lines."""
    out: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.extend(tmp.read().decode(errors="replace").splitlines())


def _first_line(exc: BaseException, stderr: list[str]) -> str:
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else type(exc).__name__
    errors = [ln for ln in stderr if "error" in ln.lower() or "denied" in ln.lower()
              or "not permitted" in ln.lower()]
    if errors:
        text += f" ({errors[0].strip()})"
    return text


@dataclass
class Session:
    """A program bcc compiled and attached in this process. Its maps are read through
    kvmtrace.reader.Reader (over the fds of map_fds(), in this process or in the one
    the loader child hands them to)."""

    bpf: object
    plan: planmod.Plan
    attachments: list[Attachment]
    ringbuf: bool
    opts: Options

    def map_fds(self) -> dict[str, int]:
        """The fd of every map the reader reads (kvmtrace.contract.READ_MAPS; an
        optional one when the program has it)."""
        out = {}
        for name in contract.READ_MAPS:
            try:
                out[name] = self.bpf[name.encode()].map_fd
            except KeyError:
                if name not in contract.OPTIONAL_MAPS:
                    raise
        return out

    def close(self) -> None:
        self.bpf.cleanup()


def load(plan: planmod.Plan, opts: Options) -> Session:
    """Compile and attach ``plan``. Points that fail to attach are reported, not fatal."""
    try:
        from bcc import BPF
    except ImportError as exc:
        raise LoadError(
            "bcc is not importable (install python3-bpfcc and run with a python that "
            "sees Debian's dist-packages)") from exc
    text = build_text(plan, opts)
    with _stderr_captured() as err:
        try:
            bpf = BPF(text=text.encode())
        except Exception as exc:  # bcc raises bare Exception
            raise LoadError(f"loading the BPF program failed: {_first_line(exc, err)}") from exc
    attachments = []
    # Points with the same mechanism and targets share one attachment: the two ioctl
    # points; the ioctl tracepoints' followers; KVM_MEMORY_ENCRYPT_OP's kprobes and
    # the failed KVM ioctls'.
    done: dict[tuple[str, str], str | None] = {}
    for p in plan.points:
        if p.mechanism is None:
            attachments.append(Attachment(p, False))
            continue
        key = (p.mechanism, p.target)
        if key not in done:
            with _stderr_captured() as err:
                try:
                    _attach(bpf, p)
                    done[key] = None
                except Exception as exc:
                    done[key] = f"{p.mechanism} attach failed: {_first_line(exc, err)}"
        attachments.append(Attachment(p, done[key] is None, done[key]))
    return Session(bpf, plan, attachments, opts.use_ringbuf, opts)


def _attach(bpf, p: planmod.Point) -> None:
    """Attach one point's programs (kvmtrace.programs: the kprobes and kretprobes on each
    of its targets; tracepoint and fentry ones were attached by bcc at load: checked)."""
    if p.mechanism == planmod.Mechanism.TRACEPOINT:
        missing = [tp for tp in p.target.split("+")
                   if tp.encode() not in getattr(bpf, "tracepoint_fds", {})]
        if missing:
            raise LoadError(f"tracepoint {missing[0]} did not attach")
        return
    progs = programs.of(p)
    for target in p.target.split("+"):
        for prog in progs:
            if prog.attach == programs.LOAD or not target.endswith(prog.only):
                continue
            attach = bpf.attach_kretprobe if prog.attach == programs.RETURN \
                else bpf.attach_kprobe
            attach(event=target.encode(), fn_name=prog.symbol(p.id, target).encode())
