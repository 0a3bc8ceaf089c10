"""The probe plan: a pure function of the host facts.

For every probe point of KVM's VM-type dispatch it says which mechanism will
be used (kprobe, fentry, tracepoint) or, by name, why none can be. Nothing
here touches the machine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from kvmtrace.contract import (
    FIRST_TYPE_CHECK,
    PROBE_ARCH_INIT_VM,
    PROBE_CREATE_VM,
    PROBE_ENCRYPT_OP,
    PROBE_EXEC,
    PROBE_EXIT_STATUS,
    PROBE_KVM_CALL,
    PROBE_KVM_OPEN,
    PROBE_KVM_RUN,
    PROBE_PROCESS_END,
    PROBE_SIGNAL,
    PROBE_VM_TYPES_QUERY,
    PROBE_VMM_STDERR,
)
from kvmtrace.facts import (
    ARCH_INIT_FUNCTION,
    EXEC_FUNCTIONS,
    EXEC_TRACEPOINTS,
    EXIT_GROUP_TRACEPOINT,
    EXIT_TRACEPOINT,
    GROUP_EXIT_FUNCTION,
    IOCTL_FUNCTION,
    IOCTL_TRACEPOINTS,
    LAUNCH_FUNCTIONS,
    RUN_TRACEPOINT,
    SIGNAL_TRACEPOINT,
    TYPE_CHECK_FUNCTIONS,
    TYPE_CHECK_PATTERN,
    VCPU_IOCTL_FUNCTION,
    VM_IOCTL_FUNCTIONS,
    HostFacts,
)

# Point names: the "probe" label of every metric.
CREATE_VM = "KVM_CREATE_VM"
VM_TYPES_QUERY = "KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)"
ENCRYPT_OP = "KVM_MEMORY_ENCRYPT_OP"
PROCESS_END = "process exit"  # a followed process's end (its leader's exit)
EXIT_STATUS = "exit status"  # its exit_group status
SIGNAL = "fatal signal"  # the signal that killed it
EXEC = "command line at exec"  # its argv, captured at execve
KVM_CALL = "failed KVM ioctl"  # a KVM ioctl of a start that failed
KVM_RUN = "first KVM_RUN"  # a start's first KVM_RUN that failed or ended it
KVM_OPEN = "KVM_GET_API_VERSION"  # a VMM opening KVM (its first call, before any VM)
VMM_STDERR = "VMM stderr (fd 2)"  # where a followed process's stderr is, read in the kernel


class Mechanism(StrEnum):
    """How a point is attached (the ``mechanism`` label of kvmtrace_probe_attached)."""

    KPROBE = "kprobe"
    FENTRY = "fentry"
    TRACEPOINT = "tracepoint"
    NONE = "none"  # not attached


class Layer(StrEnum):
    """Where in KVM's call chain a point sits, outermost first."""

    IOCTL = "ioctl"  # KVM_CREATE_VM / KVM_CHECK_EXTENSION at the ioctl layer
    ARCH_INIT = "arch_init"  # kvm_arch_init_vm
    TYPE_CHECK = "type_check"  # *_is_vm_type_supported
    LAUNCH = "launch"  # KVM_MEMORY_ENCRYPT_OP and the confidential launch's functions
    START = "start"  # a start's other KVM ioctls (memory, vCPUs) and its first KVM_RUN
    PROCESS = "process"  # a followed process: its command line and its end

    @property
    def depth(self) -> int:
        """Nesting depth in the call chain (0: the ioctl)."""
        return list(Layer).index(self)


def layer_depth(layer: str) -> int:
    """Depth of a layer name; an unknown one sorts after every known layer."""
    try:
        return Layer(layer).depth
    except ValueError:
        return len(Layer)


