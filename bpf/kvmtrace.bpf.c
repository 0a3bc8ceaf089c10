// SPDX-License-Identifier: GPL-2.0
/*
 * kvmtrace: in-kernel half of the KVM VM-type tracer.
 *
 * Compiled by bcc at run time. Free of kernel struct layouts on purpose, so a
 * mismatch between the running kernel and the headers bcc compiles against
 * cannot corrupt what we read: the one place that reads kernel structs (a
 * followed process's fd 2, STDERR_CAPTURE) reads them at OFF_* offsets the
 * loader took from the running kernel's own BTF. Every struct, map and index shared with the
 * Python side is declared in kvmtrace/contract.py, which gives the sizes and
 * indices below as defines (tests/test_contract.py holds this file to it):
 *
 *   PROBE_CREATE_VM, PROBE_VM_TYPES_QUERY, PROBE_ARCH_INIT_VM,
 *   PROBE_ENCRYPT_OP, PROBE_PROCESS_END, PROBE_KVM_CALL, PROBE_KVM_RUN,
 *   PROBE_KVM_OPEN
 *       probe ids of the ioctl points, kvm_arch_init_vm, KVM_MEMORY_ENCRYPT_OP,
 *       the end of a followed process, and a start's failing KVM ioctls and
 *       first KVM_RUN; every further function point is a type check or a
 *       launch function (LAUNCH_FIRST.. in plan order)
 *   PROC_*         bits of what a followed process did (struct proc.flags)
 *   TASK_COMM_LEN  include/linux/sched.h's, which this file does not include
 *   PROCS_MAX, VM_FDS_MAX, EXEC_ARGS_MAX, EXEC_ARGS_BYTES, EXEC_ARG_MAX,
 *   EXEC_ARGV_MAX  sizes of the process-following state
 *   VERDICT_*      bits of what the function probes saw inside a KVM_CREATE_VM
 *   HEALTH_*, HEALTH_ENTRIES      health counter indices
 *   LATENCY_SLOTS, LATENCY_ENTRIES, LATENCY_SUM_ENTRIES   latency layout
 *   COUNTS_MAX, CALLS_MAX, RINGBUF_PAGES   map sizes (loader options)
 *   COUNTS_PER_PROC, PROC_KEYS_MAX          a process's share of counts (option),
 *                                           processes with a share tracked
 *   STDERR_MAX, STDERR_NAMES, STDERR_NAME_LEN, STDERR_NAMES_BYTES, STDERR_MOUNTS,
 *   STDERR_NO_FILE, STDERR_TRUNCATED   struct vmm_stderr's sizes and flags
 *   CGROUP_MAX     followed processes whose cgroup id is kept
 *
 * The loader (kvmtrace/loader.py) adds:
 *
 *   KVM_CREATE_VM, KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES, KVM_MEMORY_ENCRYPT_OP,
 *   KVM_RUN, KVM_GET_API_VERSION, KVMIO
 *       ioctl numbers from include/uapi/linux/kvm.h (kvmtrace/kvmabi.py)
 *   ENDING_EXITS   bit N set: exit reason N (KVM_EXIT_*), returned by a start's
 *                  first KVM_RUN, ends the start (kvmtrace/kvmabi.py)
 *   TDX_VM_TYPE    KVM_X86_TDX_VM: its KVM_MEMORY_ENCRYPT_OP argument is a
 *                  struct kvm_tdx_cmd (64-bit hw_error), else a kvm_sev_cmd
 *   FOLLOW_PROCS   follow processes that touch /dev/kvm to their end
 *                  (sched:sched_process_exit); with EXIT_TRACEPOINT or
 *                  EXIT_KPROBE for the exit status, SIGNAL_TRACEPOINT for the
 *                  signal that killed it, FD_IOCTL_KPROBE for
 *                  KVM_MEMORY_ENCRYPT_OP on kprobe hosts (the VM and vCPU ioctl
 *                  functions); KVM_CALLS for a start's failing KVM ioctls,
 *                  RUN_TRACEPOINT for its first KVM_RUN (kvm:kvm_userspace_exit)
 *   EXEC_TRACEPOINT (+ EXECVEAT_TRACEPOINT) | EXEC_KPROBE
 *                  the command line of every execve, kept per process
 *   FIRST_LAUNCH   probe id of the first launch function point
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
 *   STDERR_CAPTURE (+ OFF_*)   where a followed process's fd 2 is, read when it
 *                  is first followed, at the running kernel's offsets (BTF)
 *
 * and appends one FN_KPROBE / FN_FEXIT_* line per attached function point.
 * Every program below, and what each FN_* macro writes, is in the table of
 * kvmtrace/programs.py, which the loader attaches by (tests/test_contract.py
 * holds this file to it too). The benchmark measures variants of this file
 * through its own overlay (bench/overlay.py), never through knobs in it.
 */
