"""What a VMM process asked KVM for, read from its command line (/proc/PID/cmdline).

One table, ``VMMS``, says for each VMM how its binary is recognised, where the VM name
is and which flags ask for a confidential VM type. Each VMM's section cites the source its
flag spellings were checked against. Nothing here raises on a hostile command line: a value
that cannot be parsed becomes evidence, never an exception.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# Only this much of a command line is looked at (and read from /proc).
CMDLINE_LIMIT = 64 * 1024


@dataclass(frozen=True)
class VmmRequest:
    """What a VMM's command line asked for.

    ``requested_type`` is an x86 VM type name as in ``tables._X86_VM_TYPES`` ("DEFAULT",
    "SEV", "SEV_ES", "SNP", "TDX"), or None when the command line does not say. It names
    the confidential flavour asked for; ``evidence`` says where a VMM carries it on another
    KVM_CREATE_VM type (QEMU's legacy SEV on a DEFAULT VM, cloud-hypervisor's TDX as type 1).
    """

    kind: str  # "qemu", "cloud-hypervisor", "firecracker", "crosvm", "kvmtool", "unknown"
    name: str | None
    requested_type: str | None
    evidence: str  # one line: which flag(s) said so, or why it is not known

    def to_json(self) -> dict:
        return asdict(self)


NOT_KNOWN = VmmRequest("unknown", None, None, "no command line")


@dataclass(frozen=True)
class _Verdict:
    requested_type: str | None
    evidence: str
    # DEFAULT only because no flag asked for more: a cut-off command line cannot say that.
    by_absence: bool = False


def _quote(text: str) -> str:
    """Command-line text inside evidence: one line, bounded, control characters escaped."""
    return repr(text if len(text) <= 64 else text[:64] + "…")


def _split(text: str, escaped_commas: bool) -> list[str]:
    """Split option text at commas. QEMU writes a literal comma as ``,,``; cloud-hypervisor
    instead keeps commas inside ``"…"`` and ``[…]`` (its option_parser split_commas)."""
    parts: list[str] = []
    current: list[str] = []
    depth, quoted, i = 0, False, 0
    while i < len(text):
        c = text[i]
        i += 1
        if c == "," and escaped_commas and text.startswith(",", i):
            current.append(",")
            i += 1
        elif c == "," and not quoted and depth <= 0:
            parts.append("".join(current))
            current = []
        else:
            if not escaped_commas and c == '"':
                quoted = not quoted
            elif not escaped_commas and not quoted and c in "[]":
                depth += 1 if c == "[" else -1
            current.append(c)
    parts.append("".join(current))
    return parts


def _keyval(text: str, implied: str | None) -> dict[str, str]:
    """QEMU keyval / QemuOpts text: ``key=value`` pairs; a first item without ``=`` is the
    value of ``implied``; later keys win (util/keyval.c, util/qemu-option.c)."""
    out: dict[str, str] = {}
    for index, item in enumerate(_split(text, escaped_commas=True)):
        key, eq, value = item.partition("=")
        if eq:
            out[key] = value
        elif index == 0 and implied is not None:
            out[implied] = item
    return out


def _values(argv: Sequence[str], flags: tuple[str, ...], equals: bool) -> list[str]:
    """Values of ``flags`` given as ``FLAG VALUE`` (or ``FLAG=VALUE`` when ``equals``),
    in order; the value of one flag is never read as another flag."""
    found: list[str] = []
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            break
        if arg in flags and i + 1 < len(argv):
            found.append(argv[i + 1])
            i += 2
            continue
        name, eq, value = arg.partition("=")
        if equals and eq and name in flags:
            found.append(value)
        i += 1
    return found


# --- QEMU: system/vl.c, qemu-options.hx, target/i386/sev.c, target/i386/kvm/tdx.c ---

_QEMU_OPTIONS = ("name", "machine", "M", "object")
# -machine keys that name the confidential-guest-support object (hw/core/machine.c keeps
# memory-encryption as the older spelling of the same link).
_QEMU_CGS_KEYS = ("confidential-guest-support", "memory-encryption")
_QEMU_CGS_TYPES: Mapping[str, str] = {"sev-snp-guest": "SNP", "tdx-guest": "TDX"}
_SEV_POLICY_ES = 0x4  # target/i386/sev.c SEV_POLICY_ES; DEFAULT_GUEST_POLICY is 0x1
# What sev-guest's legacy-vm-type (QEMU 9.0+) makes of the KVM_CREATE_VM type.
_SEV_LEGACY_NOTES: Mapping[str, str] = {
    "on": "; legacy-vm-type=on: QEMU creates a DEFAULT VM (legacy KVM_SEV_INIT)",
    "off": "; legacy-vm-type=off: QEMU needs the SEV VM type",
}
_SEV_LEGACY_AUTO = ("; QEMU may still create a DEFAULT VM for it (legacy KVM_SEV_INIT; "
                    "legacy-vm-type=auto)")


@dataclass(frozen=True)
class _QemuArgs:
    name: dict[str, str]
    machine: dict[str, str]
    objects: dict[str, dict[str, object]]
    unparsed_objects: int
    bad_syntax: str | None  # an "-opt=value" argument: QEMU rejects it ("invalid option")


def _qemu_object(text: str) -> dict[str, object] | None:
    """One -object: JSON when it starts with '{' (libvirt >= 7), else keyval. QEMU's JSON
    parser also takes 'single-quoted' strings (qobject/json-lexer.c), as Python's str() of
    a dict writes them; those are read when the text has no double quote at all."""
    if not text.startswith("{"):
        return dict(_keyval(text, "qom-type"))
    candidates = [text] if '"' in text else [text, text.replace("'", '"')]
    for candidate in candidates:
        try:
            parsed = json.loads(candidate)
        except (ValueError, RecursionError):  # deep nesting raises RecursionError
            continue
        return parsed if isinstance(parsed, dict) else None
    return None


def _qemu_args(argv: Sequence[str]) -> _QemuArgs:
    # vl.c lookup_opt: "-opt" or "--opt", the value always the next argument.
    name: dict[str, str] = {}
    machine: dict[str, str] = {}
    objects: dict[str, dict[str, object]] = {}
    unparsed, bad = 0, None
    i = 1
    while i < len(argv):
        arg = argv[i]
        opt = arg[2:] if arg.startswith("--") else arg[1:] if arg.startswith("-") else ""
        if opt in _QEMU_OPTIONS and i + 1 < len(argv):
            value = argv[i + 1]
            if opt == "name":
                name.update(_keyval(value, "guest"))
            elif opt in ("machine", "M"):
                machine.update(_keyval(value, "type"))
            else:
                obj = _qemu_object(value)
                if obj is None:
                    unparsed += 1
                elif isinstance(obj.get("id"), str):
                    objects[str(obj["id"])] = obj
            i += 2
            continue
        if opt.partition("=")[0] in _QEMU_OPTIONS and "=" in opt and bad is None:
            bad = arg
        i += 1
    return _QemuArgs(name, machine, objects, unparsed, bad)


def _c_uint(value: object) -> int | None:
    """A QEMU integer property: a JSON number, or text in C notation (0x.., 0.., decimal)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    text = str(value).strip().lower()
    if not (text.isascii() and text.isalnum()):  # no sign, "_" or space, as parse_uint
        return None
    try:
        if text.startswith("0x"):
            return int(text[2:], 16)
        return int(text, 8) if len(text) > 1 and text.startswith("0") else int(text, 10)
    except ValueError:  # also a number too long for int()
        return None


