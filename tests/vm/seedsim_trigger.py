"""Drive the seedsim module (a test-only SIMULATION of the 2023 TDX v12 vm_type dispatch).

    python tests/vm/seedsim_trigger.py --name kvmt-seed --vendor svm --types 0,1,2,5 --repeat 3

Selects the simulated vendor callback, then writes each type to
/sys/kernel/debug/kvmtrace_seedsim/vm_type, which calls the simulated
kvm_is_vm_type_supported(type). Prints one JSON line per call:
{"vendor", "vm_type", "ok", "errno"} (the write fails with EINVAL when the type is
not supported). Runs under the chosen comm, so the test can find its counts.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys

DEBUGFS = "/sys/kernel/debug/kvmtrace_seedsim"
PR_SET_NAME = 15


def set_comm(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--vendor", choices=("vmx", "svm"), required=True)
    ap.add_argument("--types", default="0")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    set_comm(args.name)
    with open(f"{DEBUGFS}/vendor", "w") as f:
        f.write(args.vendor)
    fd = os.open(f"{DEBUGFS}/vm_type", os.O_WRONLY)
    try:
        for _ in range(args.repeat):
            for t in (int(x, 0) for x in args.types.split(",")):
                try:
                    os.write(fd, f"{t}\n".encode())
                    ok, err = True, 0
                except OSError as exc:
                    ok, err = False, exc.errno
                print(json.dumps({"vendor": args.vendor, "vm_type": t, "ok": ok, "errno": err}))
    finally:
        os.close(fd)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
