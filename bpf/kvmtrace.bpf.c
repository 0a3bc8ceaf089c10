// SPDX-License-Identifier: GPL-2.0
/*
 * kvmtrace: in-kernel half of the KVM VM-type tracer.
 *
 * Compiled by bcc at run time. Free of kernel struct layouts on purpose, so a
 * mismatch between the running kernel and the headers bcc compiles against
 * cannot corrupt what we read. Every struct, map and index shared with the
 * Python side is declared in kvmtrace/contract.py, which gives the sizes and
 * indices below as defines (tests/test_contract.py holds this file to it):
 *
 *   PROBE_CREATE_VM, PROBE_VM_TYPES_QUERY, PROBE_ARCH_INIT_VM
 *       probe ids of the ioctl points and kvm_arch_init_vm; every other
 *       function point is a type check
 *   VERDICT_*      bits of what the function probes saw inside a KVM_CREATE_VM
 *   HEALTH_*, HEALTH_ENTRIES      health counter indices
 *   LATENCY_SLOTS, LATENCY_ENTRIES, LATENCY_SUM_ENTRIES   latency layout
 *   COUNTS_MAX, CALLS_MAX, RINGBUF_PAGES   map sizes (loader options)
 *
 * The loader (kvmtrace/loader.py) adds:
 *
 *   KVM_CREATE_VM, KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES
 *       ioctl numbers from include/uapi/linux/kvm.h (kvmtrace/tables.py)
 *   SELF_TGID      the exporter's own pid: its own KVM_CAP_VM_TYPES query
 *                  is not a client's and is not counted
 *   FILTER_TGID    only emit events for this pid (0: all); counts are global
 *   EVENT_BUDGET, EVENT_WINDOW_NS   at most EVENT_BUDGET events per CPU per
 *                  window reach the live stream; the rest are counted as
 *                  throttled (counts stay exact), so a storm cannot make the
 *                  reader compete with the traced processes for CPU
 *   IOCTL_KPROBE | IOCTL_FENTRY | IOCTL_TRACEPOINT   ioctl-layer mechanism
 *   USE_RINGBUF    BPF ring buffer (5.8+), else a perf buffer
 *   USE_TASK_STORAGE   keep the in-flight ioctl in BPF task storage (5.11+,
 *                  BTF), else in a hash keyed by thread id
 *
 * and appends one FN_KPROBE / FN_FEXIT_* line per attached function point.
 *
 * Benchmark knobs (bench/variants.py sets them; kvmtrace never does): each takes
 * one part of the ioctl return path away, or swaps it for a candidate, so that
 * its cost is measured on this very program.
 *   BENCH_NO_EMIT         no event from the ioctl return path
 *   BENCH_NO_LATENCY      no latency histogram
 *   BENCH_NO_COUNT        no count from the ioctl return path
 *   BENCH_RB_WAKEUP       a reader wakeup per event (as shipped until 2026-11-26)
 *   BENCH_PERCPU_LATENCY  the latency histogram in per-CPU arrays, without atomics
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

/* Counts: exact, keyed by process, probe, VM type and result. */
struct count_key {
	u32 tgid;
	u32 probe;
	u64 vm_type;
	/*
	 * KVM_CREATE_VM: 0 (a VM fd) or -errno; KVM_CAP_VM_TYPES: the returned
	 * mask or -errno; kvm_arch_init_vm: its int return; *_is_vm_type_supported:
	 * its bool return (0/1).
	 */
	s64 result;
	u32 verdicts; /* KVM_CREATE_VM: VERDICT_* bits seen inside the call */
	u32 pad;
	char comm[TASK_COMM_LEN];
};

/*
 * What the function probes saw inside one KVM_CREATE_VM (same thread, nested
 * in time): VERDICT_* bits, kept in the count key, so the reason for a
 * rejection is exact even when events are lost.
 */

/* One record per completed call, for the live view. */
struct event {
	u64 ts_ns;       /* bpf_ktime_get_ns() at return */
	u64 duration_ns; /* entry to return, 0 when the entry was not seen */
	u64 vm_type;
	s64 result;      /* raw: the fd for an accepted KVM_CREATE_VM */
	u32 tgid;
	u32 tid;
	u32 probe;
	u32 verdicts;    /* KVM_CREATE_VM: VERDICT_* bits */
	char comm[TASK_COMM_LEN];
};

/* An ioctl in flight on one thread, between entry and return. */
struct ioctl_call {
	u64 start_ns;
	u64 arg;
	u32 cmd;
	u32 verdicts; /* VERDICT_* bits, set by the function probes */
};

/* A function-point call in flight: (thread, probe) allows nesting. */
struct fn_key {
	u32 tid;
	u32 probe;
};