def _sev_guest(cgs: str, obj: Mapping[str, object]) -> _Verdict:
    policy = _c_uint(obj.get("policy", 1))
    if policy is None:
        return _Verdict(None, f"sev-guest {_quote(cgs)} has policy "
                              f"{_quote(str(obj.get('policy')))}, not a number")
    es = bool(policy & _SEV_POLICY_ES)
    legacy = str(obj.get("legacy-vm-type", "auto")).lower()
    legacy = {"true": "on", "false": "off"}.get(legacy, legacy)
    evidence = (f"confidential-guest-support={_quote(cgs)} is a sev-guest with policy "
                f"{policy:#x}{' (bit 2: SEV-ES)' if es else ''}"
                f"{_SEV_LEGACY_NOTES.get(legacy, _SEV_LEGACY_AUTO)}")
    return _Verdict("SEV_ES" if es else "SEV", evidence)


def _qemu_name(argv: Sequence[str]) -> str | None:
    return _qemu_args(argv).name.get("guest") or None


def _qemu_type(argv: Sequence[str]) -> _Verdict:
    args = _qemu_args(argv)
    if args.bad_syntax is not None:
        return _Verdict(None, f"{_quote(args.bad_syntax)} is not QEMU syntax: QEMU exits "
                              "with 'invalid option' (an option's value is the next argument)")
    cgs = next((args.machine[k] for k in _QEMU_CGS_KEYS if args.machine.get(k)), None)
    if cgs is None:
        return _Verdict("DEFAULT", "no confidential-guest-support", by_absence=True)
    obj = args.objects.get(cgs)
    if obj is None:
        unparsed = f" ({args.unparsed_objects} -object not parsed)" if args.unparsed_objects else ""
        return _Verdict(None, f"confidential-guest-support={_quote(cgs)} names no -object "
                              f"on the command line{unparsed}")
    qom = str(obj.get("qom-type"))
    if qom == "sev-guest":
        return _sev_guest(cgs, obj)
    if qom in _QEMU_CGS_TYPES:
        return _Verdict(_QEMU_CGS_TYPES[qom],
                        f"confidential-guest-support={_quote(cgs)} is a {qom}")
    return _Verdict(None, f"confidential-guest-support={_quote(cgs)} is a {_quote(qom)} "
                          "object, not an x86 confidential guest")


