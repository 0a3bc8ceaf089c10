"""Readiness evidence: what the host says about each VM type's layers, read once.

Part of the host facts (:class:`kvmtrace.facts.HostFacts` ``evidence``): CPU vendor,
generation and flags, CPUID 0x8000001F (AMD memory encryption), KVM module
parameters, ``/dev/sev``, the misc cgroup's ASID/KeyID capacity and use, the kernel
config options, the kernel command line and the dmesg lines that explain them. Plain
data that round-trips through JSON (``doctor --dump-facts``, ``--facts``), so
:mod:`kvmtrace.readiness` judges other hosts' evidence without root. Only
:func:`gather` reads the machine; every read is bounded and every failure kept as a
reason instead of raised.
"""

from __future__ import annotations

import errno
import gzip
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# cpuinfo flags the chains read (the rest of the line is left out of the facts).
FLAGS = ("svm", "vmx", "hypervisor", "sme", "sev", "sev_es", "sev_snp",
         "tdx_host_platform", "tdx_guest", "npt", "ept")
# Module parameters the chains read: (module, parameter).
PARAMS = (("kvm", "tdp_mmu"), ("kvm", "enable_virt_at_load"),
          ("kvm_amd", "npt"), ("kvm_amd", "sev"), ("kvm_amd", "sev_es"),
          ("kvm_amd", "sev_snp"), ("kvm_intel", "ept"), ("kvm_intel", "tdx"))
# Kernel config options the chains read.
CONFIG = ("CONFIG_KVM_SW_PROTECTED_VM", "CONFIG_KVM_AMD_SEV", "CONFIG_INTEL_TDX_HOST",
          "CONFIG_KVM_INTEL_TDX", "CONFIG_AMD_MEM_ENCRYPT", "CONFIG_CRYPTO_DEV_SP_PSP")
# misc cgroup resources: SEV and SEV-ES ASIDs (SNP uses SEV-ES's), TDX KeyIDs.
MISC_RESOURCES = ("sev", "sev_es", "tdx")
CPUID_LEAF = 0x8000001F  # AMD memory encryption: EAX bit 0 SME, 1 SEV, 3 SEV-ES, 4 SNP
# dmesg lines kept: the layers of a confidential type and KVM's own refusals.
DMESG_PATTERN = re.compile(
    r"SEV|SNP|\bSME\b|\bRMP\b|tdx|TDX|KeyID|kvm_amd|kvm_intel|kvm:|\bccp\b|\bpsp\b|"
    r"AMD-Vi|memory encryption|(?:by|in) (?:the )?BIOS|BIOS (?:enabled|disabled)",
    re.IGNORECASE)
# Kernel command-line parameters kept (the rest may be private): the IOMMU, memory
# encryption and KVM's module parameters given at boot.
CMDLINE_PARAM = re.compile(
    r"^(?:iommu|amd_iommu|intel_iommu|mem_encrypt|nosme|nosev|kvm(?:_amd|_intel)?\.\w+)(?:=|$)")
DMESG_LINES = 200  # the last ones kept
DMESG_BYTES = 8 << 20  # read from /dev/kmsg at most
FILE_BYTES = 64 << 10  # read of one small file at most
CONFIG_BYTES = 4 << 20  # a kernel config (about 300 KiB)


@dataclass(frozen=True)
class Evidence:
    cpu_vendor: str | None = None  # vendor_id: AuthenticAMD, GenuineIntel
    cpu_family: int | None = None
    cpu_model: int | None = None
    cpu_model_name: str | None = None
    cpu_flags: list[str] = field(default_factory=list)  # those of FLAGS the CPU has
    cpuid_8000001f: int | None = None  # EAX of CPUID 0x8000001F; None: not read
    cpuid_error: str | None = None
    modules: list[str] = field(default_factory=list)  # loaded kvm* modules
    params: dict[str, str] = field(default_factory=dict)  # "kvm_amd.sev": "Y"
    dev_sev: bool = False
    misc_capacity: dict[str, int] | None = None  # None: not readable
    misc_current: dict[str, int] | None = None
    misc_error: str | None = None
    kernel_config: dict[str, str] | None = None  # CONFIG -> y/m/n; None: not found
    kernel_config_error: str | None = None
    cmdline: str | None = None  # the CMDLINE_PARAM parameters only
    dmesg: list[str] | None = None  # matching lines; None: not readable
    dmesg_error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> Evidence:
        """Evidence from its JSON form; ValueError naming the first bad field."""
        if not isinstance(data, dict):
            raise ValueError("field 'evidence' is not an object")
        unknown = set(data) - set(_CHECKS)
        if unknown:
            raise ValueError(f"field 'evidence' has unknown keys {sorted(unknown)}")
        for name, value in data.items():
            check, kind = _CHECKS[name]
            if not check(value):
                raise ValueError(f"field 'evidence.{name}' is not {kind}: {value!r:.60}")
        return cls(**data)


