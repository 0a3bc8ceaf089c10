// SPDX-License-Identifier: GPL-2.0
/*
 * kvmtrace benchmark series driver: one rejected KVM_CREATE_VM for each of N
 * distinct VM types (BASE .. BASE+N-1), under one comm, then stay alive.
 *
 *   series COMM N BASE
 *
 * Every type but 0 fails with EINVAL on this host, so the exporter's counts
 * map holds N live entries (one per type) for as long as the driver lives,
 * and /metrics exports N attempts series plus N rejected series. The types
 * are split over children of SLICE types each (all named COMM): a process's
 * share of the counts map is 256 keys, past it the kernel folds its keys into
 * comm "other". Prints one JSON line {"comm", "types", "rejected", "other",
 * "processes"} once every child is done, then blocks until stdin is closed
 * (the children too: they inherit it) and exits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#define SLICE 200

static void slice(int fd, unsigned long from, unsigned long to, int out)
{
	unsigned long t, res[2] = {0, 0}; /* rejected, other */
	char c;
	int r;

	for (t = from; t < to; t++) {
		r = ioctl(fd, KVM_CREATE_VM, t);
		if (r == -1 && errno == EINVAL)
			res[0]++;
		else {
			res[1]++;
			if (r >= 0)
				close(r);
		}
	}
	if (write(out, res, sizeof(res)) != sizeof(res))
		_exit(1);
	close(out);
	while (read(0, &c, 1) > 0)
		;
	_exit(0);
}

int main(int argc, char **argv)
{
	unsigned long n, base, t, rejected = 0, other = 0, res[2];
	int fd, pipefd[2], procs = 0, status, bad = 0;
	char c;

	if (argc != 4) {
		fprintf(stderr, "usage: %s COMM N BASE\n", argv[0]);
		return 2;
	}
	n = strtoul(argv[2], NULL, 10);
	base = strtoul(argv[3], NULL, 10);
	if (base == 0) {
		fprintf(stderr, "series: BASE must be > 0 (type 0 creates a real VM)\n");
		return 2;
	}
	if (prctl(PR_SET_NAME, argv[1], 0, 0, 0) != 0) {
		perror("series: prctl");
		return 1;
	}
	fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (fd < 0 || pipe(pipefd) != 0) {
		perror("series: open /dev/kvm, pipe");
		return 1;
	}
	for (t = base; t < base + n; t += SLICE, procs++) {
		pid_t pid = fork();

		if (pid < 0) {
			perror("series: fork");
			return 1;
		}
		if (pid == 0) {
			close(pipefd[0]);
			slice(fd, t, t + SLICE < base + n ? t + SLICE : base + n, pipefd[1]);
		}
	}
	close(pipefd[1]);
	while (read(pipefd[0], res, sizeof(res)) == sizeof(res)) {
		rejected += res[0];
		other += res[1];
	}
	printf("{\"comm\": \"%s\", \"types\": %lu, \"rejected\": %lu, \"other\": %lu, "
	       "\"processes\": %d}\n", argv[1], n, rejected, other, procs);
	fflush(stdout);
	while (read(0, &c, 1) > 0)
		;
	while (wait(&status) > 0)
		if (!WIFEXITED(status) || WEXITSTATUS(status))
			bad = 1;
	return other || bad ? 1 : 0;
}