#include <uapi/linux/ptrace.h>
/* Not <linux/sched.h>: it pulls in most of the kernel's headers, and TASK_COMM_LEN is all
 * this file took from it (the contract gives it): a third of every compile, which under
 * the kernel tier's emulation is a minute per kvmtrace start. */

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
	/*
	 * KVM_CREATE_VM: VERDICT_* bits seen inside the call;
	 * KVM_MEMORY_ENCRYPT_OP: the command id; process end: PROC_* bits.
	 */
	u32 verdicts;
	/*
	 * KVM_MEMORY_ENCRYPT_OP: the firmware status (SEV: error; TDX: the upper
	 * 32 bits of hw_error, its status class); process end: the last signal
	 * delivered to it. 0 otherwise.
	 */
	u32 detail;
	char comm[TASK_COMM_LEN];
};

/*
 * What the function probes saw inside one KVM_CREATE_VM (same thread, nested
 * in time): VERDICT_* bits, kept in the count key, so the reason for a
 * rejection is exact even when events are lost.
 */

/*
 * Host-wide totals: (probe, VM type, result), without the process. No process
 * can crowd these out: their keys are bounded whatever processes do (a VM
 * type above VM_TYPE_BUCKET_MAX counts as VM_TYPE_OTHER; the raw value stays
 * in the count key and the event), so TOTALS_MAX holds them all. Per CPU: no
 * atomics, no shared cache lines.
 */
struct total_key {
	u32 probe;
	u32 pad;
	u64 vm_type;
	s64 result;
};

/* One record per completed call, for the live view. */
struct event {
	u64 ts_ns;       /* bpf_ktime_get_ns() at return */
	u64 duration_ns; /* entry to return, 0 when the entry was not seen */
	u64 vm_type;
	s64 result;      /* raw: the fd for an accepted KVM_CREATE_VM */
	u32 tgid;
	u32 tid;
	u32 probe;
	u32 verdicts;    /* as count_key.verdicts */
	u32 detail;      /* as count_key.detail */
	u32 fd;          /* KVM_MEMORY_ENCRYPT_OP: the fd it was issued on (-1: not known) */
	u64 status;      /* KVM_MEMORY_ENCRYPT_OP: the whole firmware status word */
	char comm[TASK_COMM_LEN];
};

/* An ioctl in flight on one thread, between entry and return. */
struct ioctl_call {
	u64 start_ns;
	u64 arg;
	u32 cmd;
	u32 verdicts; /* VERDICT_* bits, set by the function probes */
	s32 fd;       /* KVM_MEMORY_ENCRYPT_OP: the fd (-1: not known) */
	u32 enc_id;   /* KVM_MEMORY_ENCRYPT_OP: the command id read at entry */
	u64 status_in; /* KVM_MEMORY_ENCRYPT_OP: the status word before the call */
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

#define BPF_LRU_HASH(_name, _key_type, _leaf_type, _size) \
	BPF_TABLE("lru_hash", _key_type, _leaf_type, _name, _size)

BPF_HASH(counts, struct count_key, u64, COUNTS_MAX);
/*
 * Each process's share of the counts map: how many keys it has inserted (the
 * exporter deletes a process's entry when it folds that process's keys out of
 * the map). Past COUNTS_PER_PROC keys, a process's new keys fold into one per
 * (probe, VM type bucket, result) under comm "other" with no verdicts or
 * detail (health COUNTS_OVER_SHARE counts those calls): a process that renames
 * itself or cycles through VM types cannot crowd the others out of the map.
 * LRU: losing an entry only gives a process a fresh share.
 */
BPF_LRU_HASH(proc_keys, u32, u32, PROC_KEYS_MAX);
BPF_PERCPU_HASH(totals, struct total_key, u64, TOTALS_MAX);
BPF_HASH(fn_calls, struct fn_key, struct fn_call, CALLS_MAX);
/* Number of tracked ioctls in flight host-wide: the return hook of every
 * ioctl on the host reads it first and stops at once when it is 0. */
BPF_ARRAY(inflight, u64, 1);
/* Number of followed processes in their start: a VM created, no vCPU ran yet.
 * Every KVM ioctl and every KVM_RUN return on the host reads it first and stops
 * at once when it is 0: a process that ran (or any VM once no start is under
 * way) costs nothing more. */
BPF_ARRAY(starting, u64, 1);
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
BPF_ARRAY(create_latency, u64, LATENCY_ENTRIES);
BPF_ARRAY(create_latency_sum, u64, LATENCY_SUM_ENTRIES);

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

static __always_inline void total(u32 probe, u64 vm_type, s64 result)
{
	struct total_key key = {};
	key.probe = probe;
	key.vm_type = vm_type <= VM_TYPE_BUCKET_MAX ? vm_type : VM_TYPE_OTHER;
	key.result = result;
	u64 *v = totals.lookup(&key);
	if (v) {
		(*v)++; /* this CPU's own value */
		return;
	}
	u64 one = 1;
	if (totals.update(&key, &one)) /* a new key on this CPU's side of it */
		health_inc(HEALTH_TOTALS_DROPPED);
}

static __always_inline void count(u32 tgid, u32 probe, u64 vm_type, s64 result,
				  u32 verdicts, u32 detail)
{
	total(probe, vm_type, result);
	struct count_key key = {};
	key.tgid = tgid;
	key.probe = probe;
	key.vm_type = vm_type;
	key.result = result;
	key.verdicts = verdicts;
	key.detail = detail;
	bpf_get_current_comm(&key.comm, sizeof(key.comm));

	u64 *v = counts.lookup(&key);
	if (v) {
		__sync_fetch_and_add(v, 1);
		return;
	}
	/* A new key: within the process's share, or into its overflow key. A
	 * process end (one per process) is never over a share. */
	u32 zero = 0;
	u32 *held = probe == PROBE_PROCESS_END ? 0 :
		proc_keys.lookup_or_try_init(&tgid, &zero);
	if (held && *held >= COUNTS_PER_PROC) {
		health_inc(HEALTH_COUNTS_OVER_SHARE);
		key.vm_type = vm_type <= VM_TYPE_BUCKET_MAX ? vm_type : VM_TYPE_OTHER;
		key.verdicts = 0;
		key.detail = 0;
		__builtin_memset(key.comm, 0, sizeof(key.comm));
		__builtin_memcpy(key.comm, "other", 5);
		held = 0; /* overflow keys are bounded: not against the share */
		v = counts.lookup(&key);
		if (v) {
			__sync_fetch_and_add(v, 1);
			return;
		}
	}
	u64 one = 1;
	/* BPF_NOEXIST: fails with EEXIST when another CPU inserted the key first
	 * (then add to it), with E2BIG when the map is full. */
	if (counts.insert(&key, &one) == 0) {
		/* The exporter's estimate of the map's fill (it subtracts what it
		 * deletes): a pass folds entries out before the map is full. */
		health_inc(HEALTH_COUNTS_INSERTED);
		if (held)
			__sync_fetch_and_add(held, 1);
		return;
	}
	v = counts.lookup(&key);
	if (!v) {
		health_inc(HEALTH_COUNTS_DROPPED);
		return;
	}
	__sync_fetch_and_add(v, 1);
}

/* What an event carries beyond a count key's fields; wake: wake the reader for it (a
 * process's first KVM call: the reader resolves its stderr while it lives). */
struct event_extra {
	u32 detail;
	u32 fd;
	u64 status;
	u32 wake;
};

/* now: bpf_ktime_get_ns() of the caller, read once per call. */
static __always_inline void emit_x(void *ctx, u64 id, u32 probe, u64 vm_type,
				   s64 result, u64 start_ns, u32 verdicts, u64 now,
				   struct event_extra x)
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
	ev.detail = x.detail;
	ev.fd = x.fd;
	ev.status = x.status;
	bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
#ifdef USE_RINGBUF
	/* No wakeup per event: the reader drains the ring at its poll timeout
	 * (100-200 ms), so a traced VMM never pays for waking it -- but for a
	 * process's first call, once per process. */
	u64 rb_flags = x.wake ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
	if (events.ringbuf_output(&ev, sizeof(ev), rb_flags))
		health_inc(HEALTH_EVENTS_LOST);
#else
	if (events.perf_submit(ctx, &ev, sizeof(ev)))
		health_inc(HEALTH_EVENTS_LOST);
#endif
}

