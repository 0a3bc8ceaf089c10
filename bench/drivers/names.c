// SPDX-License-Identifier: GPL-2.0
/*
 * kvmtrace benchmark names driver: one rejected KVM_CREATE_VM under each of N
 * distinct process names PREFIX0 .. PREFIX(N-1), of VM type TYPE.
 *
 *   names PREFIX N TYPE rename   one process renames itself (prctl) N times,
 *                                a create under each name; prints one JSON line,
 *                                then stays alive until stdin closes
 *   names PREFIX N TYPE fork     N short-lived children, each named, one create,
 *                                _exit(0); prints one JSON line once all are reaped
 *   names NAME N TYPE repeat     N creates under the one name NAME, then exits
 *
 * JSON: {"mode", "names", "rejected" (EINVAL), "other", "ns"}. TYPE must not be
 * 0 (type 0 creates a real VM). A hostile local user can do exactly this.
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
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int create_as(int fd, const char *prefix, long i, unsigned long type)
{
	char name[16];

	if (i < 0)
		snprintf(name, sizeof(name), "%s", prefix);
	else
		snprintf(name, sizeof(name), "%s%ld", prefix, i);
	if (prctl(PR_SET_NAME, name, 0, 0, 0) != 0)
		return -2;
	if (ioctl(fd, KVM_CREATE_VM, type) == -1 && errno == EINVAL)
		return 0;
	return -1;
}

int main(int argc, char **argv)
{
	unsigned long n, type, i, rejected = 0, other = 0;
	uint64_t t0;
	int fd, fork_mode, repeat, status;
	pid_t pid;
	char c;

	if (argc != 5 || (strcmp(argv[4], "rename") && strcmp(argv[4], "fork") &&
			  strcmp(argv[4], "repeat"))) {
		fprintf(stderr, "usage: %s PREFIX N TYPE rename|fork|repeat\n", argv[0]);
		return 2;
	}
	n = strtoul(argv[2], NULL, 10);
	type = strtoul(argv[3], NULL, 10);
	fork_mode = !strcmp(argv[4], "fork");
	repeat = !strcmp(argv[4], "repeat");
	if (type == 0 || strlen(argv[1]) > 8) {
		fprintf(stderr, "names: TYPE must be > 0, PREFIX at most 8 characters\n");
		return 2;
	}
	fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		perror("names: open /dev/kvm");
		return 1;
	}
	t0 = now_ns();
	for (i = 0; i < n; i++) {
		if (!fork_mode) {
			if (create_as(fd, argv[1], repeat ? -1 : (long)i, type) == 0)
				rejected++;
			else
				other++;
			continue;
		}
		pid = fork();
		if (pid < 0) {
			perror("names: fork");
			return 1;
		}
		if (pid == 0)
			_exit(create_as(fd, argv[1], (long)i, type) == 0 ? 0 : 1);
		if (waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0)
			rejected++;
		else
			other++;
	}
	printf("{\"mode\": \"%s\", \"names\": %lu, \"rejected\": %lu, \"other\": %lu, "
	       "\"ns\": %llu}\n", argv[4], n, rejected, other,
	       (unsigned long long)(now_ns() - t0));
	fflush(stdout);
	if (!fork_mode && !repeat)
		while (read(0, &c, 1) > 0)
			;
	return 0;
}
