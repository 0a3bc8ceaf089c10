"""The kernel<->user contract: what bpf/kvmtrace.bpf.c and the Python side share.

Every struct layout, map (name, type, key and value size, entries), probe id, verdict
bit, health index, latency index and feature define the BPF program and this package
must agree on is written here once, beside the C (as ebpf_exporter declares each map's
layout next to its ``.bpf.c``). The C takes the numbers as ``#define``s from
:func:`defines`, so the program compiled is always the one described here;
``tests/test_contract.py`` parses the C and fails when a struct, a map declaration or a
define disagrees, or when the C declares a map or tests a define this module does not
name; and the reader checks every map it is handed against :data:`MAPS`, as the kernel
reports it, before reading a byte (:func:`check_map`).

The C's *programs* (which function bcc attaches for each probe and mechanism, and the
``FN_*`` macros that write the function points' ones) are kvmtrace.programs' table: it
needs the plan's mechanisms and the facts' kernel names, which this module, imported by
both, cannot import.

Map and define names are spelled here only: kvmtrace.loader, kvmtrace.reader and
bench/ use these constants, never a literal.

Pure data and pure functions: nothing here touches the machine.
"""

from __future__ import annotations

import ctypes as ct
import struct
from dataclasses import dataclass

TASK_COMM_LEN = 16  # include/linux/sched.h

# ---- probe ids: count_key.probe / event.probe --------------------------------
PROBE_CREATE_VM = 0
PROBE_VM_TYPES_QUERY = 1
PROBE_ARCH_INIT_VM = 2
PROBE_ENCRYPT_OP = 3  # KVM_MEMORY_ENCRYPT_OP on a followed process's VM or vCPU fd
PROBE_PROCESS_END = 4  # a followed process ended (its thread-group leader exited)
# Points that make no counts of their own (they feed PROBE_PROCESS_END's).
PROBE_EXIT_STATUS, PROBE_SIGNAL, PROBE_EXEC = 5, 6, 7
# A VM start, from its first accepted KVM_CREATE_VM to its first KVM_RUN that ran:
PROBE_KVM_CALL = 8  # a KVM ioctl of it that failed (result -errno, verdicts the command)
PROBE_KVM_RUN = 9  # its first KVM_RUN that failed or ended it (result -errno or 0,
# verdicts the exit reason: kvm:kvm_userspace_exit)
PROBE_KVM_OPEN = 10  # a process asked KVM_GET_API_VERSION (a VMM opening KVM): an event
# only, which wakes the reader, so what it is can be read while it lives
PROBE_VMM_STDERR = 11  # where a followed process's fd 2 is, read in the kernel when it is
# first followed (the vmm_stderr map; no event, no count: the C never names it)
FIRST_TYPE_CHECK = 12  # every further function point, in plan order (type checks, then
# the confidential launch's functions)

# ---- VERDICT_* bits: what the function probes saw inside one KVM_CREATE_VM ----
# (same thread, nested in time), kept in count_key.verdicts and event.verdicts.
VERDICT_TYPE_CHECK_REJECTED = 1  # an *_is_vm_type_supported returned false
VERDICT_ARCH_INIT_FAILED = 2  # kvm_arch_init_vm returned -errno
VERDICT_ARCH_INIT_SEEN = 4  # kvm_arch_init_vm returned (either way)
VERDICT_TYPE_CHECK_SEEN = 8  # an *_is_vm_type_supported returned
VERDICTS = {
    "VERDICT_TYPE_CHECK_REJECTED": VERDICT_TYPE_CHECK_REJECTED,
    "VERDICT_ARCH_INIT_FAILED": VERDICT_ARCH_INIT_FAILED,
    "VERDICT_ARCH_INIT_SEEN": VERDICT_ARCH_INIT_SEEN,
    "VERDICT_TYPE_CHECK_SEEN": VERDICT_TYPE_CHECK_SEEN,
}