static __always_inline void emit_w(void *ctx, u64 id, u32 probe, u64 vm_type,
				   s64 result, u64 start_ns, u32 verdicts, u64 now, u32 wake)
{
	struct event_extra x = {};
	x.fd = (u32)-1;
	x.wake = wake;
	emit_x(ctx, id, probe, vm_type, result, start_ns, verdicts, now, x);
}

static __always_inline void emit(void *ctx, u64 id, u32 probe, u64 vm_type,
				 s64 result, u64 start_ns, u32 verdicts, u64 now)
{
	emit_w(ctx, id, probe, vm_type, result, start_ns, verdicts, now, 0);
}

/* One KVM_CREATE_VM's latency: its log2(ns) slot and the sum, per outcome. */
static __always_inline void latency_record(u32 outcome, u64 ns)
{
	u32 slot = outcome * LATENCY_SLOTS + (bpf_log2l(ns) & (LATENCY_SLOTS - 1));
	u64 *bucket = create_latency.lookup(&slot);
	u64 *sum = create_latency_sum.lookup(&outcome);
	if (bucket)
		__sync_fetch_and_add(bucket, 1);
	if (sum)
		__sync_fetch_and_add(sum, ns);
}


/* ---- followed processes ---------------------------------------------------
 *
 * A process that asks KVM for its VM types or creates a VM is followed until
 * its thread-group leader exits: what it was told, what it created, how its
 * confidential launch went and how it ended. At the end one count (probe
 * PROBE_PROCESS_END) keeps all of it, exactly, however short-lived the
 * process: vm_type = the last KVM_CAP_VM_TYPES answer, result = the do_exit
 * code (status << 8, or the signal), verdicts = PROC_* bits, detail = the last
 * signal delivered. The state is bounded (PROCS_MAX processes, VM_FDS_MAX VM
 * fds each) and freed at the exit.
 */
struct vm_fd {
	s32 fd;
	u32 vm_type;
};

