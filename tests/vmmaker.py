"""A VMM stand-in for the tests: KVM_CREATE_VM of given types under a chosen comm.

    python tests/vmmaker.py --name kvmt-abc --types 0,1,2,5,99 --repeat 3

Prints one JSON line per call: {"vm_type", "ret", "errno"}. Accepted VMs are
closed at once. Uses ctypes so 64-bit types (2**32+1) reach the kernel intact.

    python tests/vmmaker.py --name kvmt-sev --types 0 --sev-cmd 22 --exit 3

issues KVM_MEMORY_ENCRYPT_OP with a struct kvm_sev_cmd of that id on each accepted VM
fd (before closing it) and prints {"sev_cmd", "vm_fd", "ret", "errno", "error"}; --exit
ends with that exit_group status.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import threading

KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_CAP_VM_TYPES = 235
KVM_MEMORY_ENCRYPT_OP = 0xC008AEBA  # _IOWR(KVMIO, 0xba, unsigned long)
PR_SET_NAME = 15


class KvmSevCmd(ctypes.Structure):
    """struct kvm_sev_cmd (include/uapi/linux/kvm.h)."""

    _fields_ = [("id", ctypes.c_uint32), ("pad0", ctypes.c_uint32), ("data", ctypes.c_uint64),
                ("error", ctypes.c_uint32), ("sev_fd", ctypes.c_uint32)]

libc = ctypes.CDLL(None, use_errno=True)


def set_comm(name: str) -> None:
    if libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


def ioctl(fd: int, request: int, arg: int) -> tuple[int, int]:
    ret = libc.ioctl(fd, ctypes.c_ulong(request), ctypes.c_ulong(arg))
    return ret, (ctypes.get_errno() if ret < 0 else 0)


def create_vm(kvm_fd: int, vm_type: int, sev_cmd: int | None = None,
              record=None) -> tuple[int, int]:
    ret, err = ioctl(kvm_fd, KVM_CREATE_VM, vm_type)
    if ret >= 0:
        if sev_cmd is not None:
            cmd = KvmSevCmd(id=sev_cmd, sev_fd=0xFFFFFFFF)
            r = libc.ioctl(ret, ctypes.c_ulong(KVM_MEMORY_ENCRYPT_OP), ctypes.byref(cmd))
            record(sev_cmd=sev_cmd, vm_fd=ret, ret=r, errno=ctypes.get_errno() if r < 0 else 0,
                   error=cmd.error)
        os.close(ret)
    return ret, err


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--types", default="0")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--queries", type=int, default=0)
    ap.add_argument("--exhaust-fds", action="store_true",
                    help="lower RLIMIT_NOFILE so no fd is free: KVM_CREATE_VM gets EMFILE")
    ap.add_argument("--names", type=int, default=0,
                    help="rename itself N times (NAME-0 ... NAME-{N-1}), the calls under each")
    ap.add_argument("--threads", type=int, default=0,
                    help="N threads; thread i creates types[i %% len(types)] --repeat times")
    ap.add_argument("--sev-cmd", type=int, default=None,
                    help="KVM_MEMORY_ENCRYPT_OP with this kvm_sev_cmd id on each VM made")
    ap.add_argument("--exit", type=int, default=0, help="exit status (exit_group)")
    args = ap.parse_args()
    set_comm(args.name)
    types = [int(x, 0) for x in args.types.split(",")]
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    out: list[dict] = []
    lock = threading.Lock()

    def record(**kw) -> None:
        with lock:
            out.append(kw)

    for _ in range(args.queries):
        ret, err = ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES)
        record(query=True, ret=ret, errno=err)
    if args.exhaust_fds:
        lowest_free = os.dup(0)
        os.close(lowest_free)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    if args.threads:
        barrier = threading.Barrier(args.threads)

        def worker(i: int) -> None:
            t = types[i % len(types)]
            barrier.wait()
            for _ in range(args.repeat):
                ret, err = create_vm(fd, t)
                record(vm_type=t, ret=ret, errno=err, tid=threading.get_native_id())

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    else:
        for i in range(max(1, args.names)):
            if args.names:
                set_comm(f"{args.name}-{i}")
            for _ in range(args.repeat):
                for t in types:
                    ret, err = create_vm(fd, t, args.sev_cmd, record)
                    record(vm_type=t, ret=ret, errno=err, tid=threading.get_native_id())
    for o in out:
        print(json.dumps(o))
    os.close(fd)
    sys.stdout.flush()
    return args.exit


if __name__ == "__main__":
    sys.exit(main())