# ---- PROC_* bits: what a followed process did (count_key.verdicts of its end) ---
PROC_QUERIED = 1  # asked KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)
PROC_CREATED = 2  # a KVM_CREATE_VM returned a VM fd
PROC_CREATE_FAILED = 4  # a KVM_CREATE_VM failed
PROC_LAUNCH_OK = 8  # a KVM_MEMORY_ENCRYPT_OP succeeded
PROC_LAUNCH_FAILED = 16  # a KVM_MEMORY_ENCRYPT_OP failed (errno or firmware status)
PROC_EXIT_CODE = 32  # its exit code was seen (exit_group / the leader's do_exit)
PROC_FDS_FULL = 64  # more VMs than VM_FDS_MAX: later ops get the last create's type
PROC_RAN = 128  # a KVM_RUN returned from a vCPU that ran: its start ended well there
PROC_RUN_FAILED = 256  # its first KVM_RUN failed or ended the start (PROBE_KVM_RUN)
PROC_CALL_FAILED = 512  # another KVM ioctl of its start failed (PROBE_KVM_CALL)
PROC_BITS = {
    "PROC_QUERIED": PROC_QUERIED, "PROC_CREATED": PROC_CREATED,
    "PROC_CREATE_FAILED": PROC_CREATE_FAILED, "PROC_LAUNCH_OK": PROC_LAUNCH_OK,
    "PROC_LAUNCH_FAILED": PROC_LAUNCH_FAILED, "PROC_EXIT_CODE": PROC_EXIT_CODE,
    "PROC_FDS_FULL": PROC_FDS_FULL, "PROC_RAN": PROC_RAN,
    "PROC_RUN_FAILED": PROC_RUN_FAILED, "PROC_CALL_FAILED": PROC_CALL_FAILED,
}

# VM types above this count as VM_TYPE_OTHER in the host-wide totals (the raw value
# stays in the count key and the event): the totals' keys stay bounded.
VM_TYPE_BUCKET_MAX = 255
VM_TYPE_OTHER = 2**64 - 1
TOTALS_MAX = 16384  # host-wide totals: bounded keys (probe x type bucket x result)

# Sizes of the process-following state (fixed: not loader options).
PROCS_MAX = 8192  # processes followed at once (more: kvmtrace_procs_dropped_total)
VM_FDS_MAX = 8  # VM fds remembered per process (a power of 2)
EXEC_ARGS_MAX = 1024  # command lines kept (LRU over every execve on the host)
EXEC_ARGS_BYTES = 4096  # bytes of one command line kept
EXEC_ARG_MAX = 1024  # bytes of one argument kept
EXEC_ARGV_MAX = 128  # arguments of one command line kept
PROC_KEYS_MAX = 16384  # processes whose share of the counts map is tracked (LRU)
STDERR_MAX = 4096  # followed processes whose fd 2 is kept (LRU)
CGROUP_MAX = 4096  # followed processes whose cgroup id is kept (LRU)
STDERR_NAMES = 16  # path components of it kept (a power of 2), the file's own first
STDERR_NAME_LEN = 64  # bytes of one (NUL included)
STDERR_NAMES_BYTES = STDERR_NAMES * STDERR_NAME_LEN
STDERR_MOUNTS = 8  # mounts walked up through
STDERR_NO_FILE = 1  # vmm_stderr.flags: fd 2 was not open
STDERR_TRUNCATED = 2  # vmm_stderr.flags: deeper than STDERR_NAMES
COUNTS_PER_PROC = 256  # a process's share of the counts map (loader option's default)

# ---- health: per-CPU counters, index i is HEALTH[i] (kvmtrace_<name>_total) ----
HEALTH = ("counts_dropped", "events_lost", "calls_dropped", "events_throttled",
          "procs_dropped", "totals_dropped", "counts_over_share", "counts_inserted")

# ---- KVM_CREATE_VM latency: log2(ns) slots per outcome ---------------------------
LATENCY_OUTCOMES = ("accepted", "rejected")  # outcome = (ret < 0)
LATENCY_SLOTS = 64  # bpf_log2l() of a u64


def latency_index(outcome: int, slot: int) -> int:
    """Index in the create_latency array of (outcome, log2 slot)."""
    return outcome * LATENCY_SLOTS + slot


def latency_slot(index: int) -> tuple[int, int]:
    """(outcome, log2 slot) of a create_latency index."""
    return divmod(index, LATENCY_SLOTS)


# ---- struct count_key: the counts map's key ----------------------------------


class CountKey(ct.Structure):
    """struct count_key."""

    _fields_ = [("tgid", ct.c_uint32), ("probe", ct.c_uint32), ("vm_type", ct.c_uint64),
                ("result", ct.c_int64), ("verdicts", ct.c_uint32), ("detail", ct.c_uint32),
                ("comm", ct.c_char * TASK_COMM_LEN)]


