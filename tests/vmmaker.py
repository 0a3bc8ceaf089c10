"""A VMM stand-in for the tests: KVM_CREATE_VM of given types under a chosen comm.

    python tests/vmmaker.py --name kvmt-abc --types 0,1,2,5,99 --repeat 3

Prints one JSON line per call: {"vm_type", "ret", "errno"}. Accepted VMs are
closed at once. Uses ctypes so 64-bit types (2**32+1) reach the kernel intact.

    python tests/vmmaker.py --name kvmt-sev --types 0 --sev-cmd 22 --exit 3

issues KVM_MEMORY_ENCRYPT_OP with a struct kvm_sev_cmd of that id on each accepted VM
fd (before closing it) and prints {"sev_cmd", "vm_fd", "ret", "errno", "error"}; --exit
ends with that exit_group status.

    python tests/vmmaker.py --name kvmt-mem --types 0 --step memfd --step run-nomem --exit 1

takes a VM start's steps on each accepted VM, in order, and prints {"step", "cmd",
"ret", "errno"} for each: ``memfd`` KVM_CREATE_GUEST_MEMFD with an undefined flag,
``region2`` KVM_SET_USER_MEMORY_REGION2 on slot 0xffff (past every VM's slots),
``attributes`` KVM_SET_MEMORY_ATTRIBUTES (private) on the first page, ``run-nomem`` a
vCPU with no memory at all run once, ``run-io`` a vCPU whose real-mode guest writes to
an I/O port, run once (it ran). --kmsg writes a line to the kernel log (root), --say
one to its stderr before it exits.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import threading
import time

KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_CAP_VM_TYPES = 235
KVM_MEMORY_ENCRYPT_OP = 0xC008AEBA  # _IOWR(KVMIO, 0xba, unsigned long)
PR_SET_NAME = 15
# include/uapi/linux/kvm.h (x86-64 sizes; kvmtrace/kvmabi.py holds the same numbers)
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_SET_USER_MEMORY_REGION2 = 0x40A0AE49
KVM_CREATE_GUEST_MEMFD = 0xC040AED4
KVM_SET_MEMORY_ATTRIBUTES = 0x4020AED2
KVM_RUN = 0xAE80
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_SET_REGS = 0x4090AE82
KVM_EXIT_IO = 2
STEPS = ("memfd", "region2", "attributes", "run-nomem", "run-io")


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


def _buf_ioctl(fd: int, request: int, buf) -> tuple[int, int]:
    ret = libc.ioctl(fd, ctypes.c_ulong(request), ctypes.byref(buf))
    return ret, (ctypes.get_errno() if ret < 0 else 0)


def _vcpu(kvm_fd: int, vm_fd: int) -> tuple[int, int, object]:
    """A vCPU of ``vm_fd``: (fd or -1, errno, its mmap'd struct kvm_run or None)."""
    import mmap
    vcpu, err = ioctl(vm_fd, KVM_CREATE_VCPU, 0)
    if vcpu < 0:
        return vcpu, err, None
    size, _ = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0)
    return vcpu, 0, mmap.mmap(vcpu, size)


