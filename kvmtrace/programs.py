"""The BPF programs of bpf/kvmtrace.bpf.c: which C program serves each probe point.

The second half of the kernel<->user contract. kvmtrace.contract owns the data the C
and Python share (struct layouts, maps, probe ids, the ``#define``s); this module owns
the programs: for every (probe, mechanism) the programs the C declares for it, spelled
as the C spells them and with how each is attached, and for a function point the
``FN_*`` line the loader appends to the C (a macro at the C's end that writes that
point's programs). kvmtrace.loader attaches by :data:`PROGRAMS` and writes the lines
from :data:`FN_LINES`; tests/test_contract.py parses the C and fails when the C has a
program or an ``FN_*`` macro this table does not, or the table one the C lacks.

A separate module because the table is keyed by kvmtrace.plan's mechanisms and names
kvmtrace.facts' kernel functions and tracepoints, and those modules import the contract.

Pure data and pure functions: nothing here touches the machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmtrace import contract
from kvmtrace.facts import (
    EXEC_TRACEPOINTS,
    EXIT_GROUP_TRACEPOINT,
    EXIT_TRACEPOINT,
    IOCTL_FUNCTION,
    IOCTL_TRACEPOINTS,
    RUN_TRACEPOINT,
    SIGNAL_TRACEPOINT,
)
from kvmtrace.plan import Layer, Mechanism, Point

# How the C declares a program (Program.form): a bcc macro, or FUNCTION, a plain
# ``int NAME(struct pt_regs *ctx, ...)`` (bcc gives one named syscall__* the syscall's
# own arguments). Every non-static function of the C is a program.
FUNCTION = "function"
TRACEPOINT_PROBE = "TRACEPOINT_PROBE"  # TRACEPOINT_PROBE(category, event)
RAW_TRACEPOINT_PROBE = "RAW_TRACEPOINT_PROBE"  # RAW_TRACEPOINT_PROBE(event): none yet
KFUNC_PROBE = "KFUNC_PROBE"  # fentry: KFUNC_PROBE(function, arguments...)
KRETFUNC_PROBE = "KRETFUNC_PROBE"  # fexit: KRETFUNC_PROBE(function, arguments..., ret)
FORMS = (FUNCTION, TRACEPOINT_PROBE, RAW_TRACEPOINT_PROBE, KFUNC_PROBE, KRETFUNC_PROBE)

# How a program is attached (Program.attach).
ENTRY = "kprobe"  # the loader attaches it as a kprobe on each of the point's targets
RETURN = "kretprobe"  # the loader attaches it as a kretprobe on each target
LOAD = "load"  # bcc attaches it while loading (the loader checks a tracepoint's fd)


@dataclass(frozen=True)
class Program:
    """One BPF program of the C, as the C declares it."""

    form: str  # one of FORMS
    # FUNCTION: the C function; TRACEPOINT_PROBE: "category:event"; K*FUNC_PROBE: the
    # kernel function. "{id}", "{target}": the point's id and target (an FN_* macro's).
    name: str
    attach: str = LOAD
    only: str = ""  # attached only to the targets whose name ends so

    def symbol(self, point_id: int, target: str = "") -> str:
        """The name, for the point ``point_id`` (attached to ``target``)."""
        return self.name.format(id=point_id, target=target)

    def c_spelling(self) -> str:
        """How the C names it: the function name, or the macro and its first arguments."""
        if self.form == FUNCTION:
            return self.name
        return f"{self.form}({self.name.replace(':', ', ')})"


def _tracepoints(*names: str) -> tuple[Program, ...]:
    return tuple(Program(TRACEPOINT_PROBE, tp) for tp in names)


KPROBE, FENTRY, TRACEPOINT = Mechanism.KPROBE, Mechanism.FENTRY, Mechanism.TRACEPOINT

# The ioctl layer (KVM_CREATE_VM, KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)): one set of
# programs for both points; with the tracepoints, KVM_MEMORY_ENCRYPT_OP's too.
IOCTL_KPROBES = (Program(FUNCTION, "kvmtrace_ioctl_enter", ENTRY),
                 Program(FUNCTION, "kvmtrace_ioctl_return", RETURN))
IOCTL_FENTRY = (Program(KFUNC_PROBE, IOCTL_FUNCTION), Program(KRETFUNC_PROBE, IOCTL_FUNCTION))
IOCTL_TRACEPOINT_PROGRAMS = _tracepoints(*IOCTL_TRACEPOINTS)
FD_IOCTL_KPROBES = (Program(FUNCTION, "kvmtrace_fd_ioctl_enter", ENTRY),
                    Program(FUNCTION, "kvmtrace_fd_ioctl_return", RETURN))

# ---- function points: kvm_arch_init_vm, the type checks, the launch functions ----
# The programs each FN_* macro of the C writes for the point of its line.
FN_KPROBES = (Program(FUNCTION, "kvmtrace_enter_{id}", ENTRY),
              Program(FUNCTION, "kvmtrace_return_{id}", RETURN))
FN_FEXIT = (Program(KRETFUNC_PROBE, "{target}"),)
FN_MACROS: dict[str, tuple[Program, ...]] = {
    "FN_KPROBE": FN_KPROBES,  # FN_KPROBE(id, the VM type's argument, return type)
    "FN_KPROBE_LAUNCH": FN_KPROBES,  # FN_KPROBE_LAUNCH(id): VM type from the context
    "FN_FEXIT_ARCH_INIT_VM": FN_FEXIT,  # FN_FEXIT_ARCH_INIT_VM(id, function)
    "FN_FEXIT_TYPE_CHECK": FN_FEXIT,  # FN_FEXIT_TYPE_CHECK(id, function)
}
# Points are keyed by probe id; the numbered function points (type checks, launch
# functions: contract.FIRST_TYPE_CHECK on) by their layer (key()).
Key = int | Layer
# The line the loader appends for a planned function point: "{id}", "{target}" are its.
FN_LINES: dict[tuple[Key, Mechanism], str] = {
    (contract.PROBE_ARCH_INIT_VM, KPROBE): "FN_KPROBE({id}, 2, int)",  # (kvm, type): int
    (contract.PROBE_ARCH_INIT_VM, FENTRY): "FN_FEXIT_ARCH_INIT_VM({id}, {target})",
    (Layer.TYPE_CHECK, KPROBE): "FN_KPROBE({id}, 1, u8)",  # (type): bool
    (Layer.TYPE_CHECK, FENTRY): "FN_FEXIT_TYPE_CHECK({id}, {target})",
    (Layer.LAUNCH, KPROBE): "FN_KPROBE_LAUNCH({id})",  # no fentry for launch functions
}


def fn_macro(line: str) -> str:
    """The FN_* macro of a line of FN_LINES."""
    return line.split("(", 1)[0]


# ---- every (probe, mechanism) the plan can choose -> the C's programs for it ----
# The ioctl layer's programs, by mechanism: they serve the two /dev/kvm points, a
# process's first KVM call (their enter: KVM_GET_API_VERSION wakes the reader) and its
# fd 2 read where it is first followed (their return).
IOCTL_LAYER = {KPROBE: IOCTL_KPROBES, FENTRY: IOCTL_FENTRY, TRACEPOINT: IOCTL_TRACEPOINT_PROGRAMS}
PROGRAMS: dict[tuple[Key, Mechanism], tuple[Program, ...]] = {
    **{(probe, mechanism): programs
       for probe in (contract.PROBE_CREATE_VM, contract.PROBE_VM_TYPES_QUERY,
                     contract.PROBE_KVM_OPEN, contract.PROBE_VMM_STDERR)
       for mechanism, programs in IOCTL_LAYER.items()},
    # On kprobe hosts, the VM and vCPU fds' ioctl functions (FD_IOCTL_KPROBE): one set
    # for KVM_MEMORY_ENCRYPT_OP and a start's failed KVM ioctls.
    (contract.PROBE_ENCRYPT_OP, KPROBE): FD_IOCTL_KPROBES,
    (contract.PROBE_ENCRYPT_OP, TRACEPOINT): IOCTL_TRACEPOINT_PROGRAMS,
    (contract.PROBE_KVM_CALL, KPROBE): FD_IOCTL_KPROBES,
    (contract.PROBE_KVM_CALL, TRACEPOINT): IOCTL_TRACEPOINT_PROGRAMS,
    (contract.PROBE_KVM_RUN, TRACEPOINT): _tracepoints(RUN_TRACEPOINT),
    (contract.PROBE_PROCESS_END, TRACEPOINT): _tracepoints(EXIT_TRACEPOINT),
    (contract.PROBE_EXIT_STATUS, TRACEPOINT): _tracepoints(EXIT_GROUP_TRACEPOINT),
    (contract.PROBE_EXIT_STATUS, KPROBE): (Program(FUNCTION, "kvmtrace_group_exit", ENTRY),),
    (contract.PROBE_SIGNAL, TRACEPOINT): _tracepoints(SIGNAL_TRACEPOINT),
    (contract.PROBE_EXEC, TRACEPOINT): _tracepoints(*EXEC_TRACEPOINTS),
    # The syscall's entry under each architecture's wrapper (__x64_sys_execve, ...).
    (contract.PROBE_EXEC, KPROBE): (Program(FUNCTION, "syscall__execve", ENTRY, only="_sys_execve"),
                           Program(FUNCTION, "syscall__execveat", ENTRY,
                                   only="_sys_execveat")),
    **{k: FN_MACROS[fn_macro(line)] for k, line in FN_LINES.items()},
}


def key(point: Point) -> Key:
    """A point's probe key in PROGRAMS and FN_LINES."""
    return point.layer if point.id >= contract.FIRST_TYPE_CHECK else point.id


def of(point: Point) -> tuple[Program, ...]:
    """The C's programs for a planned point (KeyError: the C has none for its mechanism)."""
    return PROGRAMS[key(point), point.mechanism]


def fn_line(point: Point) -> str | None:
    """The FN_* line the loader appends for ``point``, or None: its programs are in the C
    already (or it is not planned)."""
    line = FN_LINES.get((key(point), point.mechanism))
    return line.format(id=point.id, target=point.target) if line else None


def c_programs() -> set[str]:
    """Every program the C declares by itself (not through an FN_* line), as the C
    spells it (Program.c_spelling)."""
    fn_made = {p for progs in FN_MACROS.values() for p in progs}
    return {p.c_spelling() for progs in PROGRAMS.values() for p in progs
            if p not in fn_made}
