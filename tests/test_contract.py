"""kvmtrace/contract.py against bpf/kvmtrace.bpf.c: the two sides of every shared layout.

Parses the C (no compiler, no root): the structs the kernel writes and Python reads,
the declarations of the maps Python reads, and every define the C uses without
defining it. The privileged tier checks the same maps as the kernel reports them
(kvmtrace.reader.Reader refuses a map that differs).
"""

from __future__ import annotations

import ctypes
import re
import struct

import pytest

from kvmtrace import contract, loader
from kvmtrace import plan as planmod
from kvmtrace.facts import HostFacts
from tests.conftest import HERE, KERNELS

C = loader.bpf_source()
# C type -> (struct format character, size); char[TASK_COMM_LEN] is a fixed string.
C_TYPES = {"u32": ("I", 4), "u64": ("Q", 8), "s64": ("q", 8),
           "char[TASK_COMM_LEN]": (f"{contract.TASK_COMM_LEN}s", contract.TASK_COMM_LEN),
           "char[EXEC_ARGS_BYTES]": (f"{contract.EXEC_ARGS_BYTES}s", contract.EXEC_ARGS_BYTES)}


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
    """Names the C only tests with #ifdef / #ifndef / defined(): optional by design."""
    return {a or b for a, b in re.findall(r"#ifn?def (\w+)|defined\((\w+)\)", C)}


def _used_in_c() -> set[str]:
    text = _without_comments(C)
    words = set(re.findall(r"\b([A-Z][A-Z0-9_]{2,})\b", text))
    bcc = {"BPF_HASH", "BPF_ARRAY", "BPF_PERCPU_ARRAY", "BPF_TASK_STORAGE", "BPF_TABLE",
           "BPF_PERCPU_HASH",
           "BPF_RINGBUF_OUTPUT", "BPF_PERF_OUTPUT", "BPF_RB_NO_WAKEUP",
           "BPF_LOCAL_STORAGE_GET_F_CREATE", "TASK_COMM_LEN", "TRACEPOINT_PROBE",
           "KFUNC_PROBE", "KRETFUNC_PROBE", "PT_REGS_RC", "SPDX", "GPL", "ARGN", "RET_T",
           "FN_KPROBE", "FN_FEXIT_ARCH_INIT_VM", "FN_FEXIT_TYPE_CHECK", "FN"}
    return {w for w in words if w not in bcc and w not in _knobs_in_c()
            and not w.startswith("PT_REGS_PARM")}


def test_every_benchmark_knob_is_a_variant_and_documented():
    import importlib.util

    spec = importlib.util.spec_from_file_location("variants", HERE.parent / "bench/variants.py")
    variants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variants)
    knobs = {k for k in _knobs_in_c() if k.startswith("BENCH_")}
    used = {k for defines in variants.VARIANTS.values() for k in defines}
    assert knobs == used, (knobs, used)
    header = C.split("*/", 1)[0]
    assert all(k in header for k in knobs)


def test_every_define_the_c_uses_is_given_by_the_loader():
    facts = HostFacts.load(KERNELS / "seed-tdx-v12-kprobes.json")
    text = loader.build_text(planmod.make_plan(facts), loader.Options())
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