def _is_str(v) -> bool:
    return isinstance(v, str)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt(check):
    return lambda v: v is None or check(v)


def _strs(v) -> bool:
    return isinstance(v, list) and all(map(_is_str, v))


def _dict(check):
    return lambda v: isinstance(v, dict) and all(map(_is_str, v)) and all(
        map(check, v.values()))


_CHECKS = {
    "cpu_vendor": (_opt(_is_str), "a string or null"),
    "cpu_family": (_opt(_is_int), "an integer or null"),
    "cpu_model": (_opt(_is_int), "an integer or null"),
    "cpu_model_name": (_opt(_is_str), "a string or null"),
    "cpu_flags": (_strs, "a list of strings"),
    "cpuid_8000001f": (_opt(lambda v: _is_int(v) and 0 <= v < 2**32), "a u32 or null"),
    "cpuid_error": (_opt(_is_str), "a string or null"),
    "modules": (_strs, "a list of strings"),
    "params": (_dict(_is_str), "an object of strings"),
    "dev_sev": (lambda v: isinstance(v, bool), "true or false"),
    "misc_capacity": (_opt(_dict(_is_int)), "an object of integers or null"),
    "misc_current": (_opt(_dict(_is_int)), "an object of integers or null"),
    "misc_error": (_opt(_is_str), "a string or null"),
    "kernel_config": (_opt(_dict(_is_str)), "an object of strings or null"),
    "kernel_config_error": (_opt(_is_str), "a string or null"),
    "cmdline": (_opt(_is_str), "a string or null"),
    "dmesg": (_opt(_strs), "a list of strings or null"),
    "dmesg_error": (_opt(_is_str), "a string or null"),
}


# ---- parsers (pure) ---------------------------------------------------------------

def parse_cpuinfo(text: str) -> tuple[str | None, int | None, int | None, str | None,
                                      list[str]]:
    """(vendor, family, model, model name, the FLAGS it has) of the first CPU."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())

    def num(key: str) -> int | None:
        v = fields.get(key, "")
        return int(v) if v.isdigit() else None

    flags = set(fields.get("flags", "").split())
    return (fields.get("vendor_id"), num("cpu family"), num("model"),
            fields.get("model name"), [f for f in FLAGS if f in flags])


def parse_misc(text: str) -> dict[str, int]:
    """misc.capacity / misc.current: "sev 509\\nsev_es 0\\n" -> {"sev": 509, ...}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in MISC_RESOURCES and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def parse_config(text: str) -> dict[str, str]:
    """The CONFIG options of interest: y, m, or n for "is not set" / absent."""
    out = dict.fromkeys(CONFIG, "n")
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in out:
            out[key] = value.strip().strip('"')
    return out


def parse_kmsg(data: bytes) -> list[str]:
    """Matching messages of /dev/kmsg records ("pri,seq,ts,flags;text"), the last
    DMESG_LINES, as "[seconds] text"."""
    out = []
    for rec in data.split(b"\n"):
        if not rec or rec.startswith(b" "):  # continuation (dictionary) lines
            continue
        head, sep, msg = rec.partition(b";")
        if not sep:
            continue
        text = msg.decode("utf-8", "replace")
        if not DMESG_PATTERN.search(text):
            continue
        parts = head.split(b",")
        ts = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
        out.append(f"[{ts / 1e6:12.6f}] {text}"[:300])
    return out[-DMESG_LINES:]


# ---- reading the host ---------------------------------------------------------------