struct fn_call {
	u64 start_ns;
	u64 vm_type;
};

BPF_HASH(counts, struct count_key, u64, COUNTS_MAX);
BPF_HASH(fn_calls, struct fn_key, struct fn_call, CALLS_MAX);
/* Number of tracked ioctls in flight host-wide: the return hook of every
 * ioctl on the host reads it first and stops at once when it is 0. */
BPF_ARRAY(inflight, u64, 1);
/*
 * Health counters, exported as kvmtrace_*_total, at index HEALTH_*:
 * COUNTS_DROPPED (counts map full: an update failed), EVENTS_LOST (ring buffer
 * full: an event not emitted), CALLS_DROPPED (in-flight map full: a call not
 * tracked), EVENTS_THROTTLED (over EVENT_BUDGET: an event not emitted).
 * Per CPU: storms on several CPUs never contend on these cache lines.
 */
BPF_PERCPU_ARRAY(health, u64, HEALTH_ENTRIES);

/* The event budget of this CPU's current window. */
struct event_window {
	u64 start_ns;
	u64 sent;
};
BPF_PERCPU_ARRAY(event_budget, struct event_window, 1);

/* KVM_CREATE_VM latency (entry to return) per outcome (0 accepted, 1
 * rejected): counts per log2(ns) slot at index outcome * LATENCY_SLOTS + slot
 * (an array: no hashing on the hot path), and the sum of ns per outcome. */
#ifdef BENCH_PERCPU_LATENCY
BPF_PERCPU_ARRAY(create_latency, u64, LATENCY_ENTRIES);
BPF_PERCPU_ARRAY(create_latency_sum, u64, LATENCY_SUM_ENTRIES);
#else
BPF_ARRAY(create_latency, u64, LATENCY_ENTRIES);
BPF_ARRAY(create_latency_sum, u64, LATENCY_SUM_ENTRIES);
#endif

/*
 * The in-flight ioctl of the current thread. A slot with cmd == 0 is free.
 * Task storage lives and dies with the task: no map to fill, no stale
 * entries from threads killed mid-call, and no hashing of a thread id.
 */
#ifdef USE_TASK_STORAGE
BPF_TASK_STORAGE(ioctl_calls, struct ioctl_call);

static __always_inline struct ioctl_call *call_slot(void)
{
	return ioctl_calls.task_storage_get(bpf_get_current_task_btf(), 0,
					    BPF_LOCAL_STORAGE_GET_F_CREATE);
}

static __always_inline struct ioctl_call *call_find(void)
{
	return ioctl_calls.task_storage_get(bpf_get_current_task_btf(), 0, 0);
}

static __always_inline void call_done(struct ioctl_call *c)
{
	c->cmd = 0;
}
#else
BPF_HASH(ioctl_calls, u32, struct ioctl_call, CALLS_MAX);

static __always_inline struct ioctl_call *call_slot(void)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct ioctl_call zero = {};
	/* EEXIST (a slot from an earlier call) is fine; E2BIG means full. */
	ioctl_calls.insert(&tid, &zero);
	return ioctl_calls.lookup(&tid);
}

static __always_inline struct ioctl_call *call_find(void)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	return ioctl_calls.lookup(&tid);
}

static __always_inline void call_done(struct ioctl_call *c)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	ioctl_calls.delete(&tid);
}
#endif

#ifdef USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif

static __always_inline void health_inc(u32 idx)
{
	u64 *v = health.lookup(&idx);
	if (v)
		(*v)++; /* this CPU's own counter: no atomic needed */
}

static __always_inline void count(u32 tgid, u32 probe, u64 vm_type, s64 result,
				  u32 verdicts)
{
	struct count_key key = {};
	key.tgid = tgid;
	key.probe = probe;
	key.vm_type = vm_type;
	key.result = result;
	key.verdicts = verdicts;
	bpf_get_current_comm(&key.comm, sizeof(key.comm));

	u64 *v = counts.lookup(&key);
	if (!v) {
		u64 one = 1;
		/* BPF_NOEXIST: fails with EEXIST when another CPU inserted the key
		 * first (then add to it), with E2BIG when the map is full. */
		if (counts.insert(&key, &one) == 0)
			return;
		v = counts.lookup(&key);
		if (!v) {
			health_inc(HEALTH_COUNTS_DROPPED);
			return;
		}
	}
	__sync_fetch_and_add(v, 1);
}

