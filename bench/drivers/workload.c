// SPDX-License-Identifier: GPL-2.0
/*
 * kvmtrace benchmark workload driver: one syscall (or process lifecycle) in a
 * tight loop, timed with clock_gettime(CLOCK_MONOTONIC) around the loop.
 *
 *   workload MODE SECONDS [COMM]
 *   workload exit [ARG...]     exits 0 at once: what fork_exec_exit execs
 *
 * MODE:
 *   fionread         ioctl(pipe, FIONREAD)                  an unrelated ioctl
 *   getppid          syscall(SYS_getppid)                   not an ioctl at all
 *   create_rejected  ioctl(/dev/kvm, KVM_CREATE_VM, 1)      fails with EINVAL here
 *   create_accepted  ioctl(/dev/kvm, KVM_CREATE_VM, 0) + close(vm fd)
 *   check_ext        ioctl(/dev/kvm, KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES=235)
 *   fork_exit        fork(); the child _exit(0)s at once, the parent waitpid()s it
 *   fork_exec_exit   fork(); the child execve()s this driver as `workload exit` with
 *                    a VMM-like command line (EXEC_ARGS arguments of EXEC_ARG_LEN
 *                    bytes: 20 of 40), which exits 0 at once; the parent waitpid()s it
 *   write_pipe       write(pipe, 8 bytes) then read(pipe, 8 bytes) back: small writes,
 *                    as a VMM's log lines (a host-wide write loop)
 *   write_null       write(/dev/null, 64 bytes)
 *   kvm_run_io       KVM_RUN of a tiny real-mode guest that writes to an I/O port in
 *                    a loop: every run comes back with KVM_EXIT_IO (a VM that ran:
 *                    kvmtrace's start-following must cost it nothing)
 *
 * Runs a short warm-up (a tenth of SECONDS), then batches of calls until
 * SECONDS have passed (the clock is read once per batch, so its cost is
 * negligible). COMM (optional) renames the process (prctl PR_SET_NAME) so a
 * tracer's per-comm counts can be checked against "calls".
 *
 * Prints one JSON line: {"mode", "ops" (timed), "ns" (timed), "ns_per_op",
 * "calls" (timed + warm-up: what a tracer must have counted)}. Exits 1 when a
 * call does not behave as documented (e.g. type 1 accepted).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef KVM_CAP_VM_TYPES
#define KVM_CAP_VM_TYPES 235
#endif

/* fork_exec_exit: arguments after `exit`, about as many and as long as a VMM's. */
#define EXEC_ARGS 20
#define EXEC_ARG_LEN 40

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "workload: %s: %s\n", what, strerror(errno));
	exit(1);
}

enum mode { FIONREAD_M, GETPPID_M, CREATE_REJ_M, CREATE_ACC_M, CHECK_EXT_M, FORK_EXIT_M,
	    FORK_EXEC_EXIT_M, WRITE_PIPE_M, WRITE_NULL_M, KVM_RUN_IO_M };

extern char **environ;

static int fd = -1;
static int pipefd[2];
static unsigned long bad; /* calls that did not behave as documented */
static char self[4096];	  /* fork_exec_exit: this driver's path */
static char exec_buf[EXEC_ARGS][EXEC_ARG_LEN + 1];
static char *exec_argv[EXEC_ARGS + 3];
static int vcpu = -1;	       /* kvm_run_io */
static struct kvm_run *run;

/* kvm_run_io: a VM with one page at 0x1000 holding "out 0x10, al; inc al; jmp back",
 * one vCPU in real mode at 0x1000 (measured: ~8 us per KVM_RUN on this host's KVM). */
static void guest_setup(void)
{
	static const unsigned char code[] = { 0xe6, 0x10, 0xfe, 0xc0, 0xeb, 0xfa };
	struct kvm_userspace_memory_region region = { 0 };
	struct kvm_sregs sregs;
	struct kvm_regs regs = { 0 };
	void *mem;
	int vm, size;

	vm = ioctl(fd, KVM_CREATE_VM, 0UL);
	if (vm < 0)
		die("KVM_CREATE_VM");
	mem = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	memcpy(mem, code, sizeof(code));
	region.guest_phys_addr = 0x1000;
	region.memory_size = 0x1000;
	region.userspace_addr = (uint64_t)(uintptr_t)mem;
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0UL);
	size = ioctl(fd, KVM_GET_VCPU_MMAP_SIZE, 0UL);
	if (vcpu < 0 || size <= 0)
		die("KVM_CREATE_VCPU");
	run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	regs.rip = 0x1000;
	regs.rflags = 2;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
}

/* One fork whose child exits 0 (after an exec of `self exit ...` when exec is set). */
static void spawn_one(int exec)
{
	int status;
	pid_t pid = fork();

	if (pid == 0) {
		if (exec)
			execve(self, exec_argv, environ);
		_exit(exec ? 127 : 0);
	}
	if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) ||
	    WEXITSTATUS(status) != 0)
		bad++;
}

