"""Load BPF programs on the syscall ioctl tracepoints with bcc, for the benchmark.

  bpfload.py floor                  EMPTY programs on syscalls:sys_enter_ioctl and
                                    sys_exit_ioctl: the cost of the hooks alone
  bpfload.py variant NAME [--poll]  kvmtrace's own BPF text as `kvmtrace trace --ebpf`
                                    builds it (SELF_TGID = this process), with the
                                    knobs of variant NAME (bench/variants.py) applied
                                    by bench/overlay.py; --poll drains the ring
                                    buffer like `serve` does

Prints "READY <n tracepoints>" on stdout once the programs are attached (bcc
attaches TRACEPOINT_PROBE programs while loading), then waits for SIGTERM or
SIGINT, detaches and prints the health counters as one JSON line (variants).
Runs under the project's .venv python (bcc from Debian's python3-bpfcc).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

FLOOR = """
TRACEPOINT_PROBE(syscalls, sys_enter_ioctl) { return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_ioctl) { return 0; }
"""


def kvmtrace_text(self_tgid: int) -> str:
    """The exact BPF C `kvmtrace serve` compiles on this host (for our pid)."""
    from kvmtrace import facts as factsmod
    from kvmtrace import loader
    from kvmtrace import plan as planmod

    facts = factsmod.gather()
    opts = loader.Options(self_tgid=self_tgid, use_ringbuf=facts.ringbuf,
                          use_task_storage=facts.task_storage)
    return loader.build_text(planmod.make_plan(facts), opts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["floor", "variant"])
    ap.add_argument("name", nargs="?", default="shipped")
    ap.add_argument("--poll", action="store_true")
    ap.add_argument("--dump", action="store_true", help="print the BPF text and exit")
    args = ap.parse_args()

    if args.what == "floor":
        text = FLOOR
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        import overlay
        import variants

        try:
            text = variants.apply(args.name, kvmtrace_text(os.getpid()))
        except overlay.OverlayError as exc:
            raise SystemExit(f"bpfload: {exc}") from None
    if args.dump:
        print(text)
        return 0

    from bcc import BPF
    from kvmtrace import contract

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    bpf = BPF(text=text.encode())
    n = bpf.num_open_tracepoints()
    if n < 2:
        print(f"only {n} tracepoints attached", file=sys.stderr)
        return 1
    seen = [0]
    polling = args.poll and args.what == "variant"
    if polling:
        bpf[contract.EVENTS_MAP].open_ring_buffer(
            lambda _ctx, _data, _size: seen.__setitem__(0, seen[0] + 1))
    print(f"READY {n}", flush=True)
    while not stop.is_set():
        if polling:
            # poll() only reads rings epoll reported; with BPF_RB_NO_WAKEUP
            # nothing is ever reported, so drain explicitly after each wait.
            bpf.ring_buffer_poll(200)
            bpf.ring_buffer_consume()
        else:
            stop.wait(0.2)
    out = {}
    if args.what == "variant":
        health = bpf[contract.HEALTH_MAP]
        out = {name: sum(health.getvalue(health.Key(i)))
               for i, name in enumerate(contract.HEALTH)}
        out.update(events_seen=seen[0], count_entries=len(bpf[contract.COUNTS_MAP].items()))
    bpf.cleanup()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