def _read(path: Path, limit: int = FILE_BYTES) -> tuple[str | None, str | None]:
    """(text, None) or (None, why not), reading at most ``limit`` bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace"), None
    except OSError as exc:
        return None, f"{path}: {exc.strerror or exc}"


def _cpuid(root: Path) -> tuple[int | None, str | None]:
    path = root / "dev/cpu/0/cpuid"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None, f"{path} missing (load the cpuid module: modprobe cpuid)"
        return None, f"{path}: {exc.strerror} (run as root)"
    try:
        data = os.pread(fd, 16, CPUID_LEAF)
    except OSError as exc:
        return None, f"{path}: CPUID {CPUID_LEAF:#x}: {exc.strerror}"
    finally:
        os.close(fd)
    if len(data) != 16:
        return None, f"{path}: short read"
    return int.from_bytes(data[:4], "little"), None


def _kmsg(root: Path) -> tuple[list[str] | None, str | None]:
    path = root / "dev/kmsg"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            return None, (f"{path}: {exc.strerror} (kernel.dmesg_restrict: run as root "
                          "to read the kernel log)")
        return None, f"{path}: {exc.strerror}"
    chunks, size = [], 0
    try:
        while size < DMESG_BYTES:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break  # the end of the log
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    continue  # a record overwritten while reading: the next one
                return None, f"{path}: {exc.strerror}"
            if not rec:
                break
            chunks.append(rec if rec.endswith(b"\n") else rec + b"\n")
            size += len(rec)
    finally:
        os.close(fd)
    return parse_kmsg(b"".join(chunks)), None


def _config(root: Path, release: str) -> tuple[dict[str, str] | None, str | None]:
    boot = root / "boot" / f"config-{release}"
    text, _ = _read(boot, CONFIG_BYTES)
    if text is not None:
        return parse_config(text), None
    gz = root / "proc/config.gz"
    try:
        with gzip.open(gz, "rb") as f:
            return parse_config(f.read(CONFIG_BYTES).decode("utf-8", "replace")), None
    except (OSError, EOFError) as exc:
        return None, f"neither {boot} nor {gz} readable ({getattr(exc, 'strerror', exc)})"


def gather(root: str | os.PathLike = "/", release: str | None = None) -> Evidence:
    """Read the running host's readiness evidence (``root``: a fixture tree)."""
    root = Path(root)
    release = release or os.uname().release
    text, _ = _read(root / "proc/cpuinfo", 1 << 20)
    vendor, family, model, model_name, flags = parse_cpuinfo(text or "")
    cpuid, cpuid_error = (None, "not an AMD CPU: CPUID 0x8000001F not read") \
        if vendor != "AuthenticAMD" else _cpuid(root)
    sysmod = root / "sys/module"
    try:
        modules = sorted(m for m in os.listdir(sysmod) if m == "kvm" or m.startswith("kvm_"))
    except OSError:
        modules = []
    params = {}
    for mod, name in PARAMS:
        value, _ = _read(sysmod / mod / "parameters" / name)
        if value is not None:
            params[f"{mod}.{name}"] = value.strip()
    cap, cap_err = _read(root / "sys/fs/cgroup/misc.capacity")
    cur, _ = _read(root / "sys/fs/cgroup/misc.current")
    config, config_error = _config(root, release)
    cmdline, _ = _read(root / "proc/cmdline")
    dmesg, dmesg_error = _kmsg(root)
    return Evidence(
        cpu_vendor=vendor, cpu_family=family, cpu_model=model, cpu_model_name=model_name,
        cpu_flags=flags, cpuid_8000001f=cpuid, cpuid_error=cpuid_error, modules=modules,
        params=params, dev_sev=(root / "dev/sev").exists(),
        misc_capacity=parse_misc(cap) if cap is not None else None,
        misc_current=parse_misc(cur) if cur is not None else None,
        misc_error=None if cap is not None else
        f"{cap_err} (the misc cgroup controller: cgroup v2, kernel 5.13+)",
        kernel_config=config, kernel_config_error=config_error,
        cmdline=" ".join(p for p in cmdline.split() if CMDLINE_PARAM.match(p))[:4096]
        if cmdline is not None else None,
        dmesg=dmesg, dmesg_error=dmesg_error)


class Refresher:
    """Evidence re-read at most every ``ttl`` seconds (serve: the readiness metrics).
    What a re-read cannot see any more (the kernel log or CPUID once the exporter
    dropped its capabilities) is kept from the last read that could."""

    def __init__(self, first: Evidence | None, ttl: float = 60.0,
                 read: Callable[[], Evidence] = gather,
                 clock: Callable[[], float] = time.monotonic):
        self._ev = first
        self._ttl = ttl
        self._read = read
        self._clock = clock
        self._at = clock() if first is not None else None
        self._lock = threading.Lock()

    def get(self) -> Evidence | None:
        with self._lock:
            now = self._clock()
            if self._at is not None and now - self._at < self._ttl:
                return self._ev
            self._at = now
            try:
                new = self._read()
            except Exception:  # whatever a read raised: keep the last evidence
                return self._ev
            old = self._ev
            if old is not None:
                keep = {}
                if new.dmesg is None and old.dmesg is not None:
                    keep.update(dmesg=old.dmesg, dmesg_error=None)
                if new.cpuid_8000001f is None and old.cpuid_8000001f is not None:
                    keep.update(cpuid_8000001f=old.cpuid_8000001f, cpuid_error=None)
                if keep:
                    new = replace(new, **keep)
            self._ev = new
            return new