/* One batch of n calls of the mode's syscall. */
static void batch(enum mode m, unsigned long n)
{
	unsigned long i;
	int avail, r;
	static char buf[64];

	switch (m) {
	case FIONREAD_M:
		for (i = 0; i < n; i++)
			if (ioctl(pipefd[0], FIONREAD, &avail) != 0)
				bad++;
		break;
	case GETPPID_M:
		for (i = 0; i < n; i++)
			if (syscall(SYS_getppid) <= 0)
				bad++;
		break;
	case CREATE_REJ_M:
		for (i = 0; i < n; i++)
			if (ioctl(fd, KVM_CREATE_VM, 1UL) != -1 || errno != EINVAL)
				bad++;
		break;
	case CREATE_ACC_M:
		for (i = 0; i < n; i++) {
			r = ioctl(fd, KVM_CREATE_VM, 0UL);
			if (r < 0)
				bad++;
			else
				close(r);
		}
		break;
	case CHECK_EXT_M:
		for (i = 0; i < n; i++)
			if (ioctl(fd, KVM_CHECK_EXTENSION, (unsigned long)KVM_CAP_VM_TYPES) < 0)
				bad++;
		break;
	case FORK_EXIT_M:
	case FORK_EXEC_EXIT_M:
		for (i = 0; i < n; i++)
			spawn_one(m == FORK_EXEC_EXIT_M);
		break;
	case WRITE_PIPE_M:
		for (i = 0; i < n; i++)
			if (write(pipefd[1], "kvmtrace", 8) != 8 || read(pipefd[0], buf, 8) != 8)
				bad++;
		break;
	case WRITE_NULL_M:
		for (i = 0; i < n; i++)
			if (write(fd, buf, 64) != 64)
				bad++;
		break;
	case KVM_RUN_IO_M:
		for (i = 0; i < n; i++)
			if (ioctl(vcpu, KVM_RUN, 0UL) != 0 || run->exit_reason != KVM_EXIT_IO)
				bad++;
		break;
	}
}

int main(int argc, char **argv)
{
	static const struct { const char *name; enum mode m; unsigned long batch; } modes[] = {
		{ "fionread", FIONREAD_M, 1000 },
		{ "getppid", GETPPID_M, 1000 },
		{ "create_rejected", CREATE_REJ_M, 200 },
		{ "create_accepted", CREATE_ACC_M, 1 },
		{ "check_ext", CHECK_EXT_M, 1000 },
		{ "fork_exit", FORK_EXIT_M, 1 },
		{ "fork_exec_exit", FORK_EXEC_EXIT_M, 1 },
		{ "write_pipe", WRITE_PIPE_M, 1000 },
		{ "write_null", WRITE_NULL_M, 1000 },
		{ "kvm_run_io", KVM_RUN_IO_M, 100 },
	};
	const char *name;
	enum mode m;
	unsigned long bsz = 0, ops = 0, warm = 0;
	uint64_t t0, t1, budget, deadline;
	double seconds;
	size_t i;
	ssize_t len;

	if (argc >= 2 && strcmp(argv[1], "exit") == 0)
		return 0;
	if (argc < 3) {
		fprintf(stderr, "usage: %s MODE SECONDS [COMM]\n", argv[0]);
		return 2;
	}
	name = argv[1];
	for (i = 0; i < sizeof(modes) / sizeof(modes[0]); i++)
		if (strcmp(modes[i].name, name) == 0)
			break;
	if (i == sizeof(modes) / sizeof(modes[0])) {
		fprintf(stderr, "workload: unknown mode %s\n", name);
		return 2;
	}
	m = modes[i].m;
	bsz = modes[i].batch;
	seconds = atof(argv[2]);
	if (seconds <= 0) {
		fprintf(stderr, "workload: bad SECONDS %s\n", argv[2]);
		return 2;
	}
	if (argc > 3 && prctl(PR_SET_NAME, argv[3], 0, 0, 0) != 0)
		die("prctl(PR_SET_NAME)");

	if (m == FIONREAD_M || m == WRITE_PIPE_M) {
		if (pipe(pipefd) != 0)
			die("pipe");
	} else if (m == WRITE_NULL_M) {
		fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
		if (fd < 0)
			die("open /dev/null");
	} else if (m == FORK_EXEC_EXIT_M) {
		len = readlink("/proc/self/exe", self, sizeof(self) - 1);
		if (len <= 0 || (size_t)len >= sizeof(self) - 1)
			die("readlink /proc/self/exe");
		self[len] = '\0';
		exec_argv[0] = self;
		exec_argv[1] = "exit";
		for (i = 0; i < EXEC_ARGS; i++) {
			/* "-drive if=virtio,file=disk07.qcow2,id=dx", padded to EXEC_ARG_LEN */
			len = snprintf(exec_buf[i], sizeof(exec_buf[i]),
				       "-drive if=virtio,file=disk%02zu.qcow2,id=d", i);
			memset(exec_buf[i] + len, 'x', EXEC_ARG_LEN - len);
			exec_argv[i + 2] = exec_buf[i];
		}
		exec_argv[EXEC_ARGS + 2] = NULL;
	} else if (m != GETPPID_M && m != FORK_EXIT_M) {
		fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
		if (fd < 0)
			die("open /dev/kvm");
		if (m == KVM_RUN_IO_M)
			guest_setup();
	}

	budget = (uint64_t)(seconds * 1e9);
	/* Warm-up: caches, branch predictors, page tables, CPU frequency. */
	t0 = now_ns();
	deadline = t0 + budget / 10;
	do {
		batch(m, bsz);
		warm += bsz;
	} while (now_ns() < deadline);

	t0 = now_ns();
	deadline = t0 + budget;
	do {
		batch(m, bsz);
		ops += bsz;
		t1 = now_ns();
	} while (t1 < deadline);

	if (bad) {
		fprintf(stderr, "workload: %s: %lu of %lu calls did not behave as documented\n",
			name, bad, ops + warm);
		return 1;
	}
	printf("{\"mode\": \"%s\", \"ops\": %lu, \"ns\": %llu, \"ns_per_op\": %.2f, "
	       "\"calls\": %lu}\n",
	       name, ops, (unsigned long long)(t1 - t0), (double)(t1 - t0) / ops, ops + warm);
	return 0;
}