/* now: bpf_ktime_get_ns() of the caller, read once per call. */
static __always_inline void emit(void *ctx, u64 id, u32 probe, u64 vm_type,
				 s64 result, u64 start_ns, u32 verdicts, u64 now)
{
	u32 tgid = id >> 32;
	if (FILTER_TGID && tgid != FILTER_TGID)
		return;
	u32 zero = 0;
	struct event_window *w = event_budget.lookup(&zero);
	if (w) {
		if (now - w->start_ns > EVENT_WINDOW_NS) {
			w->start_ns = now;
			w->sent = 0;
		}
		if (w->sent >= EVENT_BUDGET) {
			health_inc(HEALTH_EVENTS_THROTTLED);
			return;
		}
		w->sent++;
	}
	struct event ev = {};
	ev.ts_ns = now;
	ev.duration_ns = start_ns ? now - start_ns : 0;
	ev.vm_type = vm_type;
	ev.result = result;
	ev.tgid = tgid;
	ev.tid = (u32)id;
	ev.probe = probe;
	ev.verdicts = verdicts;
	bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
#ifdef USE_RINGBUF
	/* No wakeup per event: the reader drains the ring at its poll timeout
	 * (100-200 ms), so a traced VMM never pays for waking it. */
#ifdef BENCH_RB_WAKEUP
	if (events.ringbuf_output(&ev, sizeof(ev), 0))
#else
	if (events.ringbuf_output(&ev, sizeof(ev), BPF_RB_NO_WAKEUP))
#endif
		health_inc(HEALTH_EVENTS_LOST);
#else
	if (events.perf_submit(ctx, &ev, sizeof(ev)))
		health_inc(HEALTH_EVENTS_LOST);
#endif
}

/* One KVM_CREATE_VM's latency: its log2(ns) slot and the sum, per outcome. */
static __always_inline void latency_record(u32 outcome, u64 ns)
{
	u32 slot = outcome * LATENCY_SLOTS + (bpf_log2l(ns) & (LATENCY_SLOTS - 1));
	u64 *bucket = create_latency.lookup(&slot);
	u64 *sum = create_latency_sum.lookup(&outcome);
#ifdef BENCH_PERCPU_LATENCY
	if (bucket)
		(*bucket)++;
	if (sum)
		*sum += ns;
#else
	if (bucket)
		__sync_fetch_and_add(bucket, 1);
	if (sum)
		__sync_fetch_and_add(sum, ns);
#endif
}

/* ---- ioctl layer: KVM_CREATE_VM and KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES) */

static __always_inline int ioctl_enter(u32 cmd, u64 arg)
{
	if (cmd != KVM_CREATE_VM &&
	    !(cmd == KVM_CHECK_EXTENSION && arg == KVM_CAP_VM_TYPES))
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	if ((u32)(id >> 32) == SELF_TGID)
		return 0;
	struct ioctl_call *c = call_slot();
	if (!c) {
		health_inc(HEALTH_CALLS_DROPPED);
		return 0;
	}
	if (!c->cmd) { /* else a call whose return was never seen: reuse */
		u32 zero = 0;
		u64 *n = inflight.lookup(&zero);
		if (n)
			__sync_fetch_and_add(n, 1);
	}
	c->start_ns = bpf_ktime_get_ns();
	c->arg = arg;
	c->verdicts = 0;
	c->cmd = cmd;
	return 0;
}

static __always_inline int ioctl_return(void *ctx, s64 ret)
{
	u32 zero = 0;
	u64 *n = inflight.lookup(&zero);
	/* Every ioctl on the host passes here: leave before any hash lookup
	 * unless one of ours is in flight somewhere. */
	if (!n || *n == 0)
		return 0;
	struct ioctl_call *c = call_find();
	if (!c || !c->cmd)
		return 0;
	struct ioctl_call call = *c;
	call_done(c);
	__sync_fetch_and_add(n, -1);

	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	u64 now = bpf_ktime_get_ns();
	if (call.cmd == KVM_CREATE_VM) {
#ifndef BENCH_NO_LATENCY
		latency_record(ret < 0, now - call.start_ns);
#endif
#ifndef BENCH_NO_COUNT
		/* Success returns a new fd: count it as 0 to keep keys bounded. */
		count(tgid, PROBE_CREATE_VM, call.arg, ret < 0 ? ret : 0, call.verdicts);
#endif
#ifndef BENCH_NO_EMIT
		emit(ctx, id, PROBE_CREATE_VM, call.arg, ret, call.start_ns, call.verdicts, now);
#endif
	} else {
#ifndef BENCH_NO_COUNT
		count(tgid, PROBE_VM_TYPES_QUERY, 0, ret, 0);
#endif
#ifndef BENCH_NO_EMIT
		emit(ctx, id, PROBE_VM_TYPES_QUERY, 0, ret, call.start_ns, 0, now);
#endif
	}
	return 0;
}

#if defined(IOCTL_KPROBE)
/* static long kvm_dev_ioctl(struct file *filp, unsigned int ioctl, unsigned long arg) */
int kvmtrace_ioctl_enter(struct pt_regs *ctx)
{
	return ioctl_enter((u32)PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx));
}