# --- cloud-hypervisor: cloud-hypervisor/src/main.rs (clap), vmm/src/config.rs
# PlatformConfig, hypervisor/src/kvm/mod.rs create_vm ---

# option_parser Toggle (compared lower-cased); an absent key is off.
_CH_TOGGLES: Mapping[str, bool] = {"on": True, "true": True, "off": False, "false": False,
                                   "": False}
_CH_PLATFORM: tuple[tuple[str, str, str], ...] = (
    # checked in this order: create_vm lets tdx override sev_snp
    ("tdx", "TDX", " (cloud-hypervisor passes VM type 1, its pre-upstream TDX number, "
                   "to KVM_CREATE_VM)"),
    ("sev_snp", "SNP", ""),
)


def _ch_type(argv: Sequence[str]) -> _Verdict:
    platforms = _values(argv, ("--platform",), equals=True)  # clap: one --platform
    items = {key: value.strip() for key, _, value in
             (item.partition("=") for item in _split(platforms[-1] if platforms else "", False))}
    for key, vm_type, note in _CH_PLATFORM:
        raw = items.get(key, "")
        if raw.lower() not in _CH_TOGGLES:
            return _Verdict(None, f"--platform {key}={_quote(raw)}: cloud-hypervisor "
                                  "rejects the value")
        if _CH_TOGGLES[raw.lower()]:
            return _Verdict(vm_type, f"--platform {key}={raw}{note}")
    return _Verdict("DEFAULT", "no --platform tdx=on or sev_snp=on", by_absence=True)


# --- firecracker: src/firecracker/src/main.rs, src/utils/src/arg_parser.rs (no "=" form),
# src/vmm/src/vstate/vm.rs (create_vm: type 0 on x86) ---

def _firecracker_name(argv: Sequence[str]) -> str | None:
    ids = [v for v in _values(argv, ("--id",), equals=False) if not v.startswith("--")]
    return ids[-1] if ids else None


def _always_default(kind: str) -> Callable[[Sequence[str]], _Verdict]:
    def verdict(argv: Sequence[str]) -> _Verdict:
        return _Verdict("DEFAULT", f"{kind} has no flag for a confidential VM type")

    return verdict


# --- crosvm: src/crosvm/cmdline.rs (argh: exact flags, value next), hypervisor/src/kvm/
# aarch64.rs and x86_64.rs get_vm_type ---

_CROSVM_PROTECTED = ("--protected-vm", "--protected-vm-without-firmware",
                     "--protected-vm-with-firmware")


def _crosvm_type(argv: Sequence[str]) -> _Verdict:
    options = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    flag = next((a for a in options if a in _CROSVM_PROTECTED), None)
    if flag is None:
        return _Verdict("DEFAULT", "no --protected-vm", by_absence=True)
    return _Verdict(None, f"{flag}: an arm64 pKVM protected VM (KVM_VM_TYPE_ARM_PROTECTED; "
                          "on x86 crosvm asks for the out-of-tree type 28), no x86 VM type")


