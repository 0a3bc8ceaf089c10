"""Variants of kvmtrace's shipped BPF program, measured by bench/bpfload.py.

Each variant is a set of the benchmark's knobs (bench/overlay.py: edits of the product's
C that bpf/kvmtrace.bpf.c itself never carries), applied to the text `kvmtrace trace
--ebpf` prints. Variants take parts of the ioctl return path away (diagnostics: what each
part costs) or try a cheaper form of one part (candidates: adopt in bpf/ only when
measured cheaper). tests/test_bench_overlay.py checks that every variant applies to the
current C and changes it exactly where its knobs say, and that every knob is some
variant's.
"""

from __future__ import annotations

import overlay

VARIANTS: dict[str, tuple[str, ...]] = {
    # As shipped.
    "shipped": (),
    # Diagnostics: the shipped path without one part.
    "noemit": ("no_emit",),
    "nolatency": ("no_latency",),
    "nocount": ("no_count",),
    # Only the in-flight bookkeeping (enter + return through task storage).
    "bookkeeping": ("no_emit", "no_latency", "no_count"),
    # Candidates: a cheaper form of one part.
    "wakeup": ("rb_wakeup",),  # a wakeup per event, as shipped until 2026-11-26
    "percpulat": ("percpu_latency",),  # the latency histogram per CPU, no atomics
}


def apply(name: str, text: str) -> str:
    """``text`` (the shipped program with its defines) with variant ``name``'s knobs.
    overlay.OverlayError (one line) when the product's C no longer takes them."""
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}: bench/variants.py has {sorted(VARIANTS)}")
    return overlay.apply(VARIANTS[name], text)