struct proc {
	u64 first_ns;   /* first query or create */
	u64 mask;       /* the last KVM_CAP_VM_TYPES answer (or -errno) */
	u64 last_type;  /* the type of the last accepted KVM_CREATE_VM */
	u32 flags;      /* PROC_* */
	u32 exit_code;  /* do_exit code, when PROC_EXIT_CODE */
	u32 last_signal;
	u32 nfds;
	struct vm_fd fds[VM_FDS_MAX];
};

#ifdef STDERR_CAPTURE
/*
 * Where a followed process's stderr is, read in the kernel when it is first
 * followed, so what its file is survives the process however fast it gives
 * up: fd 2's inode (number, device, mode, rdev), its file position then, and
 * its path as the process's mount namespace names it, the file's own name
 * first (dentries up to their mount's root, then the mount point, to the
 * namespace's root). Read at the running kernel's offsets (OFF_*, from its
 * BTF); a failed read leaves zeros, which the Python side says it could not
 * use. Once per process; nothing on any other path.
 */
struct vmm_stderr {
	u64 ino;
	s64 pos;
	u32 dev;
	u32 rdev;
	u16 mode;
	u16 depth;
	u32 flags;
	char names[STDERR_NAMES_BYTES];
};
BPF_LRU_HASH(vmm_stderr, u32, struct vmm_stderr, STDERR_MAX);
BPF_PERCPU_ARRAY(stderr_scratch, struct vmm_stderr, 1);

static __always_inline u64 kread(u64 base, u32 off)
{
	u64 v = 0;
	if (base)
		bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
	return v;
}

static __always_inline void stderr_capture(u32 tgid)
{
	u32 zero = 0;
	struct vmm_stderr *s = stderr_scratch.lookup(&zero);
	if (!s)
		return;
	s->ino = 0;
	s->pos = 0;
	s->dev = 0;
	s->rdev = 0;
	s->mode = 0;
	s->depth = 0;
	s->flags = 0;
	u64 fdt = kread(kread((u64)bpf_get_current_task(), OFF_TASK_FILES), OFF_FILES_FDT);
	u64 file = kread(kread(fdt, OFF_FDT_FD), 2 * sizeof(u64));
	if (!file) {
		s->flags = STDERR_NO_FILE;
		vmm_stderr.update(&tgid, s);
		return;
	}
	u64 inode = kread(file, OFF_FILE_INODE);
	if (inode) {
		bpf_probe_read_kernel(&s->mode, sizeof(s->mode), (void *)(inode + OFF_INODE_MODE));
		bpf_probe_read_kernel(&s->ino, sizeof(s->ino), (void *)(inode + OFF_INODE_INO));
		bpf_probe_read_kernel(&s->rdev, sizeof(s->rdev), (void *)(inode + OFF_INODE_RDEV));
		u64 sb = kread(inode, OFF_INODE_SB);
		if (sb)
			bpf_probe_read_kernel(&s->dev, sizeof(s->dev), (void *)(sb + OFF_SB_DEV));
	}
	bpf_probe_read_kernel(&s->pos, sizeof(s->pos), (void *)(file + OFF_FILE_POS));
	u64 dentry = kread(file, OFF_FILE_DENTRY);
	u64 vfsmnt = kread(file, OFF_FILE_MNT);
	u64 mnt = vfsmnt ? vfsmnt - OFF_MOUNT_MNT : 0;
	u64 root = kread(vfsmnt, OFF_VFSMOUNT_ROOT);
	/* Mount by mount, and in each the dentries up to its root: loops with one
	 * path that goes on each, so the verifier's work grows with their length,
	 * not with its power (the depth is kept in the map value, not a register). */
	for (int m = 0; m < STDERR_MOUNTS; m++) {
		u32 stop = 0;
		for (int i = 0; i < STDERR_NAMES; i++) {
			if (!dentry || dentry == root)
				break;
			u64 up = kread(dentry, OFF_DENTRY_PARENT);
			u32 n = s->depth;
			if (!up || up == dentry || n >= STDERR_NAMES) {
				stop = 1; /* a filesystem's root not mounted here, or full */
				break;
			}
			bpf_probe_read_kernel_str(&s->names[(n & (STDERR_NAMES - 1)) * STDERR_NAME_LEN],
						  STDERR_NAME_LEN,
						  (void *)kread(dentry, OFF_DENTRY_NAME));
			s->depth = n + 1;
			dentry = up;
		}
		if (stop || !dentry || dentry != root) {
			if (dentry && dentry != root && s->depth >= STDERR_NAMES)
				s->flags |= STDERR_TRUNCATED;
			break;
		}
		/* Its mount's root: on to where that mount is mounted. */
		u64 parent = kread(mnt, OFF_MOUNT_PARENT);
		if (!parent || parent == mnt)
			break; /* the namespace's root */
		dentry = kread(mnt, OFF_MOUNT_MOUNTPOINT);
		mnt = parent;
		root = kread(mnt + OFF_MOUNT_MNT, OFF_VFSMOUNT_ROOT);
	}
	vmm_stderr.update(&tgid, s);
}
#else
static __always_inline void stderr_capture(u32 tgid) {}
#endif /* STDERR_CAPTURE */

