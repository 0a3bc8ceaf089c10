// SPDX-License-Identifier: GPL-2.0
/*
 * kvmtrace benchmark series driver: one rejected KVM_CREATE_VM for each of N
 * distinct VM types (BASE .. BASE+N-1), under one comm, then stay alive.
 *
 *   series COMM N BASE
 *
 * Every type but 0 fails with EINVAL on this host, so the exporter's counts
 * map holds N live entries (one per type) for as long as this process lives,
 * and /metrics exports N attempts series plus N rejected series. Prints one
 * JSON line {"comm", "types", "rejected", "other"} once done, then blocks
 * until stdin is closed (or a byte arrives) and exits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	unsigned long n, base, t, rejected = 0, other = 0;
	char c;
	int fd, r;

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
	if (fd < 0) {
		perror("series: open /dev/kvm");
		return 1;
	}
	for (t = base; t < base + n; t++) {
		r = ioctl(fd, KVM_CREATE_VM, t);
		if (r == -1 && errno == EINVAL)
			rejected++;
		else {
			other++;
			if (r >= 0)
				close(r);
		}
	}
	printf("{\"comm\": \"%s\", \"types\": %lu, \"rejected\": %lu, \"other\": %lu}\n",
	       argv[1], n, rejected, other);
	fflush(stdout);
	(void)read(0, &c, 1);
	return other ? 1 : 0;
}
