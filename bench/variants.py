"""Edits of kvmtrace's BPF text, measured by bench/bpfload.py (never applied to bpf/).

Each variant is a list of (old, new) replacements on the text `kvmtrace trace
--ebpf` prints; an edit whose `old` is not found exactly once fails loudly (the
BPF source moved on: update the variant). Variants take parts of the return path
away (diagnostics: what each part costs) or try a cheaper form of one part
(candidates: adopt in bpf/ only when measured cheaper).
"""

from __future__ import annotations

EMIT_CREATE = "emit(ctx, id, PROBE_CREATE_VM, call.arg, ret, call.start_ns, call.verdicts, now);"
EMIT_QUERY = "emit(ctx, id, PROBE_VM_TYPES_QUERY, 0, ret, call.start_ns, 0, now);"
RB_OUTPUT = "if (events.ringbuf_output(&ev, sizeof(ev), BPF_RB_NO_WAKEUP))"
COUNT_CREATE = "count(tgid, PROBE_CREATE_VM, call.arg, ret < 0 ? ret : 0, call.verdicts);"
COUNT_QUERY = "count(tgid, PROBE_VM_TYPES_QUERY, 0, ret, 0);"
LATENCY_BLOCK = """		u64 *bucket = create_latency.lookup(&slot);
		if (bucket)
			__sync_fetch_and_add(bucket, 1);
		u64 *sum = create_latency_sum.lookup(&outcome);
		if (sum)
			__sync_fetch_and_add(sum, ns);"""

NOEMIT = [(EMIT_CREATE, "/* no event */"), (EMIT_QUERY, "/* no event */")]
WAKEUP = [(RB_OUTPUT, "if (events.ringbuf_output(&ev, sizeof(ev), 0))")]
NOLATENCY = [(LATENCY_BLOCK, "		/* no histogram */")]
NOCOUNT = [(COUNT_CREATE, "/* no count */"), (COUNT_QUERY, "/* no count */")]
# The latency histogram per CPU: no lock-prefixed add on a shared cache line.
PERCPU_LATENCY = [
    ("BPF_ARRAY(create_latency, u64, LATENCY_ENTRIES);",
     "BPF_PERCPU_ARRAY(create_latency, u64, LATENCY_ENTRIES);"),
    ("BPF_ARRAY(create_latency_sum, u64, LATENCY_SUM_ENTRIES);",
     "BPF_PERCPU_ARRAY(create_latency_sum, u64, LATENCY_SUM_ENTRIES);"),
    (LATENCY_BLOCK, """		u64 *bucket = create_latency.lookup(&slot);
		if (bucket)
			(*bucket)++;
		u64 *sum = create_latency_sum.lookup(&outcome);
		if (sum)
			*sum += ns;"""),
]
VARIANTS: dict[str, list[tuple[str, str]]] = {
    # As shipped.
    "shipped": [],
    # Diagnostics: the shipped path without one part.
    "noemit": NOEMIT,
    "nolatency": NOLATENCY,
    "nocount": NOCOUNT,
    # Only the in-flight bookkeeping (enter + return through task storage).
    "bookkeeping": NOEMIT + NOLATENCY + NOCOUNT,
    # Candidates: a cheaper form of one part.
    "wakeup": WAKEUP,  # a wakeup per event, as shipped until 2026-11-26
    "percpulat": PERCPU_LATENCY,
}


def apply(name: str, text: str) -> str:
    for old, new in VARIANTS[name]:
        if text.count(old) != 1:
            raise SystemExit(f"variant {name}: {old[:60]!r} found {text.count(old)} times")
        text = text.replace(old, new)
    return text