# What a point's return value means (decode uses it).
RETURNS_FD = "fd"  # KVM_CREATE_VM: a VM fd or -errno
RETURNS_MASK = "mask"  # KVM_CAP_VM_TYPES bitmap or -errno
RETURNS_INT = "int"  # 0 or -errno
RETURNS_BOOL = "bool"  # true: the type is supported
RETURNS_EXIT = "exit"  # a do_exit code (status << 8, or the signal): never a rejection
RETURNS_NONE = "none"  # a point that only feeds another one (makes no counts)


@dataclass(frozen=True)
class Point:
    id: int
    name: str
    layer: Layer
    returns: str
    mechanism: Mechanism | None  # None: not attached
    target: str | None  # what the mechanism attaches to
    reason: str  # why this mechanism, or why none
    # Optional: a kernel may well lack it (the confidential launch's functions of the
    # other vendor; an inlined one) or have a fallback (/proc for the command line).
    # Reported like every point; --strict does not demand it.
    optional: bool = False

    @property
    def planned(self) -> bool:
        return self.mechanism is not None


@dataclass(frozen=True)
class Plan:
    points: tuple[Point, ...]
    # (name, byte offset) of the kernel struct members VMM_STDERR reads, from the
    # facts (contract.STDERR_FIELDS); empty when it is not planned.
    offsets: tuple[tuple[str, int], ...] = ()

    def by_id(self) -> dict[int, Point]:
        return {p.id: p for p in self.points}

    @property
    def ioctl_mechanism(self) -> str | None:
        return self.points[0].mechanism

    @property
    def missing(self) -> list[Point]:
        return [p for p in self.points if not p.planned]


@dataclass(frozen=True)
class Attachment:
    """A planned point and what happened when the loader attached it."""

    point: Point
    attached: bool
    error: str | None = None  # why not, when the plan had a mechanism

    @property
    def mechanism(self) -> Mechanism:
        return self.point.mechanism if self.attached and self.point.mechanism \
            else Mechanism.NONE

    @property
    def reason(self) -> str:
        return self.error or self.point.reason


def tracefs_problem(facts: HostFacts) -> str:
    """Why tracefs cannot be used here, with the fix (facts.tracefs is None)."""
    return facts.tracefs_error or ("tracefs not mounted (mount -t tracefs nodev "
                                   "/sys/kernel/tracing)")


def _no_kprobes(facts: HostFacts) -> str:
    return f"no kprobes: {facts.kprobes_detail}" if facts.kprobes_detail else "no kprobes"


def _fentry_refusal(facts: HostFacts, name: str) -> str | None:
    """None when fentry can attach to ``name``, else why not."""
    if not facts.btf:
        return "fentry needs BTF (/sys/kernel/btf/vmlinux is missing)"
    if facts.fentry is None:
        return "fentry not probed"
    if facts.fentry != "ok":
        return f"fentry {facts.fentry}" if facts.fentry.startswith("refused") \
            else facts.fentry
    sym = facts.symbols.get(name)
    if sym is not None and sym.module is not None:
        return (f"fentry on module functions ({sym.module}) is not supported "
                f"by bcc {facts.bcc_version}")
    if facts.traceable is not None and name not in facts.traceable:
        return "not in available_filter_functions (notrace)"
    return None


def _function_mechanism(facts: HostFacts, name: str) -> tuple[str | None, str]:
    """Choose kprobe, then fentry, for a kernel function; else say why not."""
    if name not in facts.symbols:
        clones = facts.clones.get(name)
        if clones:
            return None, (f"absent from kallsyms: only the compiler clone {clones[0]} exists "
                          "(its arguments may be rewritten; not traced)")
        return None, "absent from kallsyms (inlined, or not in this kernel)"
    if facts.kprobes:
        if name in facts.kprobe_blacklist:
            return None, "in the kprobe blacklist"
        return Mechanism.KPROBE, "kprobe + kretprobe"
    refusal = _fentry_refusal(facts, name)
    if refusal is None:
        return Mechanism.FENTRY, "fentry/fexit (no kprobes on this kernel)"
    return None, f"{_no_kprobes(facts)}; {refusal}"


