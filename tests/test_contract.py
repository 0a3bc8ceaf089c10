"""kvmtrace/contract.py and kvmtrace/programs.py against bpf/kvmtrace.bpf.c: the two
sides of every shared layout and name.

Parses the C (no compiler, no root): the structs the kernel writes and Python reads,
the declarations of the maps, every define the C uses without defining it or tests with
#ifdef, and its programs (the ones it declares and the ones its FN_* macros write);
each must be the contract's, and each of the contract's must be in the C. The
privileged tier checks the same maps as the kernel reports them (kvmtrace.reader.Reader
refuses a map that differs).
"""

from __future__ import annotations

import ast
import ctypes
import dataclasses
import re
import struct

import pytest

from kvmtrace import contract, loader, programs
from kvmtrace import plan as planmod
from kvmtrace.facts import HostFacts
from tests.conftest import HERE, KERNELS, with_follow_points

C = loader.bpf_source()
# C type -> (struct format character, size); char[TASK_COMM_LEN] is a fixed string.
C_TYPES = {"u16": ("H", 2), "u32": ("I", 4), "u64": ("Q", 8), "s64": ("q", 8),
           "char[TASK_COMM_LEN]": (f"{contract.TASK_COMM_LEN}s", contract.TASK_COMM_LEN),
           "char[EXEC_ARGS_BYTES]": (f"{contract.EXEC_ARGS_BYTES}s", contract.EXEC_ARGS_BYTES),
           "char[STDERR_NAMES_BYTES]": (f"{contract.STDERR_NAMES_BYTES}s",
                                        contract.STDERR_NAMES_BYTES)}


def _without_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def c_struct(name: str) -> list[tuple[str, str]]:
    """(type, field) of ``struct name { ... };`` in the C."""
    m = re.search(rf"struct {name} \{{(.*?)\n\}};", C, re.S)
    assert m, f"struct {name} not found in bpf/kvmtrace.bpf.c"
    fields = []
    for decl in _without_comments(m.group(1)).split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        fm = re.fullmatch(r"(\w+) (\w+)(\[\w+\])?", decl)
        assert fm, f"struct {name}: cannot read {decl!r}"
        fields.append((fm.group(1) + (fm.group(3) or ""), fm.group(2)))
    return fields


def c_layout(fields: list[tuple[str, str]]) -> tuple[str, int]:
    """The struct format and size the C compiler gives these fields (natural alignment,
    as on every architecture bcc targets)."""
    fmt, offset, align = "<", 0, 1
    for ctype, _ in fields:
        char, size = C_TYPES[ctype]
        a = 1 if ctype.startswith("char") else size
        pad = -offset % a
        fmt += "x" * pad + char
        offset += pad + size
        align = max(align, a)
    fmt += "x" * (-offset % align)
    return fmt, offset + (-offset % align)


@pytest.mark.parametrize("name", sorted(contract.STRUCTS))
def test_struct_fields_are_the_contracts(name):
    assert c_struct(name) == list(contract.STRUCTS[name])


@pytest.mark.parametrize("name", sorted(contract.STRUCTS))
def test_struct_formats_have_the_c_layout(name):
    fmt, size = c_layout(c_struct(name))
    assert struct.calcsize(fmt) == size
    # Field by field (padding included): the format the reader unpacks with.
    assert contract.STRUCT_FORMATS[name].format == fmt
    assert contract.STRUCT_FORMATS[name].size == size


def test_the_ctypes_key_is_the_struct_format():
    key = contract.CountKey(tgid=7, probe=3, vm_type=2**32 + 1, result=-22, verdicts=5,
                            comm=b"qemu\x07x")
    assert ctypes.sizeof(contract.CountKey) == contract.COUNT_KEY.size
    fields = contract.COUNT_KEY.unpack(bytes(key))
    assert fields[:5] == (7, 3, 2**32 + 1, -22, 5)
    assert fields[6].split(b"\0", 1)[0] == key.comm == b"qemu\x07x"
    names = [n for _, n in contract.STRUCTS["count_key"]]
    assert [f[0] for f in contract.CountKey._fields_] == names