#ifdef FOLLOW_PROCS
BPF_HASH(procs, u32, struct proc, PROCS_MAX);
/*
 * The cgroup (v2 id) a followed process was in at its first KVM call, kept
 * past its end (LRU) so that one gone within a millisecond is still
 * attributed to its VM, unit or pod. Once per process.
 */
BPF_LRU_HASH(proc_cgroup, u32, u64, CGROUP_MAX);

static __always_inline struct proc *proc_find(u32 tgid)
{
	return procs.lookup(&tgid);
}

static __always_inline struct proc *proc_follow(u32 tgid, u64 now)
{
	struct proc *p = procs.lookup(&tgid);
	if (p)
		return p;
	struct proc fresh = {};
	fresh.first_ns = now;
	fresh.last_type = (u64)-1;
	/* EEXIST: another thread of it came first; E2BIG: full. */
	if (procs.insert(&tgid, &fresh) == 0) {
		u64 cgroup = bpf_get_current_cgroup_id();
		proc_cgroup.update(&tgid, &cgroup);
		stderr_capture(tgid);
	}
	p = procs.lookup(&tgid);
	if (!p)
		health_inc(HEALTH_PROCS_DROPPED);
	return p;
}

/* The type of the VM behind fd: the create that returned it, else (fd not
 * known: a vCPU fd, a kprobe host, more VMs than slots) the last one. */
static __always_inline u64 proc_vm_type(struct proc *p, s32 fd)
{
	if (fd >= 0) {
#pragma unroll
		for (int i = 0; i < VM_FDS_MAX; i++) {
			if (i < p->nfds && p->fds[i].fd == fd)
				return p->fds[i].vm_type;
		}
	}
	return p->last_type;
}

/* Whether p is in its start: it created a VM and no KVM_RUN has ended the start. */
static __always_inline int proc_starting(struct proc *p)
{
	return (p->flags & (PROC_CREATED | PROC_RAN | PROC_RUN_FAILED)) == PROC_CREATED;
}

static __always_inline void starting_add(s64 n)
{
	u32 zero = 0;
	u64 *v = starting.lookup(&zero);
	if (v)
		__sync_fetch_and_add(v, n);
}

/* Its start is over: a vCPU ran (PROC_RAN), the first run failed
 * (PROC_RUN_FAILED), or the process ended (flag 0). */
static __always_inline void proc_start_over(struct proc *p, u32 flag)
{
	if (proc_starting(p))
		starting_add(-1);
	p->flags |= flag;
}

static __always_inline void proc_created(struct proc *p, s64 fd, u64 vm_type)
{
	if (!(p->flags & PROC_CREATED))
		starting_add(1); /* its first VM: its start is under way */
	p->flags |= PROC_CREATED;
	p->last_type = vm_type;
	u32 n = p->nfds;
	if (n < VM_FDS_MAX) {
		p->fds[n & (VM_FDS_MAX - 1)].fd = (s32)fd;
		p->fds[n & (VM_FDS_MAX - 1)].vm_type = (u32)vm_type;
		p->nfds = n + 1;
	} else {
		p->flags |= PROC_FDS_FULL;
	}
}

/* The leader's exit: the process has ended (exit_group or a fatal signal). */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	if ((u32)id != tgid)
		return 0;
	struct proc *p = procs.lookup(&tgid);
	if (!p)
		return 0;
	proc_start_over(p, 0);
	u64 first = p->first_ns, mask = p->mask;
	u32 flags = p->flags, code = p->exit_code, sig = p->last_signal;
	procs.delete(&tgid);
	if (!(flags & PROC_EXIT_CODE))
		code = 0;
	count(tgid, PROBE_PROCESS_END, mask, code, flags, sig);
	struct event_extra x = {};
	x.detail = sig;
	x.fd = (u32)-1;
	emit_x(args, id, PROBE_PROCESS_END, mask, code, first, flags, bpf_ktime_get_ns(), x);
	return 0;
}

#ifdef SIGNAL_TRACEPOINT
/* The last signal delivered to a followed process (the one that killed it,
 * when it never called exit_group). Not after its exit code is known: then
 * the SIGKILLs exit_group sends its other threads are not news. */
TRACEPOINT_PROBE(signal, signal_deliver)
{
	struct proc *p = proc_find(bpf_get_current_pid_tgid() >> 32);
	if (p && !(p->flags & PROC_EXIT_CODE))
		p->last_signal = (u32)args->sig;
	return 0;
}
#endif

static __always_inline int proc_exit_code(u32 code)
{
	struct proc *p = proc_find(bpf_get_current_pid_tgid() >> 32);
	if (p) {
		p->exit_code = code;
		p->flags |= PROC_EXIT_CODE;
	}
	return 0;
}

#if defined(EXIT_TRACEPOINT)
/* exit_group(status): the kernel's code is (status & 0xff) << 8. */
TRACEPOINT_PROBE(syscalls, sys_enter_exit_group)
{
	return proc_exit_code(((u32)args->error_code & 0xff) << 8);
}
#elif defined(EXIT_KPROBE)
/* void do_exit(long code) of the leader: the group's final code (status << 8,
 * or the fatal signal: the group exit code, not the SIGKILL its threads get). */