def _type_check_names(facts: HostFacts) -> list[str]:
    found = sorted(
        n for n in {*facts.symbols, *facts.clones}
        if TYPE_CHECK_PATTERN.match(n) and n not in TYPE_CHECK_FUNCTIONS
    )
    return [*TYPE_CHECK_FUNCTIONS, *found]


def make_plan(facts: HostFacts) -> Plan:
    """The probe plan for a host with ``facts``. Pure."""
    # ioctl layer: kvm_dev_ioctl costs nothing for other syscalls; the
    # syscall tracepoints are the fallback and see every ioctl on the host.
    mech, why = _function_mechanism(facts, IOCTL_FUNCTION)
    target: str | None = IOCTL_FUNCTION
    if mech is None:
        if all(tp in facts.tracepoints for tp in IOCTL_TRACEPOINTS):
            mech, target = Mechanism.TRACEPOINT, "+".join(IOCTL_TRACEPOINTS)
            why = f"{IOCTL_FUNCTION}: {why}; syscall tracepoints filtered in-kernel"
        else:
            target = None
            missing = tracefs_problem(facts) if facts.tracefs is None \
                else "syscalls:sys_{enter,exit}_ioctl tracepoints missing"
            why = f"{IOCTL_FUNCTION}: {why}; {missing}"
    points = [
        Point(PROBE_CREATE_VM, CREATE_VM, Layer.IOCTL, RETURNS_FD, mech, target, why),
        Point(PROBE_VM_TYPES_QUERY, VM_TYPES_QUERY, Layer.IOCTL, RETURNS_MASK, mech, target,
              why),
    ]
    mech, why = _function_mechanism(facts, ARCH_INIT_FUNCTION)
    points.append(Point(PROBE_ARCH_INIT_VM, ARCH_INIT_FUNCTION, Layer.ARCH_INIT, RETURNS_INT,
                        mech, ARCH_INIT_FUNCTION if mech else None, why))
    points += _follow_points(facts, points[0].mechanism)
    names = _type_check_names(facts)
    for i, name in enumerate(names):
        mech, why = _function_mechanism(facts, name)
        points.append(Point(FIRST_TYPE_CHECK + i, name, Layer.TYPE_CHECK, RETURNS_BOOL,
                            mech, name if mech else None, why))
    first_launch = FIRST_TYPE_CHECK + len(names)
    for i, name in enumerate(LAUNCH_FUNCTIONS):
        mech, target, why = _launch_mechanism(facts, name)
        points.append(Point(first_launch + i, name, Layer.LAUNCH, RETURNS_INT, mech,
                            target if mech else None, why, optional=True))
    stderr = next(p for p in points if p.id == PROBE_VMM_STDERR)
    offsets = tuple(sorted((facts.stderr_offsets or {}).items())) if stderr.planned else ()
    return Plan(tuple(points), offsets)


def _tracepoint(facts: HostFacts, tp: str) -> str | None:
    """None when tracepoint ``tp`` can be attached here, else why not."""
    if facts.tracefs is None:
        return tracefs_problem(facts)
    return None if tp in facts.tracepoints else f"tracepoint {tp} missing"