def c_maps() -> dict[str, tuple[str, list[str]]]:
    """name -> (macro, arguments) of every BPF_* map declaration in the C."""
    out = {}
    for m in re.finditer(r"^(BPF_\w+)\((\w+)(?:, ([^;]*))?\);", _without_comments(C), re.M):
        out[m.group(2)] = (m.group(1), [a.strip() for a in (m.group(3) or "").split(",")])
    return out


@pytest.mark.parametrize("name", sorted(contract.MAPS))
def test_every_read_map_is_declared_as_the_contract_says(name):
    spec = contract.MAPS[name]
    maps = c_maps()
    assert name in maps, f"{name} is not declared in bpf/kvmtrace.bpf.c"
    macro, args = maps[name]
    want = [a for a in (spec.key, spec.value, spec.entries) if a is not None]
    assert (macro, args) == (spec.macro, want)
    for ctype, size in ((spec.key, spec.key_size), (spec.value, spec.value_size)):
        if ctype is None:
            continue
        want = contract.STRUCT_FORMATS[ctype.split()[-1]].size if ctype.startswith("struct") \
            else C_TYPES[ctype][1]
        assert size == want, (ctype, size, want)


def test_the_event_map_is_declared_for_both_buffers():
    text = _without_comments(C)
    assert f"BPF_RINGBUF_OUTPUT({contract.EVENTS_MAP}, RINGBUF_PAGES);" in text
    assert f"BPF_PERF_OUTPUT({contract.EVENTS_MAP});" in text
    assert set(contract.READ_MAPS) <= set(c_maps()) | {contract.EVENTS_MAP}


def test_health_and_latency_indices_are_the_contracts():
    text = _without_comments(C)
    used = set(re.findall(r"health_inc\((HEALTH_\w+)\)", text))
    assert used == {f"HEALTH_{n.upper()}" for n in contract.HEALTH}
    assert "outcome * LATENCY_SLOTS + (bpf_log2l(ns) & (LATENCY_SLOTS - 1))" in text
    assert contract.latency_slot(contract.latency_index(1, 17)) == (1, 17)
    assert contract.LATENCY_SLOTS == 64  # bpf_log2l of a u64


def _defined_in_c() -> set[str]:
    return set(re.findall(r"^#define (\w+)", C, re.M))


def _knobs_in_c() -> set[str]:
    """Names the C tests with #ifdef / #ifndef / #if / #elif: optional by design."""
    out = set()
    for expr in re.findall(r"^[ \t]*#[ \t]*(?:ifdef|ifndef|if|elif)\b(.*)$",
                           _without_comments(C), re.M):
        out |= set(re.findall(r"[A-Za-z_]\w*", expr)) - {"defined"}
    return out


def _used_in_c() -> set[str]:
    text = _without_comments(C)
    words = set(re.findall(r"\b([A-Z][A-Z0-9_]{2,})\b", text))
    bcc = {"BPF_HASH", "BPF_ARRAY", "BPF_PERCPU_ARRAY", "BPF_TASK_STORAGE", "BPF_TABLE",
           "BPF_PERCPU_HASH",
           "BPF_RINGBUF_OUTPUT", "BPF_PERF_OUTPUT", "BPF_RB_NO_WAKEUP", "BPF_RB_FORCE_WAKEUP",
           "BPF_LOCAL_STORAGE_GET_F_CREATE", "TRACEPOINT_PROBE",
           "KFUNC_PROBE", "KRETFUNC_PROBE", "PT_REGS_RC", "SPDX", "GPL", "ARGN", "RET_T",
           "FN_KPROBE", "FN_FEXIT_ARCH_INIT_VM", "FN_FEXIT_TYPE_CHECK", "FN"}
    return {w for w in words if w not in bcc and w not in _knobs_in_c()
            and not w.startswith("PT_REGS_PARM")}