# struct count_key as a struct format, to read a batch buffer without a ctypes
# object per entry: tgid, probe, vm_type, result, verdicts, detail, comm.
COUNT_KEY = struct.Struct("<IIQqII16s")
COUNT_VALUE_SIZE = 8  # u64

# A count as read from the map: (tgid, probe, vm_type, result, verdicts, detail, comm,
# count), comm without its NULs. A plain tuple: a scrape of 10,000 series makes 10,000.
RawCount = tuple[int, int, int, int, int, int, bytes, int]
RAW_KEY_LEN = 7  # raw[:RAW_KEY_LEN] is the key, raw[RAW_KEY_LEN] the count

# struct total_key: the totals map's key: probe, pad, vm_type (bucketed), result.
# Values: u64 per CPU.
TOTAL_KEY = struct.Struct("<IIQq")

# A host-wide total as read: (probe, vm_type, result, count).
RawTotal = tuple[int, int, int, int]

# struct event: one record per completed call on the live stream: u64 ts_ns,
# duration_ns, vm_type; s64 result; u32 tgid, tid, probe, verdicts, detail, fd;
# u64 status; comm.
EVENT = struct.Struct("<QQQqIIIIIIQ16s")

# struct exec_args: the exec_args map's value (u32 len, u32 flags, the NUL-separated
# arguments); flags bit 0: truncated.
EXEC_ARGS_HEAD = struct.Struct("<II")

# struct vmm_stderr: the vmm_stderr map's value: u64 ino; s64 pos (its file position
# then); u32 dev (super_block.s_dev, the kernel's MAJOR << 20 | MINOR), rdev; u16 mode,
# depth (names filled); u32 flags (STDERR_*); the path's names, the file's own first,
# STDERR_NAME_LEN bytes each.
VMM_STDERR = struct.Struct(f"<QqIIHHI{STDERR_NAMES_BYTES}s")

# The C struct fields, in order, as (C type, name): what tests/test_contract.py holds
# the C against, and what the formats above are built from.
STRUCTS: dict[str, tuple[tuple[str, str], ...]] = {
    "count_key": (("u32", "tgid"), ("u32", "probe"), ("u64", "vm_type"), ("s64", "result"),
                  ("u32", "verdicts"), ("u32", "detail"), ("char[TASK_COMM_LEN]", "comm")),
    "event": (("u64", "ts_ns"), ("u64", "duration_ns"), ("u64", "vm_type"),
              ("s64", "result"), ("u32", "tgid"), ("u32", "tid"), ("u32", "probe"),
              ("u32", "verdicts"), ("u32", "detail"), ("u32", "fd"), ("u64", "status"),
              ("char[TASK_COMM_LEN]", "comm")),
    "exec_args": (("u32", "len"), ("u32", "flags"), ("char[EXEC_ARGS_BYTES]", "args")),
    "total_key": (("u32", "probe"), ("u32", "pad"), ("u64", "vm_type"), ("s64", "result")),
    "vmm_stderr": (("u64", "ino"), ("s64", "pos"), ("u32", "dev"), ("u32", "rdev"),
                   ("u16", "mode"), ("u16", "depth"), ("u32", "flags"),
                   ("char[STDERR_NAMES_BYTES]", "names")),
}
STRUCT_FORMATS = {"count_key": COUNT_KEY, "event": EVENT, "total_key": TOTAL_KEY,
                  "exec_args": struct.Struct(f"<II{EXEC_ARGS_BYTES}s"),
                  "vmm_stderr": VMM_STDERR}

# ---- maps -----------------------------------------------------------------------
# Kernel map types (include/uapi/linux/bpf.h enum bpf_map_type).
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_RINGBUF = 27
PAGE_SIZE = 4096


# Map names: bcc gives the kernel map the C name (truncated to 15 characters).
COUNTS_MAP = "counts"
TOTALS_MAP = "totals"
HEALTH_MAP = "health"
LATENCY_MAP = "create_latency"
LATENCY_SUM_MAP = "create_latency_sum"
EXEC_ARGS_MAP = "exec_args"
PROC_KEYS_MAP = "proc_keys"
VMM_STDERR_MAP = "vmm_stderr"
# tgid -> the cgroup v2 id a followed process was in at its first KVM call
# (bpf_get_current_cgroup_id; kvmtrace.cgroups resolves it, kvmtrace.owners decodes it).
PROC_CGROUP_MAP = "proc_cgroup"
EVENTS_MAP = "events"  # BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES) or BPF_PERF_OUTPUT(events)
# Maps only the C reads: the in-flight calls (function points, ioctls), the count of
# ioctls in flight, the event budget, followed processes, the execve scratch buffer, the
# count of processes in their start (created a VM, no vCPU ran yet), vmm_stderr's
# scratch value.
# Named so that a map added to the C is a decision about this contract, not an accident.
PRIVATE_MAPS = ("fn_calls", "inflight", "event_budget", "ioctl_calls", "procs",
                "exec_scratch", "starting", "stderr_scratch")