def _follow_points(facts: HostFacts, ioctl: Mechanism | None) -> list[Point]:
    """Following a process that touched /dev/kvm to its end: the end itself, its exit
    status, the signal that killed it, its command line, and KVM_MEMORY_ENCRYPT_OP."""
    on_syscalls = ioctl == Mechanism.TRACEPOINT  # the syscall slow path is paid already
    end_no = _tracepoint(facts, EXIT_TRACEPOINT)
    if ioctl is None:
        end_no = "the ioctl layer is not attached"
    out = [Point(PROBE_PROCESS_END, PROCESS_END, Layer.PROCESS, RETURNS_EXIT,
                 None if end_no else Mechanism.TRACEPOINT, None if end_no else EXIT_TRACEPOINT,
                 end_no or "the leader's exit ends a process that touched /dev/kvm")]
    followed = end_no is None

    def dependent(pid: int, name: str, plan: tuple[Mechanism | None, str | None, str],
                  layer: Layer = Layer.PROCESS, returns: str = RETURNS_NONE) -> Point:
        mech, target, why = plan
        if not followed:
            mech, target, why = None, None, f"needs {PROCESS_END}: {end_no}"
        return Point(pid, name, layer, returns, mech, target, why)

    # Exit status: the exit_group tracepoint where syscalls are traced anyway, else
    # a kprobe on do_exit (a syscall tracepoint would slow every syscall).
    no = _tracepoint(facts, EXIT_GROUP_TRACEPOINT)
    if on_syscalls and no is None:
        status = (Mechanism.TRACEPOINT, EXIT_GROUP_TRACEPOINT, "exit_group(status)")
    elif facts.kprobes and GROUP_EXIT_FUNCTION in facts.symbols:
        status = (Mechanism.KPROBE, GROUP_EXIT_FUNCTION,
                  "kprobe: do_exit of the leader (status << 8 | signal)")
    else:
        status = (None, None, f"{no or 'not on the syscall tracepoints'}; "
                  f"{GROUP_EXIT_FUNCTION}: {_function_mechanism(facts, GROUP_EXIT_FUNCTION)[1]}")
    out.append(dependent(PROBE_EXIT_STATUS, EXIT_STATUS, status))
    no = _tracepoint(facts, SIGNAL_TRACEPOINT)
    out.append(dependent(PROBE_SIGNAL, SIGNAL, (None, None, no) if no else (
        Mechanism.TRACEPOINT, SIGNAL_TRACEPOINT, "the last signal delivered")))
    # Command lines at execve: the syscall tracepoints where syscalls are traced anyway,
    # else kprobes on the syscall's entry (only exec'ing processes pay for them).
    kept = "argv at execve, kept per process (LRU)"
    entries = [f for f in EXEC_FUNCTIONS if f in facts.symbols]
    no = _tracepoint(facts, EXEC_TRACEPOINTS[0])
    if on_syscalls and no is None:
        execs = [tp for tp in EXEC_TRACEPOINTS if tp in facts.tracepoints]
        exec_plan = (Mechanism.TRACEPOINT, "+".join(execs), kept)
    elif facts.kprobes and entries:
        exec_plan = (Mechanism.KPROBE, "+".join(entries), f"kprobe: {kept}")
    else:
        exec_plan = (None, None, (
            "no execve syscall entry in kallsyms to kprobe, and a syscall tracepoint would "
            "put every syscall on the host on its slow path" if not on_syscalls else no)
            + "; command lines are read from /proc while the process lives")
    out.append(Point(PROBE_EXEC, EXEC, Layer.PROCESS, RETURNS_NONE, *exec_plan,
                     optional=True))
    # KVM_MEMORY_ENCRYPT_OP and a start's other KVM ioctls: with the ioctl tracepoints,
    # or kprobes on the VM and vCPU fds' ioctl functions (one attachment for both).
    vm_fn = next((f for f in VM_IOCTL_FUNCTIONS if f in facts.symbols), None)
    if on_syscalls:
        enc = (Mechanism.TRACEPOINT, "+".join(IOCTL_TRACEPOINTS),
               "with the ioctl tracepoints; VM type from the create that returned its fd")
        calls = (*enc[:2], "with the ioctl tracepoints: every KVM ioctl of a start, from "
                 "its first KVM_CREATE_VM to its first KVM_RUN that ran")
    elif ioctl == Mechanism.KPROBE and vm_fn:
        targets = [vm_fn] + ([VCPU_IOCTL_FUNCTION] if VCPU_IOCTL_FUNCTION in facts.symbols
                             else [])
        enc = (Mechanism.KPROBE, "+".join(targets),
               "kprobe + kretprobe; VM type: the process's last created VM")
        seen = ("every VM ioctl" if vm_fn == VM_IOCTL_FUNCTIONS[0] else
                f"the architecture's VM ioctls only ({VM_IOCTL_FUNCTIONS[0]} is absent)")
        calls = (*enc[:2], f"with {enc[1]}: {seen}, the architecture's vCPU ioctls and "
                 f"/dev/kvm's ({IOCTL_FUNCTION}); not the generic vCPU ones "
                 "(KVM_SET_REGS...: their function is every KVM_RUN's path)")
    else:
        no = (f"{VM_IOCTL_FUNCTIONS[0]}: "
              f"{_function_mechanism(facts, VM_IOCTL_FUNCTIONS[0])[1]}"
              + ("; fentry not built for it" if ioctl == Mechanism.FENTRY else ""))
        enc = calls = (None, None, no)
    out.insert(0, dependent(PROBE_ENCRYPT_OP, ENCRYPT_OP, enc, Layer.LAUNCH, RETURNS_INT))
    out.append(dependent(PROBE_KVM_CALL, KVM_CALL, calls, Layer.START, RETURNS_INT))
    no = _tracepoint(facts, RUN_TRACEPOINT)
    out.append(dependent(PROBE_KVM_RUN, KVM_RUN, (None, None, no) if no else (
        Mechanism.TRACEPOINT, RUN_TRACEPOINT,
        "where KVM_RUN returns to userspace (reason, errno), until a vCPU ran"),
        Layer.START, RETURNS_INT))
    # A VMM's first call: where its stderr goes is read then, while it surely lives.
    opened = (ioctl, IOCTL_FUNCTION if ioctl in (Mechanism.KPROBE, Mechanism.FENTRY)
              else "+".join(IOCTL_TRACEPOINTS), "with the ioctl layer: an event that wakes "
              "the reader, so the VMM's stderr is resolved while it lives") if ioctl else (
        None, None, "the ioctl layer is not attached")
    out.append(dependent(PROBE_KVM_OPEN, KVM_OPEN, opened))
    # Where its stderr is, read in the kernel when it is first followed (its query or
    # create): what its file is survives the process, however fast it gives up.
    if not opened[0]:
        stderr = opened
    elif facts.stderr_offsets is None:
        stderr = (None, None, f"{facts.stderr_offsets_error or 'no BTF offsets'}; resolved "
                  "from /proc/PID/fd/2 only, while the VMM lives")
    else:
        stderr = (opened[0], opened[1], "with the ioctl layer, at a process's first query "
                  "or create: fd 2's file (path, inode, offset) at the BTF's offsets")
    out.append(replace(dependent(PROBE_VMM_STDERR, VMM_STDERR, stderr), optional=True))
    return out


def _launch_target(facts: HostFacts, name: str) -> str:
    """What a launch function's kprobe attaches to: the function, or, when gcc left only
    a clone that keeps its return value (.constprop, .isra), that clone."""
    if name in facts.symbols or not facts.kprobes:
        return name
    clone = next((c for c in facts.clones.get(name, ())
                  if ".constprop." in c or ".isra." in c), None)
    return clone or name


def _launch_mechanism(facts: HostFacts, name: str) -> tuple[Mechanism | None, str, str]:
    """The confidential launch's functions: kprobes only (optional points); only their
    return value is read, so a compiler clone that keeps it is traced in their place."""
    target = _launch_target(facts, name)
    if target != name:
        return Mechanism.KPROBE, target, (f"kprobe + kretprobe on the compiler clone "
                                          f"{target} (only the return value is read)")
    mech, why = _function_mechanism(facts, name)
    if mech == Mechanism.FENTRY:
        return None, name, "fentry not built for launch functions; no kprobes here"
    return mech, name, why