def test_every_define_the_c_tests_is_a_contract_feature_and_back():
    tested = _knobs_in_c()
    unknown = tested - set(contract.FEATURES)
    assert not unknown, f"bpf/kvmtrace.bpf.c tests {sorted(unknown)}: not in contract.FEATURES"
    unused = set(contract.FEATURES) - tested
    assert not unused, f"contract.FEATURES has {sorted(unused)}: bpf/kvmtrace.bpf.c never tests it"
    assert "BENCH" not in C, "benchmark knobs belong in bench/overlay.py, not the product's C"


def test_the_kernel_offsets_the_c_reads_are_the_contracts():
    used = {w for w in _used_in_c() if w.startswith(contract.OFFSET_PREFIX)}
    assert used == {contract.OFFSET_PREFIX + k for k in contract.STDERR_FIELDS}, used


def test_every_define_the_c_uses_is_given_by_the_loader():
    facts = dataclasses.replace(  # with BTF offsets (made up: only their names matter)
        with_follow_points(HostFacts.load(KERNELS / "seed-tdx-v12-kprobes.json")),
        stderr_offsets={k: 8 * i for i, k in enumerate(contract.STDERR_FIELDS)})
    text = loader.build_text(planmod.make_plan(facts), loader.Options())
    assert f"#define {contract.STDERR_CAPTURE} 1" in text
    given = set(re.findall(r"^#define (\w+)", text.split(C, 1)[0], re.M))
    missing = _used_in_c() - _defined_in_c() - given
    assert not missing, f"bpf/kvmtrace.bpf.c uses {sorted(missing)}, which nobody defines"
    # And the contract's own defines are exactly what the C uses of them.
    ours = set(contract.defines(1, 1, 1))
    assert ours <= _used_in_c(), f"defined but unused: {sorted(ours - _used_in_c())}"


def _info(name, **over):
    spec = contract.MAPS[name]
    types = {"BPF_HASH": 1, "BPF_ARRAY": 2, "BPF_PERCPU_HASH": 5, "BPF_PERCPU_ARRAY": 6,
             "BPF_LRU_HASH": 9}
    base = dict(type=types[spec.macro], key_size=spec.key_size, value_size=spec.value_size,
                max_entries=contract.expected_entries(name, 10240))
    return contract.MapInfo(**{**base, **over})


def test_check_map_names_what_differs():
    for name in contract.MAPS:
        assert contract.check_map(name, _info(name), 10240, True, 64) is None
    problem = contract.check_map("counts", _info("counts", key_size=40), 10240, True, 64)
    assert problem and "\n" not in problem and "counts" in problem and "40" in problem
    assert contract.check_map("health", _info("health", max_entries=3), 10240, True, 64)
    rb = contract.MapInfo(contract.BPF_MAP_TYPE_RINGBUF, 0, 0, 64 * 4096)
    assert contract.check_map("events", rb, 10240, True, 64) is None
    assert contract.check_map("events", rb, 10240, False, 64)
    assert contract.check_map("events", rb, 10240, True, 32)


# ---- every map of the C ------------------------------------------------------------


def c_map_names() -> set[str]:
    """The name of every map the C declares at its top level: BPF_<KIND>(name, ...), or
    BPF_TABLE(type, key, leaf, name, ...) and its kin."""
    out = set()
    for macro, args in re.findall(r"^(BPF_\w+)\(([^;]*)\);", _without_comments(C), re.M):
        args = [a.strip() for a in args.split(",")]
        name = args[3] if "TABLE" in macro else args[0]
        assert re.fullmatch(r"\w+", name), f"cannot read the map name of {macro}({args})"
        out.add(name)
    return out


def test_every_map_of_the_c_is_the_contracts_and_back():
    declared = c_map_names()
    unknown = declared - set(contract.ALL_MAPS)
    assert not unknown, (f"bpf/kvmtrace.bpf.c declares maps {sorted(unknown)} that "
                         f"kvmtrace/contract.py does not name (MAPS or PRIVATE_MAPS)")
    missing = set(contract.ALL_MAPS) - declared
    assert not missing, f"kvmtrace/contract.py names maps {sorted(missing)} the C lacks"