@dataclass(frozen=True)
class MapSpec:
    """One map the reader reads: its declaration in the C and its shape in the kernel."""

    name: str  # the C name, which bcc gives the kernel map (truncated to 15 chars)
    macro: str  # the bcc macro that declares it
    key: str | None  # C key type (None: bcc's default, an int index)
    value: str | None  # C value type
    entries: str  # the define that sizes it
    key_size: int
    value_size: int  # per CPU for a per-CPU array


# Sizes defines: max_entries of each map (COUNTS_MAX, CALLS_MAX and RINGBUF_PAGES are
# the loader's options; the others are fixed by the layouts above).
HEALTH_ENTRIES = len(HEALTH)
LATENCY_ENTRIES = len(LATENCY_OUTCOMES) * LATENCY_SLOTS
LATENCY_SUM_ENTRIES = len(LATENCY_OUTCOMES)

MAPS: dict[str, MapSpec] = {m.name: m for m in (
    MapSpec(COUNTS_MAP, "BPF_HASH", "struct count_key", "u64", "COUNTS_MAX",
            COUNT_KEY.size, COUNT_VALUE_SIZE),
    MapSpec(TOTALS_MAP, "BPF_PERCPU_HASH", "struct total_key", "u64", "TOTALS_MAX",
            TOTAL_KEY.size, 8),
    MapSpec(HEALTH_MAP, "BPF_PERCPU_ARRAY", None, "u64", "HEALTH_ENTRIES", 4, 8),
    MapSpec(LATENCY_MAP, "BPF_ARRAY", None, "u64", "LATENCY_ENTRIES", 4, 8),
    MapSpec(LATENCY_SUM_MAP, "BPF_ARRAY", None, "u64", "LATENCY_SUM_ENTRIES", 4, 8),
    MapSpec(EXEC_ARGS_MAP, "BPF_LRU_HASH", "u32", "struct exec_args", "EXEC_ARGS_MAX",
            4, STRUCT_FORMATS["exec_args"].size),
    MapSpec(PROC_KEYS_MAP, "BPF_LRU_HASH", "u32", "u32", "PROC_KEYS_MAX", 4, 4),
    MapSpec(VMM_STDERR_MAP, "BPF_LRU_HASH", "u32", "struct vmm_stderr", "STDERR_MAX",
            4, VMM_STDERR.size),
    MapSpec(PROC_CGROUP_MAP, "BPF_LRU_HASH", "u32", "u64", "CGROUP_MAX", 4, 8),
)}
# Maps that exist only when the plan has their point (kvmtrace.plan: EXEC, VMM_STDERR,
# PROCESS_END: processes are followed).
OPTIONAL_MAPS = (EXEC_ARGS_MAP, VMM_STDERR_MAP, PROC_CGROUP_MAP)
# Every map the C declares, by name.
ALL_MAPS = (*MAPS, EVENTS_MAP, *PRIVATE_MAPS)


def firmware_status(tdx: bool, detail: int) -> int:
    """The firmware status word a count key's ``detail`` stands for: SEV's whole u32
    error, or the upper half of TDX's hw_error (its status class)."""
    return detail << 32 if tdx else detail


# Every map the reader is handed, by name (an optional one when the program has it).
READ_MAPS = (*MAPS, EVENTS_MAP)