int kvmtrace_group_exit(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	if ((u32)id != (u32)(id >> 32))
		return 0;
	return proc_exit_code((u32)PT_REGS_PARM1(ctx));
}
#endif
#else
static __always_inline struct proc *proc_find(u32 tgid) { return 0; }
static __always_inline struct proc *proc_follow(u32 tgid, u64 now) { return 0; }
static __always_inline u64 proc_vm_type(struct proc *p, s32 fd) { return (u64)-1; }
static __always_inline void proc_created(struct proc *p, s64 fd, u64 vm_type) {}
static __always_inline int proc_starting(struct proc *p) { return 0; }
static __always_inline void proc_start_over(struct proc *p, u32 flag) {}
#endif /* FOLLOW_PROCS */

#if defined(EXEC_TRACEPOINT) || defined(EXEC_KPROBE)
/*
 * The command line of every execve, NUL-separated as /proc/PID/cmdline, kept
 * per process (LRU: the oldest go first) so what a VMM asked for is known
 * even when it exited before the exporter could read /proc. Each argument is
 * read up to EXEC_ARG_MAX bytes, at most EXEC_ARGV_MAX of them, until
 * EXEC_ARGS_BYTES - EXEC_ARG_MAX bytes are filled (flags bit 0: truncated).
 */
struct exec_args {
	u32 len;
	u32 flags;
	char args[EXEC_ARGS_BYTES];
};
BPF_LRU_HASH(exec_args, u32, struct exec_args, EXEC_ARGS_MAX);
BPF_PERCPU_ARRAY(exec_scratch, struct exec_args, 1);

static __always_inline int exec_capture(const char *const *argv)
{
	u32 zero = 0;
	struct exec_args *a = exec_scratch.lookup(&zero);
	if (!a)
		return 0;
	u32 off = 0;
	a->flags = 0;
	for (int i = 0; i < EXEC_ARGV_MAX; i++) {
		const char *arg = 0;
		if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i]) || !arg)
			break;
		if (off > EXEC_ARGS_BYTES - EXEC_ARG_MAX) {
			a->flags = 1;
			break;
		}
		long n = bpf_probe_read_user_str(&a->args[off], EXEC_ARG_MAX, arg);
		if (n <= 0)
			break;
		off += n;
		if (i == EXEC_ARGV_MAX - 1)
			a->flags = 1;
	}
	a->len = off;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	exec_args.update(&tgid, a);
	return 0;
}

#ifdef EXEC_TRACEPOINT
TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
	return exec_capture((const char *const *)args->argv);
}

#ifdef EXECVEAT_TRACEPOINT
TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
	return exec_capture((const char *const *)args->argv);
}
#endif
#else
/* kprobes on the syscall's entry (__x64_sys_execve, ...): bcc gives a syscall__
 * program the syscall's own arguments, read from the wrapper's pt_regs. */
int syscall__execve(struct pt_regs *ctx, const char *filename, const char *const *argv)
{
	return exec_capture(argv);
}

int syscall__execveat(struct pt_regs *ctx, int dfd, const char *filename,
		      const char *const *argv)
{
	return exec_capture(argv);
}
#endif
#endif /* EXEC_TRACEPOINT || EXEC_KPROBE */

/* ---- ioctl layer: KVM_CREATE_VM, KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES),
 *      KVM_MEMORY_ENCRYPT_OP, and a start's other KVM ioctls */

static __always_inline int is_query(u32 cmd, u64 arg)
{
	return cmd == KVM_CHECK_EXTENSION && arg == KVM_CAP_VM_TYPES;
}

/* Another KVM ioctl of a process in its start (KVM_RUN is seen where it returns
 * to userspace instead: kvm:kvm_userspace_exit). */
static __always_inline int start_call(u32 cmd)
{
#ifdef KVM_CALLS
	if ((cmd >> 8 & 0xff) != KVMIO || cmd == KVM_RUN)
		return 0;
	u32 zero = 0;
	u64 *n = starting.lookup(&zero);
	if (!n || *n == 0)
		return 0;
	struct proc *p = proc_find(bpf_get_current_pid_tgid() >> 32);
	return p && proc_starting(p);
#else
	return 0;
#endif
}

static __always_inline int ioctl_enter(void *ctx, u32 cmd, u64 arg, s32 fd)
{
	u32 enc_id = 0;
	u64 status_in = 0;
	/* Every ioctl on the host passes here: the command alone decides first. */
#ifdef FOLLOW_PROCS
	if (cmd == KVM_GET_API_VERSION) {
		/* A VMM opening KVM (once, before anything else): an event that wakes the
		 * reader, which then reads where its stderr goes while it surely lives. */
		u64 id = bpf_get_current_pid_tgid();
		if ((u32)(id >> 32) != SELF_TGID)
			emit_w(ctx, id, PROBE_KVM_OPEN, 0, 0, 0, 0, bpf_ktime_get_ns(), 1);
		return 0;
	}
#endif
	if (cmd == KVM_MEMORY_ENCRYPT_OP) {
		/* Only in processes followed since their VM-types query or
		 * create: the command id is the struct's first u32. */
		if (!proc_find(bpf_get_current_pid_tgid() >> 32))
			return 0;
		bpf_probe_read_user(&enc_id, sizeof(enc_id), (void *)arg);
		bpf_probe_read_user(&status_in, sizeof(status_in), (void *)(arg + 16));
	} else if (cmd != KVM_CREATE_VM && !is_query(cmd, arg) && !start_call(cmd)) {
		return 0;
	}
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
	c->fd = fd;
	c->enc_id = enc_id;
	c->status_in = status_in;
	c->cmd = cmd;
	return 0;
}

