"""``kvmtrace explain``: waits for rejected VM creations and failed VM starts and prints a
report for each; when none was seen, what the host supports."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

from kvmtrace import views
from kvmtrace.attempts import Attempt
from kvmtrace.commands import common
from kvmtrace.decode import Event
from kvmtrace.starts import Start


def run(args) -> int:
    live = common.start(args.strict, filter_pid=args.pid or 0)
    facts = live.facts
    print(views.plan_table(live.attachments), file=sys.stderr)
    seen = 0

    def report(found: Attempt | Start, text: Callable[[int], str]) -> None:
        """One report: numbered, as JSON or as ``text(number)``."""
        nonlocal seen
        if not common.wanted(args, found.pid, found.comm):
            return
        seen += 1
        if args.json:
            print(json.dumps(found.to_json(), sort_keys=True), flush=True)
        else:
            print(text(seen) + "\n", flush=True)

    def on_attempt(a: Attempt) -> None:
        if a.rejected:
            report(a, lambda n: views.attempt_report(a, facts.arch, n))

    def on_event(_ev: Event, done: list[Attempt]) -> None:
        for a in done:
            on_attempt(a)

    def on_start(st: Start) -> None:
        if st.failed:
            report(st, lambda n: views.start_report(st, n))

    live.runtime.on_start = on_start
    live.open_events(on_event)
    print("Waiting for rejected VM creations and failed VM starts... Hit Ctrl-C to end.",
          file=sys.stderr, flush=True)
    began = time.monotonic()
    try:
        live.run(100, on_attempt, duration=args.duration, tick=common.retirer(live))
        live.reader.poll(0)
        live.runtime.retire_exited()  # the starts that ended before the stop
        live.lost_warning()
    finally:
        live.close()
    if not seen:
        kvm = facts.kvm
        if args.json:
            print(json.dumps({"kind": "summary", "rejected_attempts": 0,
                              "host_vm_types_mask": kvm.vm_types_mask,
                              "host_vm_types": kvm.supported_types}))
        else:
            print(f"No rejected VM creation seen in {time.monotonic() - began:.1f} s; "
                  f"{views.host_summary(kvm, facts.arch)}.")
    return 0