# ---- every program of the C --------------------------------------------------------


def c_programs() -> set[str]:
    """Every program the C declares by itself, spelled as kvmtrace.programs spells them:
    a non-static top-level function (bcc loads each as a program: int NAME(struct
    pt_regs *ctx, ...), syscall__*), or a bcc probe macro at the top level with its
    first arguments (TRACEPOINT_PROBE(category, event), KFUNC_PROBE(function), ...)."""
    text = _without_comments(C)
    out = set()
    for name in re.findall(r"^(?!static\b)(?:\w+[ \t]+)+\**(\w+)\s*\([^;{]*\)\s*\{", text, re.M):
        out.add(name)
    for macro, first, second in re.findall(
            r"^([A-Z][A-Z0-9_]*_PROBE|KMOD_RET)\(\s*(\w+)(?:\s*,\s*(\w+))?", text, re.M):
        out.add(f"{macro}({first}, {second})" if macro == programs.TRACEPOINT_PROBE
                else f"{macro}({first})")
    return out


def c_fn_macros() -> dict[str, set[str]]:
    """FN_* macro -> the programs its body writes, spelled as kvmtrace.programs spells
    them: "{id}" for its first parameter, "{target}" for the function it is given."""
    out = {}
    for name, params, body in re.findall(r"^#define (FN_\w+)\(([^)]*)\)((?:[^\n]*\\\n)*[^\n]*)",
                                         C, re.M):
        params = [p.strip() for p in params.split(",")]
        made = {fn.replace(f"##{params[0]}", "{id}")
                for fn in re.findall(r"\bint ([\w#]+)\(struct pt_regs", body)}
        for macro, arg in re.findall(r"\b([A-Z][A-Z0-9_]*_PROBE)\((\w+)", body):
            arg = "{id}" if arg == params[0] else "{target}" if arg in params else arg
            made.add(f"{macro}({arg})")
        out[name] = made
    return out


def test_every_contract_program_is_in_the_c():
    missing = programs.c_programs() - c_programs()
    assert not missing, (f"kvmtrace/programs.py names programs bpf/kvmtrace.bpf.c does not "
                         f"declare: {sorted(missing)}")


def test_every_program_of_the_c_is_the_contracts():
    unknown = c_programs() - programs.c_programs()
    assert not unknown, (f"bpf/kvmtrace.bpf.c declares programs kvmtrace/programs.py does "
                         f"not know: {sorted(unknown)}")


def test_every_fn_macro_writes_the_programs_the_contract_says():
    macros = c_fn_macros()
    assert set(macros) == set(programs.FN_MACROS), (sorted(macros), sorted(programs.FN_MACROS))
    for name, progs in programs.FN_MACROS.items():
        want = {p.c_spelling() for p in progs}
        assert macros[name] == want, (f"bpf/kvmtrace.bpf.c: {name} writes "
                                      f"{sorted(macros[name])}, kvmtrace/programs.py says "
                                      f"{sorted(want)}")
    # Every line the loader writes calls a macro of the C with its number of arguments.
    arity = {n: len(p.split(",")) for n, p in re.findall(r"^#define (FN_\w+)\(([^)]*)\)", C, re.M)}
    for line in programs.FN_LINES.values():
        assert line.count(",") + 1 == arity[programs.fn_macro(line)], line


def test_every_mechanism_the_plan_can_choose_has_programs():
    plans = [planmod.make_plan(f) for f in _facts()]
    for p in (p for plan in plans for p in plan.points if p.planned):
        assert programs.of(p), p.name
    got = {(programs.key(p), p.mechanism) for plan in plans for p in plan.points if p.planned}
    assert got == set(programs.PROGRAMS), set(programs.PROGRAMS) ^ got