/* KVM_MEMORY_ENCRYPT_OP returned: its firmware status is in the user struct
 * (kvm_sev_cmd.error, u32 at 16; kvm_tdx_cmd.hw_error, u64 at 16). */
static __always_inline void encrypt_done(void *ctx, u64 id, struct ioctl_call *call,
					 s64 ret, u64 now)
{
	u32 tgid = id >> 32;
	struct proc *p = proc_find(tgid);
	u64 vm_type = p ? proc_vm_type(p, call->fd) : (u64)-1;
	u64 status = 0;
	bpf_probe_read_user(&status, sizeof(status), (void *)(call->arg + 16));
	/* Only what the kernel wrote: a value the caller left there (KVM returns
	 * early without copying the struct back) is not a firmware status. */
	if (status == call->status_in)
		status = 0;
	u32 detail;
	if (vm_type == TDX_VM_TYPE) {
		detail = status >> 32;
	} else {
		status = (u32)status; /* the rest is kvm_sev_cmd.sev_fd */
		detail = (u32)status;
	}
	if (p)
		p->flags |= (ret < 0 || status) ? PROC_LAUNCH_FAILED : PROC_LAUNCH_OK;
	count(tgid, PROBE_ENCRYPT_OP, vm_type, ret < 0 ? ret : 0, call->enc_id, detail);
	struct event_extra x = {};
	x.detail = detail;
	x.fd = (u32)call->fd;
	x.status = status;
	emit_x(ctx, id, PROBE_ENCRYPT_OP, vm_type, ret, call->start_ns, call->enc_id, now, x);
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
	if (call.cmd == KVM_MEMORY_ENCRYPT_OP) {
		encrypt_done(ctx, id, &call, ret, now);
		return 0;
	}
	struct proc *p = proc_follow(tgid, call.start_ns);
	/* Its first query or create: the reader is woken for it. */
	u32 first = p && !(p->flags & (PROC_QUERIED | PROC_CREATED | PROC_CREATE_FAILED));
	if (call.cmd == KVM_CREATE_VM) {
		if (p) {
			if (ret >= 0)
				proc_created(p, ret, call.arg);
			else
				p->flags |= PROC_CREATE_FAILED;
		}
		latency_record(ret < 0, now - call.start_ns);
		/* Success returns a new fd: count it as 0 to keep keys bounded. */
		count(tgid, PROBE_CREATE_VM, call.arg, ret < 0 ? ret : 0, call.verdicts, 0);
		emit_w(ctx, id, PROBE_CREATE_VM, call.arg, ret, call.start_ns, call.verdicts, now,
		       first);
	} else if (is_query(call.cmd, call.arg)) {
		if (p) {
			p->flags |= PROC_QUERIED;
			p->mask = ret;
		}
		count(tgid, PROBE_VM_TYPES_QUERY, 0, ret, 0, 0);
		emit_w(ctx, id, PROBE_VM_TYPES_QUERY, 0, ret, call.start_ns, 0, now, first);
	} else if (ret < 0 && p) {
		/* A start's KVM ioctl failed: its command, errno, and its VM's type. */
		u64 vm_type = proc_vm_type(p, call.fd);
		p->flags |= PROC_CALL_FAILED;
		count(tgid, PROBE_KVM_CALL, vm_type, ret, call.cmd, 0);
		struct event_extra x = {};
		x.fd = (u32)call.fd;
		emit_x(ctx, id, PROBE_KVM_CALL, vm_type, ret, call.start_ns, call.cmd, now, x);
	}
	return 0;
}

#if defined(IOCTL_KPROBE)
/* static long kvm_dev_ioctl(struct file *filp, unsigned int ioctl, unsigned long arg) */
int kvmtrace_ioctl_enter(struct pt_regs *ctx)
{
	return ioctl_enter(ctx, (u32)PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx), -1);
}

int kvmtrace_ioctl_return(struct pt_regs *ctx)
{
	return ioctl_return(ctx, (s64)(long)PT_REGS_RC(ctx));
}
#elif defined(IOCTL_FENTRY)
KFUNC_PROBE(kvm_dev_ioctl, void *filp, unsigned int ioctl, unsigned long arg)
{
	return ioctl_enter(ctx, ioctl, arg, -1);
}

KRETFUNC_PROBE(kvm_dev_ioctl, void *filp, unsigned int ioctl, unsigned long arg, long ret)
{
	return ioctl_return(ctx, ret);
}
#elif defined(IOCTL_TRACEPOINT)
/* Fields from events/syscalls/sys_{enter,exit}_ioctl/format. */
TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
	return ioctl_enter(args, args->cmd, args->arg, (s32)args->fd);
}