def defines(counts_max: int, calls_max: int, ringbuf_pages: int,
            counts_per_proc: int = COUNTS_PER_PROC) -> dict[str, str]:
    """The contract's ``#define``s for the C (the loader adds host and plan ones)."""
    out = {
        "TASK_COMM_LEN": str(TASK_COMM_LEN),
        "PROBE_CREATE_VM": str(PROBE_CREATE_VM),
        "PROBE_VM_TYPES_QUERY": str(PROBE_VM_TYPES_QUERY),
        "PROBE_ARCH_INIT_VM": str(PROBE_ARCH_INIT_VM),
        "PROBE_ENCRYPT_OP": str(PROBE_ENCRYPT_OP),
        "PROBE_PROCESS_END": str(PROBE_PROCESS_END),
        "PROBE_KVM_CALL": str(PROBE_KVM_CALL),
        "PROBE_KVM_RUN": str(PROBE_KVM_RUN),
        "PROBE_KVM_OPEN": str(PROBE_KVM_OPEN),
        **{k: str(v) for k, v in VERDICTS.items()},
        **{k: str(v) for k, v in PROC_BITS.items()},
        "PROCS_MAX": str(PROCS_MAX),
        "TOTALS_MAX": str(TOTALS_MAX),
        "VM_TYPE_BUCKET_MAX": str(VM_TYPE_BUCKET_MAX),
        "VM_TYPE_OTHER": f"{VM_TYPE_OTHER:#x}ULL",
        "VM_FDS_MAX": str(VM_FDS_MAX),
        "EXEC_ARGS_MAX": str(EXEC_ARGS_MAX),
        "EXEC_ARGS_BYTES": str(EXEC_ARGS_BYTES),
        "EXEC_ARG_MAX": str(EXEC_ARG_MAX),
        "EXEC_ARGV_MAX": str(EXEC_ARGV_MAX),
        "PROC_KEYS_MAX": str(PROC_KEYS_MAX),
        "STDERR_MAX": str(STDERR_MAX),
        "CGROUP_MAX": str(CGROUP_MAX),
        "STDERR_NAMES": str(STDERR_NAMES),
        "STDERR_NAME_LEN": str(STDERR_NAME_LEN),
        "STDERR_NAMES_BYTES": str(STDERR_NAMES_BYTES),
        "STDERR_MOUNTS": str(STDERR_MOUNTS),
        "STDERR_NO_FILE": str(STDERR_NO_FILE),
        "STDERR_TRUNCATED": str(STDERR_TRUNCATED),
        "COUNTS_PER_PROC": str(counts_per_proc),
        **{f"HEALTH_{name.upper()}": str(i) for i, name in enumerate(HEALTH)},
        "HEALTH_ENTRIES": str(HEALTH_ENTRIES),
        "LATENCY_SLOTS": str(LATENCY_SLOTS),
        "LATENCY_ENTRIES": str(LATENCY_ENTRIES),
        "LATENCY_SUM_ENTRIES": str(LATENCY_SUM_ENTRIES),
        "COUNTS_MAX": str(counts_max),
        "CALLS_MAX": str(calls_max),
        "RINGBUF_PAGES": str(ringbuf_pages),
    }
    return out


# ---- feature defines: what the C tests with #ifdef / #if defined() ---------------
# The loader defines each as 1, or not at all, from the plan and its options
# (kvmtrace.loader.build_text). Keyed by kvmtrace.plan.Mechanism's values.
IOCTL_DEFINES = {"kprobe": "IOCTL_KPROBE", "fentry": "IOCTL_FENTRY",
                 "tracepoint": "IOCTL_TRACEPOINT"}  # the ioctl layer's mechanism
FOLLOW_PROCS = "FOLLOW_PROCS"  # follow processes that touch /dev/kvm to their end
EXIT_DEFINES = {"tracepoint": "EXIT_TRACEPOINT", "kprobe": "EXIT_KPROBE"}  # exit status
SIGNAL_DEFINE = "SIGNAL_TRACEPOINT"  # the signal that killed a followed process
FD_IOCTL_KPROBE = "FD_IOCTL_KPROBE"  # VM and vCPU fds' ioctls by kprobes (encrypt op, ...)
KVM_CALLS = "KVM_CALLS"  # a start's failing KVM ioctls (PROBE_KVM_CALL)
RUN_TRACEPOINT = "RUN_TRACEPOINT"  # a start's first KVM_RUN (kvm:kvm_userspace_exit)
EXEC_DEFINES = {"tracepoint": "EXEC_TRACEPOINT", "kprobe": "EXEC_KPROBE"}  # command lines
EXECVEAT_DEFINE = "EXECVEAT_TRACEPOINT"  # with EXEC_TRACEPOINT: execveat's too
USE_RINGBUF = "USE_RINGBUF"  # BPF ring buffer (5.8+), else a perf buffer
USE_TASK_STORAGE = "USE_TASK_STORAGE"  # in-flight ioctls in task storage, else a hash
STDERR_CAPTURE = "STDERR_CAPTURE"  # a followed process's fd 2, read at the OFF_* offsets
FEATURES = (*IOCTL_DEFINES.values(), FOLLOW_PROCS, *EXIT_DEFINES.values(), SIGNAL_DEFINE,
            FD_IOCTL_KPROBE, KVM_CALLS, RUN_TRACEPOINT, *EXEC_DEFINES.values(),
            EXECVEAT_DEFINE, USE_RINGBUF, USE_TASK_STORAGE, STDERR_CAPTURE)