def step(kvm_fd: int, vm_fd: int, name: str, record) -> None:
    """One step of a VM start on ``vm_fd`` (see the module's docstring)."""
    import mmap
    if name == "memfd":  # struct kvm_create_guest_memfd: size, flags, reserved[6]
        arg, req = (ctypes.c_uint64 * 8)(4096, 1 << 63), KVM_CREATE_GUEST_MEMFD
    elif name == "region2":  # struct kvm_userspace_memory_region2 (160 bytes)
        arg, req = (ctypes.c_uint32 * 40)(0xFFFF), KVM_SET_USER_MEMORY_REGION2
    elif name == "attributes":  # struct kvm_memory_attributes: address, size, attributes
        arg, req = (ctypes.c_uint64 * 4)(0, 4096, 1 << 3), KVM_SET_MEMORY_ATTRIBUTES
    if name in ("memfd", "region2", "attributes"):
        ret, err = _buf_ioctl(vm_fd, req, arg)
        record(step=name, cmd=hex(req), ret=ret, errno=err)
        if ret >= 0 and name == "memfd":
            os.close(ret)
        return
    guest = None
    if name == "run-io":  # out 0x10, al; inc al; jmp back -- at guest physical 0x1000
        guest = mmap.mmap(-1, 4096)
        guest.write(bytes([0xE6, 0x10, 0xFE, 0xC0, 0xEB, 0xFA]))
        region = (ctypes.c_uint64 * 4)(0, 0x1000, 4096, ctypes.addressof(
            ctypes.c_char.from_buffer(guest)))  # slot 0, flags 0
        ret, err = _buf_ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, region)
        if ret < 0:
            record(step=name, cmd=hex(KVM_SET_USER_MEMORY_REGION), ret=ret, errno=err)
            return
    vcpu, err, run = _vcpu(kvm_fd, vm_fd)
    if vcpu < 0:
        record(step=name, cmd=hex(KVM_CREATE_VCPU), ret=vcpu, errno=err)
        return
    if guest is not None:  # real mode at 0x1000: cs.base and cs.selector 0, rip 0x1000
        sregs = (ctypes.c_uint8 * 312)()
        _buf_ioctl(vcpu, KVM_GET_SREGS, sregs)
        ctypes.memset(ctypes.addressof(sregs), 0, 8)  # cs.base
        ctypes.memset(ctypes.addressof(sregs) + 12, 0, 2)  # cs.selector
        _buf_ioctl(vcpu, KVM_SET_SREGS, sregs)
        regs = (ctypes.c_uint64 * 18)()
        regs[16], regs[17] = 0x1000, 2  # rip, rflags
        _buf_ioctl(vcpu, KVM_SET_REGS, regs)
    ret, err = ioctl(vcpu, KVM_RUN, 0)
    exit_reason = int.from_bytes(run[8:12], "little")  # struct kvm_run.exit_reason
    record(step=name, cmd=hex(KVM_RUN), ret=ret, errno=err, exit_reason=exit_reason)
    run.close()
    os.close(vcpu)


def create_vm(kvm_fd: int, vm_type: int, sev_cmd: int | None = None,
              record=None, steps: tuple[str, ...] = ()) -> tuple[int, int]:
    ret, err = ioctl(kvm_fd, KVM_CREATE_VM, vm_type)
    if ret >= 0:
        for name in steps:
            step(kvm_fd, ret, name, record)
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
    ap.add_argument("--step", action="append", choices=STEPS, default=[],
                    help="a VM start's step on each VM made, in order (repeatable)")
    ap.add_argument("--kmsg", action="append", default=[],
                    help="write this line to /dev/kmsg after the VMs' steps (repeatable)")
    ap.add_argument("--say", action="append", default=[],
                    help="write this line to stderr before exiting (repeatable)")
    ap.add_argument("--exit", type=int, default=0, help="exit status (exit_group)")
    ap.add_argument("--hold", type=float, default=0.0,
                    help="stay alive this many seconds before exiting (a live process)")
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
                    ret, err = create_vm(fd, t, args.sev_cmd, record, tuple(args.step))
                    record(vm_type=t, ret=ret, errno=err, tid=threading.get_native_id())
    for line in args.kmsg:  # one record per write (Documentation/ABI/testing/dev-kmsg)
        kmsg = os.open("/dev/kmsg", os.O_WRONLY)
        try:
            os.write(kmsg, line.encode())
        finally:
            os.close(kmsg)
    for o in out:
        print(json.dumps(o))
    os.close(fd)
    sys.stdout.flush()
    for line in args.say:
        print(line, file=sys.stderr, flush=True)
    time.sleep(args.hold)
    return args.exit


if __name__ == "__main__":
    sys.exit(main())