TRACEPOINT_PROBE(syscalls, sys_exit_ioctl)
{
	return ioctl_return(args, args->ret);
}
#endif

#ifdef FD_IOCTL_KPROBE
/*
 * KVM_MEMORY_ENCRYPT_OP and a start's other KVM ioctls on VM and vCPU fds where
 * kvm_dev_ioctl is kprobed: they reach long kvm_vm_ioctl(struct file *,
 * unsigned int ioctl, unsigned long arg) (else kvm_arch_vm_ioctl, which only
 * sees the architecture's) and kvm_arch_vcpu_ioctl (the same arguments; not
 * kvm_vcpu_ioctl, which every KVM_RUN passes). The fd is not known, so a call
 * is given its process's last created VM type. ioctl_enter decides which
 * commands are followed.
 */
int kvmtrace_fd_ioctl_enter(struct pt_regs *ctx)
{
	return ioctl_enter(ctx, (u32)PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx), -1);
}

int kvmtrace_fd_ioctl_return(struct pt_regs *ctx)
{
	/* kvm_arch_vm_ioctl returns int on 6.12+ (long before), the others long:
	 * 0, an fd or -errno, all of which fit an int. */
	return ioctl_return(ctx, (s64)(int)PT_REGS_RC(ctx));
}
#endif

#if defined(RUN_TRACEPOINT) && defined(FOLLOW_PROCS)
/*
 * A start's first KVM_RUN, where it returns to userspace (fields from
 * events/kvm/kvm_userspace_exit/format: u32 reason, int errno, 0 or -errno).
 * -EINTR is a signal kicking the vCPU out: neither. An exit that ran (errno 0,
 * a reason not in ENDING_EXITS) ends the start well and costs nothing more;
 * an error or an ending exit is counted once, and ends it too.
 */
TRACEPOINT_PROBE(kvm, kvm_userspace_exit)
{
	u32 zero = 0;
	u64 *n = starting.lookup(&zero);
	if (!n || *n == 0)
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	struct proc *p = proc_find(tgid);
	if (!p || !proc_starting(p))
		return 0;
	s64 err = (s64)args->errno;
	u32 reason = args->reason;
	if (err == -4) /* -EINTR */
		return 0;
	if (err == 0 && !(reason < 64 && (ENDING_EXITS >> reason & 1))) {
		proc_start_over(p, PROC_RAN);
		return 0;
	}
	proc_start_over(p, PROC_RUN_FAILED);
	u64 vm_type = p->last_type;
	count(tgid, PROBE_KVM_RUN, vm_type, err, reason, 0);
	emit(args, id, PROBE_KVM_RUN, vm_type, err, 0, reason, bpf_ktime_get_ns());
	return 0;
}
#endif

/* ---- function points: kvm_arch_init_vm, *_is_vm_type_supported and the
 *      confidential launch's functions (sev_mem_enc_ioctl, ...) ---------- */

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
	/* Tell the enclosing KVM_CREATE_VM on this thread, if any, what we saw
	 * (a launch function's verdict is its own count only). */
	struct ioctl_call *c = call_find();
	if (c && c->cmd == KVM_CREATE_VM && probe < FIRST_LAUNCH) {
		u32 bits;
		if (probe == PROBE_ARCH_INIT_VM)
			bits = VERDICT_ARCH_INIT_SEEN | (result < 0 ? VERDICT_ARCH_INIT_FAILED : 0);
		else
			bits = VERDICT_TYPE_CHECK_SEEN | (result == 0 ? VERDICT_TYPE_CHECK_REJECTED : 0);
		/* Only this thread touches its own entry (it is inside the
		 * ioctl): no atomic needed, and none for u32 before BPF v3. */
		c->verdicts |= bits;
	}
	count(id >> 32, probe, vm_type, result, 0, 0);
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

/* The VM type a launch function works for: the KVM_CREATE_VM or
 * KVM_MEMORY_ENCRYPT_OP in flight on this thread, else the process's last VM. */
static __always_inline u64 context_vm_type(void)
{
	struct ioctl_call *c = call_find();
	if (c && c->cmd == KVM_CREATE_VM)
		return c->arg;
	struct proc *p = proc_find(bpf_get_current_pid_tgid() >> 32);
	if (!p)
		return (u64)-1;
	return proc_vm_type(p, c && c->cmd == KVM_MEMORY_ENCRYPT_OP ? c->fd : -1);
}

/* kprobe + kretprobe on a launch function: int return, VM type from context. */
#define FN_KPROBE_LAUNCH(P)                                                    \
	int kvmtrace_enter_##P(struct pt_regs *ctx)                            \
	{                                                                      \
		return fn_enter(P, context_vm_type());                         \
	}                                                                      \
	int kvmtrace_return_##P(struct pt_regs *ctx)                           \
	{                                                                      \
		return fn_return(ctx, P, (s64)(int)PT_REGS_RC(ctx));           \
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