int kvmtrace_ioctl_return(struct pt_regs *ctx)
{
	return ioctl_return(ctx, (s64)(long)PT_REGS_RC(ctx));
}
#elif defined(IOCTL_FENTRY)
KFUNC_PROBE(kvm_dev_ioctl, void *filp, unsigned int ioctl, unsigned long arg)
{
	return ioctl_enter(ioctl, arg);
}

KRETFUNC_PROBE(kvm_dev_ioctl, void *filp, unsigned int ioctl, unsigned long arg, long ret)
{
	return ioctl_return(ctx, ret);
}
#elif defined(IOCTL_TRACEPOINT)
/* Fields from events/syscalls/sys_{enter,exit}_ioctl/format. */
TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
	return ioctl_enter(args->cmd, args->arg);
}

TRACEPOINT_PROBE(syscalls, sys_exit_ioctl)
{
	return ioctl_return(args, args->ret);
}
#endif

/* ---- function points: kvm_arch_init_vm and *_is_vm_type_supported ----- */

static __always_inline int fn_enter(u32 probe, u64 vm_type)
{
	struct fn_key key = {};
	key.tid = (u32)bpf_get_current_pid_tgid();
	key.probe = probe;
	struct fn_call call = {};
	call.start_ns = bpf_ktime_get_ns();
	call.vm_type = vm_type;
	if (fn_calls.update(&key, &call))
		health_inc(HEALTH_CALLS_DROPPED);
	return 0;
}

static __always_inline int fn_done(void *ctx, u32 probe, u64 vm_type,
				   s64 result, u64 start_ns)
{
	u64 id = bpf_get_current_pid_tgid();
	if ((u32)(id >> 32) == SELF_TGID)
		return 0;
	/* Tell the enclosing KVM_CREATE_VM on this thread, if any, what we saw. */
	struct ioctl_call *c = call_find();
	if (c && c->cmd == KVM_CREATE_VM) {
		u32 bits;
		if (probe == PROBE_ARCH_INIT_VM)
			bits = VERDICT_ARCH_INIT_SEEN | (result < 0 ? VERDICT_ARCH_INIT_FAILED : 0);
		else
			bits = VERDICT_TYPE_CHECK_SEEN | (result == 0 ? VERDICT_TYPE_CHECK_REJECTED : 0);
		/* Only this thread touches its own entry (it is inside the
		 * ioctl): no atomic needed, and none for u32 before BPF v3. */
		c->verdicts |= bits;
	}
	count(id >> 32, probe, vm_type, result, 0);
	emit(ctx, id, probe, vm_type, result, start_ns, 0, bpf_ktime_get_ns());
	return 0;
}

static __always_inline int fn_return(void *ctx, u32 probe, s64 result)
{
	struct fn_key key = {};
	key.tid = (u32)bpf_get_current_pid_tgid();
	key.probe = probe;
	struct fn_call *c = fn_calls.lookup(&key);
	if (!c)
		return 0;
	struct fn_call call = *c;
	fn_calls.delete(&key);
	return fn_done(ctx, probe, call.vm_type, result, call.start_ns);
}

/*
 * kprobe + kretprobe on a function point. ARGN: which argument is the VM type
 * (kvm_arch_init_vm(struct kvm *kvm, unsigned long type): 2;
 * *_is_vm_type_supported(unsigned long type): 1). RET_T: how to read rax:
 * int for kvm_arch_init_vm; u8 for a bool, whose upper bits are leftovers.
 */
#define FN_KPROBE(P, ARGN, RET_T)                                              \
	int kvmtrace_enter_##P(struct pt_regs *ctx)                            \
	{                                                                      \
		return fn_enter(P, PT_REGS_PARM##ARGN(ctx));                   \
	}                                                                      \
	int kvmtrace_return_##P(struct pt_regs *ctx)                           \
	{                                                                      \
		return fn_return(ctx, P, (s64)(RET_T)PT_REGS_RC(ctx));         \
	}

/* fentry/fexit: the exit program sees the arguments and the return value. */
#define FN_FEXIT_ARCH_INIT_VM(P, FN)                                           \
	KRETFUNC_PROBE(FN, void *kvm, unsigned long type, int ret)             \
	{                                                                      \
		return fn_done(ctx, P, type, (s64)ret, 0);                     \
	}

#define FN_FEXIT_TYPE_CHECK(P, FN)                                             \
	KRETFUNC_PROBE(FN, unsigned long type, u8 ret)                         \
	{                                                                      \
		return fn_done(ctx, P, type, (s64)ret, 0);                     \
	}

/* Generated by the loader: one line per attached function point. */
