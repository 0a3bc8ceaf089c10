"""Variants of kvmtrace's shipped BPF program, measured by bench/bpfload.py.

Each variant is a set of the benchmark knobs bpf/kvmtrace.bpf.c documents in its
header (#ifdef BENCH_*: never set by kvmtrace itself), defined on top of the text
`kvmtrace trace --ebpf` prints. Variants take parts of the ioctl return path away
(diagnostics: what each part costs) or try a cheaper form of one part (candidates:
adopt in bpf/ only when measured cheaper). tests/test_contract.py checks that every
knob in the C is some variant's and every variant's knob is in the C.
"""

from __future__ import annotations

VARIANTS: dict[str, tuple[str, ...]] = {
    # As shipped.
    "shipped": (),
    # Diagnostics: the shipped path without one part.
    "noemit": ("BENCH_NO_EMIT",),
    "nolatency": ("BENCH_NO_LATENCY",),
    "nocount": ("BENCH_NO_COUNT",),
    # Only the in-flight bookkeeping (enter + return through task storage).
    "bookkeeping": ("BENCH_NO_EMIT", "BENCH_NO_LATENCY", "BENCH_NO_COUNT"),
    # Candidates: a cheaper form of one part.
    "wakeup": ("BENCH_RB_WAKEUP",),  # a wakeup per event, as shipped until 2026-11-26
    "percpulat": ("BENCH_PERCPU_LATENCY",),  # the latency histogram per CPU, no atomics
}


def apply(name: str, text: str) -> str:
    """``text`` (the shipped program with its defines) with variant ``name``'s knobs."""
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}: bench/variants.py has {sorted(VARIANTS)}")
    return "".join(f"#define {knob} 1\n" for knob in VARIANTS[name]) + text
