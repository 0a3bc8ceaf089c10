"""Edits of kvmtrace's BPF text, measured by bench/bpfload.py (never applied to bpf/).

Each variant is a list of (old, new) replacements on the text `kvmtrace trace
--ebpf` prints; an edit whose `old` is not found exactly once fails loudly (the
BPF source moved on: update the variant).
"""

from __future__ import annotations

EMIT_CREATE = "emit(ctx, id, PROBE_CREATE_VM, call.arg, ret, call.start_ns, call.verdicts);"
EMIT_QUERY = "emit(ctx, id, PROBE_VM_TYPES_QUERY, 0, ret, call.start_ns, 0);"
RB_OUTPUT = "if (events.ringbuf_output(&ev, sizeof(ev), 0))"
LATENCY = "create_latency.atomic_increment(lk);"
COUNT_CREATE = "count(tgid, PROBE_CREATE_VM, call.arg, ret < 0 ? ret : 0, call.verdicts);"
COUNT_QUERY = "count(tgid, PROBE_VM_TYPES_QUERY, 0, ret, 0);"
# In-flight state in BPF task storage (5.11+, needs BTF) instead of a hash
# keyed by tid: no insert/delete (locking, freelist) per call, the entry is
# created once per thread and marked free with cmd = 0.
TS_DECL = ("BPF_HASH(ioctl_calls, u32, struct ioctl_call, CALLS_MAX);",
           "BPF_HASH(ioctl_calls, u32, struct ioctl_call, CALLS_MAX);\n"
           "BPF_TASK_STORAGE(ioctl_ts, struct ioctl_call);")
TS_ENTER = ("""	u32 tid = (u32)id;
	struct ioctl_call call = {};
	call.start_ns = bpf_ktime_get_ns();
	call.arg = arg;
	call.cmd = cmd;
	if (ioctl_calls.insert(&tid, &call) == 0) {
		u32 zero = 0;
		u64 *n = inflight.lookup(&zero);
		if (n)
			__sync_fetch_and_add(n, 1);
	} else if (ioctl_calls.update(&tid, &call)) {
		/* Not EEXIST (a stale entry, now replaced) but E2BIG: map full. */
		health_inc(HEALTH_CALLS_DROPPED);
	}
	return 0;""", """	struct ioctl_call *c = ioctl_ts.task_storage_get(bpf_get_current_task_btf(), 0,
						      BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!c) {
		health_inc(HEALTH_CALLS_DROPPED);
		return 0;
	}
	if (!c->cmd) {
		u32 zero = 0;
		u64 *n = inflight.lookup(&zero);
		if (n)
			__sync_fetch_and_add(n, 1);
	}
	c->start_ns = bpf_ktime_get_ns();
	c->arg = arg;
	c->verdicts = 0;
	c->cmd = cmd;
	return 0;""")
TS_RETURN = ("""	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	struct ioctl_call *c = ioctl_calls.lookup(&tid);
	if (!c)
		return 0;
	struct ioctl_call call = *c;
	ioctl_calls.delete(&tid);
	__sync_fetch_and_add(n, -1);""", """	struct ioctl_call *c = ioctl_ts.task_storage_get(bpf_get_current_task_btf(), 0, 0);
	if (!c || !c->cmd)
		return 0;
	struct ioctl_call call = *c;
	c->cmd = 0;
	__sync_fetch_and_add(n, -1);
	u64 id = bpf_get_current_pid_tgid();""")
TS_FN = ("""	struct ioctl_call *c = ioctl_calls.lookup(&tid);
	if (c) {""", """	struct ioctl_call *c = ioctl_ts.task_storage_get(bpf_get_current_task_btf(), 0, 0);
	if (c && c->cmd) {""")
TASKSTORAGE = [TS_DECL, TS_ENTER, TS_RETURN, TS_FN]
NOWAKEUP = [(RB_OUTPUT, "if (events.ringbuf_output(&ev, sizeof(ev), BPF_RB_NO_WAKEUP))")]
# A per-CPU event budget: at most EMIT_BUDGET events per CPU per 200 ms window
# reach the ring buffer (and the Python consumer); the rest are counted as
# lost and cost one per-CPU lookup. Counts stay exact (they are not events).
BUDGET = [
    ("BPF_ARRAY(health, u64, 3);",
     "BPF_ARRAY(health, u64, 3);\n"
     "struct emit_window { u64 start_ns; u64 n; };\n"
     "BPF_PERCPU_ARRAY(emit_budget, struct emit_window, 1);\n"
     "#define EMIT_BUDGET 1000\n"
     "#define EMIT_WINDOW_NS 200000000ULL"),
    ("""	if (FILTER_TGID && tgid != FILTER_TGID)
		return;
	struct event ev = {};""", """	if (FILTER_TGID && tgid != FILTER_TGID)
		return;
	u32 zero = 0;
	struct emit_window *w = emit_budget.lookup(&zero);
	if (w) {
		u64 now = bpf_ktime_get_ns();
		if (now - w->start_ns > EMIT_WINDOW_NS) {
			w->start_ns = now;
			w->n = 0;
		}
		if (w->n >= EMIT_BUDGET) {
			health_inc(HEALTH_EVENTS_LOST);
			return;
		}
		w->n++;
	}
	struct event ev = {};"""),
]
NOEMIT = [(EMIT_CREATE, "/* no event */"), (EMIT_QUERY, "/* no event */")]
NOLATENCY = [(LATENCY, "/* no histogram */")]
NOCOUNT = [(COUNT_CREATE, "/* no count */"), (COUNT_QUERY, "/* no count */")]

VARIANTS: dict[str, list[tuple[str, str]]] = {
    # As shipped.
    "shipped": [],
    # No live-view event at all from the ioctl layer: counts (and the latency
    # histogram) only -- what `serve -q` actually uses.
    "noemit": NOEMIT,
    # Events still written, but the ring buffer never wakes the consumer: it
    # finds them at its next poll timeout (serve polls every 200 ms).
    "nowakeup": NOWAKEUP,
    # Proposal: per-thread in-flight state in task storage.
    "taskstorage": TASKSTORAGE,
    "taskstorage+noemit": TASKSTORAGE + NOEMIT,
    "taskstorage+nowakeup": TASKSTORAGE + NOWAKEUP,
    "budget": BUDGET,
    "taskstorage+budget": TASKSTORAGE + BUDGET,
    # Diagnostics, not proposals: what each part of the return path costs.
    "nolatency": NOLATENCY,
    "nocount": NOCOUNT,
    # Only the in-flight bookkeeping (enter insert, return lookup + delete).
    "bookkeeping": NOEMIT + NOLATENCY + NOCOUNT,
}


def apply(name: str, text: str) -> str:
    for old, new in VARIANTS[name]:
        if text.count(old) != 1:
            raise SystemExit(f"variant {name}: {old[:60]!r} found {text.count(old)} times")
        text = text.replace(old, new)
    return text