def _last(flag: str, equals: bool) -> Callable[[Sequence[str]], str | None]:
    def name(argv: Sequence[str]) -> str | None:
        found = _values(argv, (flag,), equals)
        return found[-1] if found else None

    return name


def _no_name(argv: Sequence[str]) -> str | None:
    return None


def _basename(argv0: str) -> str:
    return argv0.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class _Vmm:
    kind: str
    binary: Callable[[str], bool]  # recognises argv[0]'s basename
    name: Callable[[Sequence[str]], str | None]
    requested: Callable[[Sequence[str]], _Verdict]


# The one table. kvmtool: builtin-run.c (--name; parse-options also takes --name=NAME),
# kvm.c kvm__get_vm_type (0 on x86).
VMMS: tuple[_Vmm, ...] = (
    _Vmm("qemu", lambda b: b.startswith("qemu-system-") or b in ("qemu-kvm", "kvm"),
         _qemu_name, _qemu_type),
    _Vmm("cloud-hypervisor",
         lambda b: b == "cloud-hypervisor" or b.startswith("cloud-hypervisor-static"),
         _no_name, _ch_type),
    _Vmm("firecracker", lambda b: b == "firecracker", _firecracker_name,
         _always_default("firecracker")),
    _Vmm("crosvm", lambda b: b == "crosvm", _last("--name", equals=False), _crosvm_type),
    _Vmm("kvmtool", lambda b: b == "lkvm", _last("--name", equals=True),
         _always_default("kvmtool")),
)


def _bounded(argv: Sequence[str]) -> tuple[list[str], bool]:
    """The arguments that fit in CMDLINE_LIMIT bytes (as /proc counts them), and whether
    any were left out."""
    kept: list[str] = []
    size = 0
    for arg in argv:
        size += len(arg) + 1
        if size > CMDLINE_LIMIT:
            return kept or [arg[:CMDLINE_LIMIT]], True
        kept.append(arg)
    return kept, False


def _request(argv: Sequence[str], truncated: bool) -> VmmRequest:
    if not argv or not argv[0]:
        return VmmRequest("unknown", None, None, "empty command line: a kernel thread, or "
                                                 "a process that had exited")
    base = _basename(argv[0])
    vmm = next((row for row in VMMS if row.binary(base)), None)
    if vmm is None:
        return VmmRequest("unknown", None, None, f"unknown VMM: no flag table for {_quote(base)}")
    verdict = vmm.requested(argv)
    vm_type, evidence = verdict.requested_type, verdict.evidence
    if truncated and verdict.by_absence:
        vm_type = None
        evidence += " in the part read, but the command line was cut short"
    elif truncated:
        evidence += " (command line cut short)"
    return VmmRequest(vmm.kind, vmm.name(argv), vm_type, evidence)


def parse_argv(argv: Sequence[str]) -> VmmRequest:
    """What a VMM started with ``argv`` asked for (only its first 64 KiB are looked at)."""
    kept, truncated = _bounded([str(a) for a in argv[: CMDLINE_LIMIT + 1]])
    return _request(kept, truncated)


def parse_cmdline(raw: bytes) -> VmmRequest:
    """``parse_argv`` of /proc/PID/cmdline contents: NUL-separated, maybe cut short (no
    final NUL, or CMDLINE_LIMIT bytes or more: the last argument may be partial and is
    dropped), maybe not UTF-8."""
    if not raw:
        return _request([], truncated=False)
    truncated = len(raw) >= CMDLINE_LIMIT or not raw.endswith(b"\0")
    argv = raw[:CMDLINE_LIMIT].decode("utf-8", errors="replace").split("\0")
    if len(argv) > 1:
        argv.pop()  # the empty string after the final NUL, or a partial last argument
    return _request(argv, truncated)


def read_cmdline(pid: int, proc: Path = Path("/proc")) -> bytes | None:
    """The first CMDLINE_LIMIT bytes of /proc/PID/cmdline; None when the process is gone
    or unreadable."""
    try:
        with open(proc / str(pid) / "cmdline", "rb") as f:
            return f.read(CMDLINE_LIMIT)
    except OSError:
        return None
