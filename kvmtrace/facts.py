"""Host facts: everything the probe plan depends on, read once from the host.

facts.py and access.py are the only modules that gather the host's facts: this one
(with kvmdev.py and evidence.py, which it calls) what the probe plan and the readiness
depend on, access.py what this process may do there (judged by kvmtrace.privileges).
The result is a plain dataclass that round-trips through JSON, so tests can hand the
planner the facts of other kernels (tests/kernels/*.json) without root.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmtrace import btf as btfmod
from kvmtrace import evidence as evidencemod
from kvmtrace import factsfile, kvmdev

# Functions of the seed's call chain, in call order. Any other
# "*_is_vm_type_supported" found in kallsyms is added after them.
IOCTL_FUNCTION = "kvm_dev_ioctl"
ARCH_INIT_FUNCTION = "kvm_arch_init_vm"
TYPE_CHECK_FUNCTIONS = (
    "kvm_is_vm_type_supported",
    "vmx_is_vm_type_supported",
    "svm_is_vm_type_supported",
)
TYPE_CHECK_PATTERN = re.compile(r"^\w+_is_vm_type_supported$")
# gcc clones: foo.isra.0, foo.constprop.0, foo.part.0, foo.cold
_CLONE = re.compile(r"^(?P<base>[^.]+)\.(?:isra|constprop|part|cold|lto_priv)(?:\.\d+)*$")

# Not functions but padding/CFI stubs before them (6.2+ call-depth tracking,
# kCFI): "__pfx_kvm_is_vm_type_supported" would match the pattern above.
_NOT_FUNCTIONS = ("__pfx_", "__cfi_")

IOCTL_TRACEPOINTS = ("syscalls:sys_enter_ioctl", "syscalls:sys_exit_ioctl")
# Following a process to its end (kvmtrace.plan: PROCESS_END, EXEC, ENCRYPT_OP).
EXIT_TRACEPOINT = "sched:sched_process_exit"  # every task's exit: the leader's ends it
SIGNAL_TRACEPOINT = "signal:signal_deliver"  # the signal that killed it
EXIT_GROUP_TRACEPOINT = "syscalls:sys_enter_exit_group"  # its exit status
EXEC_TRACEPOINTS = ("syscalls:sys_enter_execve", "syscalls:sys_enter_execveat")
# A start's KVM_RUN, where it returns to userspace (reason, errno): kvm.ko's.
RUN_TRACEPOINT = "kvm:kvm_userspace_exit"
FOLLOW_TRACEPOINTS = (EXIT_TRACEPOINT, SIGNAL_TRACEPOINT, EXIT_GROUP_TRACEPOINT,
                      *EXEC_TRACEPOINTS, RUN_TRACEPOINT)
# Kernel functions of the same, for kprobe hosts (no syscall tracepoint then): the
# execve syscall's entry under each architecture's syscall-wrapper prefix.
EXEC_FUNCTIONS = tuple(f"__{arch}_sys_{call}" for call in ("execve", "execveat")
                       for arch in ("x64", "arm64", "s390x", "riscv", "powerpc"))
GROUP_EXIT_FUNCTION = "do_exit"  # void do_exit(long code): the leader's, the group's code
# The VM and vCPU fds' ioctls, (filp, ioctl, arg), for KVM_MEMORY_ENCRYPT_OP and a
# start's other KVM ioctls on kprobe hosts: kvm_vm_ioctl sees every VM ioctl (the memory
# setup, KVM_CREATE_VCPU, and the architecture's through kvm_arch_vm_ioctl, the fallback
# where it is absent); kvm_arch_vcpu_ioctl the architecture's vCPU ioctls (not
# kvm_vcpu_ioctl: every KVM_RUN passes there).
VM_IOCTL_FUNCTIONS = ("kvm_vm_ioctl", "kvm_arch_vm_ioctl")
VCPU_IOCTL_FUNCTION = "kvm_arch_vcpu_ioctl"
# The confidential launch's own functions on current kernels (optional points).
LAUNCH_FUNCTIONS = ("sev_mem_enc_ioctl", "__sev_guest_init", "sev_asid_new",
                    "snp_launch_start", "tdx_vm_ioctl", "tdx_td_init", "svm_vm_init",
                    "vt_vm_init")
FACTS_MAX = 1 << 20  # bytes of a --dump-facts file (they are a few KiB)
TRACEFS_PATHS = ("/sys/kernel/debug/tracing", "/sys/kernel/tracing")  # bcc's order
VENDOR_MODULES = ("kvm_intel", "kvm_amd", "kvm_hv", "kvm_pr")


@dataclass(frozen=True)
class Symbol:
    name: str
    module: str | None = None  # None: built into vmlinux


@dataclass(frozen=True)
class Headers:
    path: str | None  # what /lib/modules/<release>/build (or BCC_KERNEL_SOURCE) points to
    release: str | None  # the release the headers were made for
    error: str | None = None


@dataclass(frozen=True)
class HostFacts:
    kernel_release: str
    arch: str
    # Relevant symbols found in /proc/kallsyms, by name.
    symbols: dict[str, Symbol] = field(default_factory=dict)
    # Compiler clones of relevant names (kvm_is_vm_type_supported.isra.0).
    clones: dict[str, list[str]] = field(default_factory=dict)
    # Relevant names in tracefs available_filter_functions; None: unreadable.
    traceable: list[str] | None = None
    kprobe_blacklist: list[str] = field(default_factory=list)
    kprobes: bool = False
    kprobes_detail: str = ""
    # "ok", or why BPF_PROG_TYPE_TRACING (fentry/fexit) cannot be used;
    # None: not probed (not needed, or no BTF).
    fentry: str | None = None
    btf: bool = False
    tracefs: str | None = None
    # Why tracefs is None when it is mounted but cannot be read (e.g. not root).
    tracefs_error: str | None = None
    tracepoints: list[str] = field(default_factory=list)
    ringbuf: bool = False
    # BPF task storage (5.11+, needs BTF for bpf_get_current_task_btf).
    task_storage: bool = False
    headers: Headers = field(default_factory=lambda: Headers(None, None))
    kvm: kvmdev.KvmInfo = field(default_factory=lambda: kvmdev.KvmInfo(present=False))
    vendor_modules: list[str] = field(default_factory=list)
    bcc_version: str | None = None
    is_root: bool = False
    # What the host says about each VM type's layers (kvmtrace.readiness); None in
    # facts files written before it was captured.
    evidence: evidencemod.Evidence | None = None
    # The kernel struct offsets a followed process's fd 2 is read at (kvmtrace.btf,
    # contract.STDERR_FIELDS), or why there are none.
    stderr_offsets: dict[str, int] | None = None
    stderr_offsets_error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> HostFacts:
        """Facts from their JSON form; ValueError naming the first field that is not
        what --dump-facts writes (TypeError for an unknown or missing field)."""
        factsfile.check(data)
        data = dict(data)
        data["symbols"] = {k: Symbol(**v) for k, v in data.get("symbols", {}).items()}
        if "headers" in data:
            data["headers"] = Headers(**data["headers"])
        if "kvm" in data:
            data["kvm"] = kvmdev.KvmInfo(**data["kvm"])
        if data.get("evidence") is not None:
            data["evidence"] = evidencemod.Evidence.from_json(data["evidence"])
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HostFacts:
        """Facts from a ``--dump-facts`` file: at most FACTS_MAX bytes of a JSON object
        (ValueError, TypeError or KeyError on anything else; OSError when unreadable)."""
        with open(path, "rb") as f:
            data = f.read(FACTS_MAX + 1)
        if len(data) > FACTS_MAX:
            raise ValueError(f"larger than {FACTS_MAX // 1024} KiB (a --dump-facts file is "
                             "a few KiB)")
        parsed = json.loads(data)
        if not isinstance(parsed, dict):
            raise ValueError("not a JSON object")
        return cls.from_json(parsed)


def kernel_version(release: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def read_kallsyms(text: str) -> tuple[dict[str, Symbol], dict[str, list[str]]]:
    """Relevant symbols (and their clones) from /proc/kallsyms text. Only the lines that
    hold a wanted name are split (found by str.find: about 200 of 150,000 lines), which
    under emulation saves seconds of every kvmtrace start."""
    wanted = {IOCTL_FUNCTION, ARCH_INIT_FUNCTION, *TYPE_CHECK_FUNCTIONS, GROUP_EXIT_FUNCTION,
              *VM_IOCTL_FUNCTIONS, VCPU_IOCTL_FUNCTION, *LAUNCH_FUNCTIONS, *EXEC_FUNCTIONS}
    lines: dict[int, int] = {}  # start -> end of each line holding a needle
    for needle in (*wanted, "_is_vm_type_supported"):
        i = text.find(needle)
        while i >= 0:
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            lines[text.rfind("\n", 0, i) + 1] = end
            i = text.find(needle, end)
    symbols: dict[str, Symbol] = {}
    clones: dict[str, list[str]] = {}
    for start in sorted(lines):
        parts = text[start:lines[start]].split()
        if len(parts) < 3 or parts[1] not in "tTwW" or parts[2].startswith(_NOT_FUNCTIONS):
            continue
        name, module = parts[2], parts[3].strip("[]") if len(parts) > 3 else None
        clone = _CLONE.match(name)
        base = clone.group("base") if clone else name
        if base not in wanted and not TYPE_CHECK_PATTERN.match(base):
            continue
        if clone:
            if not name.endswith(".cold"):
                clones.setdefault(base, []).append(name)
        else:
            symbols.setdefault(name, Symbol(name, module))
    return symbols, clones


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _find_tracefs(root: Path) -> tuple[str | None, str | None]:
    """(where tracefs is, None) or (None, why it cannot be read, None: not mounted)."""
    error = None
    for p in TRACEFS_PATHS:
        try:
            if (root / p.lstrip("/") / "events").is_dir():
                return p, None
        except PermissionError:
            error = error or (f"{p} is not readable: permission denied (tracefs is mode "
                              "0700: run as root, or with CAP_DAC_READ_SEARCH)")
        except OSError as exc:
            error = error or f"{p}: {exc.strerror}"
    return None, error


def _kprobes(root: Path, tracefs: str | None) -> tuple[bool, str]:
    pmu = root / "sys/bus/event_source/devices/kprobe"
    events = tracefs and (root / tracefs.lstrip("/") / "kprobe_events").exists()
    if pmu.exists() or events:
        return True, "kprobe PMU present" if pmu.exists() else "kprobe_events present"
    config = None
    try:
        with gzip.open(root / "proc/config.gz", "rt") as f:
            config = f.read()
    except OSError:
        pass
    if config is not None and "CONFIG_KPROBES=y" not in config:
        return False, "kernel built without CONFIG_KPROBES"
    if tracefs is None:
        return False, "no kprobe PMU, and tracefs is not mounted"
    return False, "no kprobe PMU and no kprobe_events in tracefs"


def _headers(root: Path, release: str) -> Headers:
    src = os.environ.get("BCC_KERNEL_SOURCE")
    build = Path(src) if src else root / "lib/modules" / release / "build"
    if not build.exists():
        return Headers(None, None, f"no kernel headers at {build}")
    resolved = build.resolve()
    # UTS_RELEASE is what the kernel built from these headers reports in uname
    # -r; Debian's include/config/kernel.release holds the upstream version.
    m = re.search(r'UTS_RELEASE\s+"([^"]+)"',
                  _read(resolved / "include/generated/utsrelease.h") or "")
    rel = m.group(1) if m else _read(resolved / "include/config/kernel.release")
    return Headers(str(resolved), rel.strip() if rel else None)


def probe_fentry(symbol: str) -> str:
    """Load an empty fexit program on ``symbol``: "ok" or the kernel's refusal.

    bcc prints the verifier's complaint on stderr; it is silenced here and the
    exception text is returned instead.
    """
    from bcc import BPF  # imported here: no work at import time

    text = f"KRETFUNC_PROBE({symbol}) {{ return 0; }}"
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        bpf = BPF(text=text.encode())
        bpf.cleanup()
        return "ok"
    except Exception as exc:  # bcc raises bare Exception
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "super-user" in msg or "not permitted" in msg.lower():
            return ("EPERM: the kernel refused to load a fentry/fexit "
                    "(BPF_PROG_TYPE_TRACING) program")
        return f"refused: {msg}"
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _traceable(root: Path, tracefs: str | None, symbols: dict[str, Symbol],
               clones: dict[str, list[str]]) -> list[str] | None:
    """The relevant names (and clones) in tracefs' available_filter_functions; None when
    it cannot be read."""
    if not tracefs:
        return None
    aff = _read(root / tracefs.lstrip("/") / "available_filter_functions")
    if aff is None:
        return None
    names = set(symbols) | {c for cs in clones.values() for c in cs}
    return sorted({ln.split()[0] for ln in aff.splitlines() if ln} & names)


def _kprobe_blacklist(root: Path, symbols: dict[str, Symbol]) -> list[str]:
    bl = _read(root / "sys/kernel/debug/kprobes/blacklist") or ""
    return sorted({ln.split()[-1] for ln in bl.splitlines() if ln.strip()} & set(symbols))


def _tracepoints(root: Path, tracefs: str | None) -> list[str]:
    """The tracepoints kvmtrace uses that tracefs has."""
    if not tracefs:
        return []
    out = []
    for tp in (*IOCTL_TRACEPOINTS, *FOLLOW_TRACEPOINTS):
        cat, ev = tp.split(":")
        if (root / tracefs.lstrip("/") / "events" / cat / ev / "format").exists():
            out.append(tp)
    return out


def _bcc_version() -> str | None:
    try:
        import bcc
    except ImportError:
        return None
    return getattr(bcc, "__version__", "unknown")


def _stderr_offsets(path: Path) -> tuple[dict[str, int] | None, str | None]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, f"no BTF at {path} (CONFIG_DEBUG_INFO_BTF is off)"
    except OSError as exc:
        return None, f"{path}: {exc.strerror or exc}"
    try:
        return btfmod.stderr_offsets(data), None
    except (btfmod.BtfError, struct.error) as exc:
        return None, f"{path}: {exc}"


def gather(root: str | os.PathLike = "/", probe_fentry_fn=probe_fentry) -> HostFacts:
    """Read the facts of the running host (``root`` lets tests use a fixture tree)."""
    root = Path(root)
    uname = platform.uname()
    release = (_read(root / "proc/sys/kernel/osrelease") or uname.release).strip()
    symbols, clones = read_kallsyms(_read(root / "proc/kallsyms") or "")
    tracefs, tracefs_error = _find_tracefs(root)
    kprobes, kprobes_detail = _kprobes(root, tracefs)
    btf = (root / "sys/kernel/btf/vmlinux").exists()
    is_root = os.geteuid() == 0
    fentry = None
    # fentry is only a fallback: probe it when kprobes are missing and a
    # built-in candidate exists, since the probe costs a compile.
    if not kprobes and btf and is_root:
        target = next((s.name for s in symbols.values() if s.module is None), None)
        if target:
            fentry = probe_fentry_fn(target)
    version = kernel_version(release)
    offsets, offsets_error = _stderr_offsets(root / "sys/kernel/btf/vmlinux")
    return HostFacts(
        kernel_release=release, arch=uname.machine, symbols=symbols, clones=clones,
        traceable=_traceable(root, tracefs, symbols, clones),
        kprobe_blacklist=_kprobe_blacklist(root, symbols),
        kprobes=kprobes, kprobes_detail=kprobes_detail, fentry=fentry, btf=btf,
        tracefs=tracefs, tracefs_error=tracefs_error,
        tracepoints=_tracepoints(root, tracefs),
        ringbuf=version >= (5, 8), task_storage=btf and version >= (5, 11),
        headers=_headers(root, release), kvm=kvmdev.query(str(root / "dev/kvm")),
        vendor_modules=sorted(m for m in VENDOR_MODULES if (root / "sys/module" / m).exists()),
        bcc_version=_bcc_version(), is_root=is_root,
        evidence=evidencemod.gather(root, release),
        stderr_offsets=offsets, stderr_offsets_error=offsets_error,
    )