def _facts() -> list[HostFacts]:
    """Captured kernels, with the process-following points, and a fentry-only host with
    function points (kvm_arch_init_vm, a type check) it can fentry."""
    import dataclasses

    from kvmtrace.facts import Symbol

    out = []
    for path in sorted(KERNELS.glob("*.json")):
        facts = HostFacts.load(path)
        out += [facts, with_follow_points(facts)]
    fentry = HostFacts.load(KERNELS / "fentry-only-constructed.json")
    out.append(dataclasses.replace(fentry, traceable=None, symbols={
        **fentry.symbols, **{n: Symbol(n, None) for n in (
            "kvm_arch_init_vm", "vmx_is_vm_type_supported")}}))
    # Each with BTF offsets too (made up: the plan only asks whether there are some).
    offsets = {k: 8 * i for i, k in enumerate(contract.STDERR_FIELDS)}
    return out + [dataclasses.replace(f, stderr_offsets=offsets) for f in out]


class _FakeBPF:
    """What the loader calls on a bcc BPF object to attach, recorded."""

    def __init__(self):
        self.attached: list[tuple[str, str, str]] = []

    def attach_kprobe(self, event: bytes, fn_name: bytes) -> None:
        self.attached.append(("kprobe", event.decode(), fn_name.decode()))

    def attach_kretprobe(self, event: bytes, fn_name: bytes) -> None:
        self.attached.append(("kretprobe", event.decode(), fn_name.decode()))


def test_the_loader_attaches_programs_the_c_has():
    """Every program the loader attaches by name is a function of the C, or one an FN_*
    line of the text it compiles writes (expanded with the C's own macro bodies)."""
    bodies = c_fn_macros()
    for facts in _facts():
        plan = planmod.make_plan(facts)
        text = loader.build_text(plan, loader.Options())
        written = set()
        for macro, args in re.findall(r"^(FN_\w+)\(([^)]*)\)$", text.split(C, 1)[1], re.M):
            args = [a.strip() for a in args.split(",")]
            written |= {fn.format(id=args[0], target=args[-1]) for fn in bodies[macro]}
        bpf = _FakeBPF()
        for p in plan.points:
            if p.planned and p.mechanism != planmod.Mechanism.TRACEPOINT:
                loader._attach(bpf, p)
        for _, event, fn in bpf.attached:
            assert fn in c_programs() | written, (facts.kernel_release, event, fn)
    # The seed with its process-following points: each execve flavour its own program.
    plan = planmod.make_plan(with_follow_points(HostFacts.load(
        KERNELS / "seed-tdx-v12-kprobes.json")))
    bpf = _FakeBPF()
    loader._attach(bpf, plan.by_id()[contract.PROBE_EXEC])
    assert bpf.attached == [("kprobe", "__x64_sys_execve", "syscall__execve"),
                            ("kprobe", "__x64_sys_execveat", "syscall__execveat")]


# ---- no name of the contract spelled anywhere else ---------------------------------

# Modules that handle the program's maps (the other modules' "events", "totals" are
# tracefs directories, metric families and attributes, not maps).
MAP_MODULES = {"loader.py", "reader.py", "handoff.py", "libbpf.py"}


def _literals(path) -> list[tuple[int, str]]:
    """Every string constant of a Python file (f-strings' literal parts included)."""
    return [(n.lineno, n.value) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_no_program_map_or_define_name_is_spelled_outside_the_contract():
    names = {p.name.split("{", 1)[0] for progs in programs.PROGRAMS.values() for p in progs
             if p.form == programs.FUNCTION} | set(programs.FN_MACROS) | set(contract.FEATURES)
    files = [*(HERE.parent / "kvmtrace").glob("*.py"), *(HERE.parent / "bench").glob("*.py")]
    spelled = []
    for path in files:
        if path.name in ("contract.py", "programs.py"):
            continue
        maps = set(contract.ALL_MAPS) if path.parent.name == "bench" \
            or path.name in MAP_MODULES else set()
        spelled += [f"{path.relative_to(HERE.parent)}:{line}: {s!r}" for line, s in _literals(path)
                    if s in maps or any(s.startswith(n) for n in names)]
    assert not spelled, "spell these with kvmtrace.contract / kvmtrace.programs:\n" + \
        "\n".join(spelled)