# With STDERR_CAPTURE, the kernel's struct members the C reads fd 2 through, at the
# offsets the host's BTF gives (kvmtrace.btf): #define OFFSET_PREFIX + key, the byte
# offset of (struct, member path) (the loader defines them from the facts).
OFFSET_PREFIX = "OFF_"
STDERR_FIELDS = {
    "TASK_FILES": ("task_struct", "files"),
    "FILES_FDT": ("files_struct", "fdt"),
    "FDT_FD": ("fdtable", "fd"),
    "FILE_INODE": ("file", "f_inode"),
    "FILE_POS": ("file", "f_pos"),
    "FILE_DENTRY": ("file", "f_path.dentry"),
    "FILE_MNT": ("file", "f_path.mnt"),
    "DENTRY_PARENT": ("dentry", "d_parent"),
    "DENTRY_NAME": ("dentry", "d_name.name"),
    "INODE_MODE": ("inode", "i_mode"),
    "INODE_INO": ("inode", "i_ino"),
    "INODE_SB": ("inode", "i_sb"),
    "INODE_RDEV": ("inode", "i_rdev"),
    "SB_DEV": ("super_block", "s_dev"),
    "VFSMOUNT_ROOT": ("vfsmount", "mnt_root"),
    "MOUNT_MNT": ("mount", "mnt"),
    "MOUNT_PARENT": ("mount", "mnt_parent"),
    "MOUNT_MOUNTPOINT": ("mount", "mnt_mountpoint"),
}



def expected_entries(name: str, counts_max: int) -> int:
    """max_entries the kernel must report for one of :data:`MAPS`."""
    return {COUNTS_MAP: counts_max, TOTALS_MAP: TOTALS_MAX, HEALTH_MAP: HEALTH_ENTRIES,
            LATENCY_MAP: LATENCY_ENTRIES, LATENCY_SUM_MAP: LATENCY_SUM_ENTRIES,
            EXEC_ARGS_MAP: EXEC_ARGS_MAX, PROC_KEYS_MAP: PROC_KEYS_MAX,
            VMM_STDERR_MAP: STDERR_MAX, PROC_CGROUP_MAP: CGROUP_MAX}[name]


@dataclass(frozen=True)
class MapInfo:
    """What the kernel says of a map fd (struct bpf_map_info's first fields)."""

    type: int
    key_size: int
    value_size: int
    max_entries: int


def check_map(name: str, info: MapInfo, counts_max: int, ringbuf: bool,
              ringbuf_pages: int) -> str | None:
    """None when the kernel's map ``name`` is the one this contract describes, else why
    not (one line)."""
    if name == EVENTS_MAP:
        want_type = BPF_MAP_TYPE_RINGBUF if ringbuf else BPF_MAP_TYPE_PERF_EVENT_ARRAY
        if info.type != want_type:
            return f"map {name}: kernel type {info.type}, expected {want_type}"
        if ringbuf and info.max_entries != ringbuf_pages * PAGE_SIZE:
            return (f"map {name}: {info.max_entries} bytes, expected "
                    f"{ringbuf_pages * PAGE_SIZE}")
        return None
    spec = MAPS.get(name)
    if spec is None:
        return f"map {name}: not in kvmtrace.contract.MAPS"
    want_type = {"BPF_HASH": BPF_MAP_TYPE_HASH, "BPF_ARRAY": BPF_MAP_TYPE_ARRAY,
                 "BPF_PERCPU_ARRAY": BPF_MAP_TYPE_PERCPU_ARRAY,
                 "BPF_PERCPU_HASH": BPF_MAP_TYPE_PERCPU_HASH,
                 "BPF_LRU_HASH": BPF_MAP_TYPE_LRU_HASH}[spec.macro]
    got = (info.type, info.key_size, info.value_size, info.max_entries)
    want = (want_type, spec.key_size, spec.value_size, expected_entries(name, counts_max))
    if got != want:
        return (f"map {name}: the kernel has (type, key size, value size, max entries) "
                f"{got}, kvmtrace.contract expects {want}")
    return None
