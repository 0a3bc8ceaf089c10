// SPDX-License-Identifier: GPL-2.0
/*
 * kvmtrace benchmark storm driver: N rejected KVM_CREATE_VM (type 1) calls as
 * fast as possible, under a given comm.
 *
 *   storm COMM N
 *
 * Opens /dev/kvm, prints "ready", waits for one byte on stdin (so several
 * storms start together), then issues the N calls and prints one JSON line:
 * {"comm", "calls", "rejected" (EINVAL), "other", "ns"}.
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
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	unsigned long n, i, rejected = 0, other = 0;
	uint64_t t0, t1;
	char go;
	int fd;

	if (argc != 3) {
		fprintf(stderr, "usage: %s COMM N\n", argv[0]);
		return 2;
	}
	n = strtoul(argv[2], NULL, 10);
	if (prctl(PR_SET_NAME, argv[1], 0, 0, 0) != 0) {
		perror("storm: prctl");
		return 1;
	}
	fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		perror("storm: open /dev/kvm");
		return 1;
	}
	printf("ready\n");
	fflush(stdout);
	if (read(0, &go, 1) != 1)
		return 1;
	t0 = now_ns();
	for (i = 0; i < n; i++) {
		if (ioctl(fd, KVM_CREATE_VM, 1UL) == -1 && errno == EINVAL)
			rejected++;
		else
			other++;
	}
	t1 = now_ns();
	printf("{\"comm\": \"%s\", \"calls\": %lu, \"rejected\": %lu, \"other\": %lu, "
	       "\"ns\": %llu}\n", argv[1], n, rejected, other, (unsigned long long)(t1 - t0));
	return other ? 1 : 0;
}
