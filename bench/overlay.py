"""The benchmark's overlay on kvmtrace's BPF C: knobs bpf/kvmtrace.bpf.c never carries.

Each knob is a few exact edits of the product's C text: it takes one part of the ioctl
return path away (what that part costs) or swaps it for a candidate (adopt in bpf/ only
when measured cheaper), so that the cost is measured on this very program. A variant
(bench/variants.py) is a set of knobs, applied at bench time to the text `kvmtrace trace
--ebpf` prints. Every edit must find its text exactly once: when the product's C has
changed under it, applying fails with one line naming the knob (update the edit here).
tests/test_bench_overlay.py applies every variant to the current C.
"""

from __future__ import annotations

from dataclasses import dataclass


class OverlayError(Exception):
    """A knob's edit no longer applies to the product's C; one line."""


@dataclass(frozen=True)
class Edit:
    """Replace ``old``, found exactly once in the product's C, with ``new``."""

    old: str
    new: str


def _gone(line: str, knob: str) -> Edit:
    """Take the whole line ``line`` (tab-indented, as in the C) out, leaving a mark."""
    indent = line[:len(line) - len(line.lstrip("\t"))]
    return Edit(line, f"{indent}/* bench overlay {knob}: taken out */\n")


KNOBS: dict[str, tuple[Edit, ...]] = {
    # No event from the ioctl return path.
    "no_emit": (
        _gone("\t\temit_w(ctx, id, PROBE_CREATE_VM, call.arg, ret, call.start_ns, "
              "call.verdicts, now,\n\t\t       first);\n", "no_emit"),
        _gone("\t\temit_w(ctx, id, PROBE_VM_TYPES_QUERY, 0, ret, call.start_ns, 0, now, "
              "first);\n", "no_emit"),
    ),
    # No latency histogram.
    "no_latency": (_gone("\t\tlatency_record(ret < 0, now - call.start_ns);\n", "no_latency"),),
    # No count from the ioctl return path.
    "no_count": (
        _gone("\t\tcount(tgid, PROBE_CREATE_VM, call.arg, ret < 0 ? ret : 0, call.verdicts, "
              "0);\n", "no_count"),
        _gone("\t\tcount(tgid, PROBE_VM_TYPES_QUERY, 0, ret, 0, 0);\n", "no_count"),
    ),
    # A reader wakeup per event (as shipped until 2026-11-26).
    "rb_wakeup": (Edit("u64 rb_flags = x.wake ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;",
                       "u64 rb_flags = 0; /* bench overlay rb_wakeup */"),),
    # The latency histogram in per-CPU arrays, without atomics.
    "percpu_latency": (
        Edit("BPF_ARRAY(create_latency, u64, LATENCY_ENTRIES);\n"
             "BPF_ARRAY(create_latency_sum, u64, LATENCY_SUM_ENTRIES);\n",
             "/* bench overlay percpu_latency: per-CPU arrays */\n"
             "BPF_PERCPU_ARRAY(create_latency, u64, LATENCY_ENTRIES);\n"
             "BPF_PERCPU_ARRAY(create_latency_sum, u64, LATENCY_SUM_ENTRIES);\n"),
        Edit("\tif (bucket)\n\t\t__sync_fetch_and_add(bucket, 1);\n"
             "\tif (sum)\n\t\t__sync_fetch_and_add(sum, ns);\n",
             "\t/* bench overlay percpu_latency: this CPU's own values, no atomics */\n"
             "\tif (bucket)\n\t\t(*bucket)++;\n\tif (sum)\n\t\t*sum += ns;\n"),
    ),
}


def apply(knobs: tuple[str, ...], text: str) -> str:
    """``text`` (the product's C, alone or with the loader's defines and FN_* lines)
    with the edits of ``knobs``, in order. OverlayError (one line) when a knob is unknown
    or one of its edits does not find its text exactly once."""
    for knob in knobs:
        if knob not in KNOBS:
            raise OverlayError(f"bench/overlay.py: no knob {knob!r} (it has {sorted(KNOBS)})")
        for edit in KNOBS[knob]:
            n = text.count(edit.old)
            if n != 1:
                first = edit.old.strip().splitlines()[0]
                raise OverlayError(
                    f"bench/overlay.py: knob {knob!r} no longer applies: {first!r} is "
                    f"{'not' if n == 0 else f'{n} times'} in the BPF C (bpf/kvmtrace.bpf.c "
                    f"changed: update the knob's edits)")
            text = text.replace(edit.old, edit.new)
    return text
