"""``kvmtrace trace``: one line (or JSON line) per KVM_CREATE_VM attempt, KVM_CAP_VM_TYPES
query and type check, bcc tool style; ``--ebpf`` prints the BPF C of this host's plan."""

from __future__ import annotations

import json
import sys

from kvmtrace import loader as loadermod
from kvmtrace import plan as planmod
from kvmtrace import views
from kvmtrace.attempts import Attempt
from kvmtrace.commands import common
from kvmtrace.decode import Event
from kvmtrace.starts import Start


def run(args) -> int:
    if args.ebpf:
        facts = common.host_facts(args.facts)
        print(loadermod.build_text(planmod.make_plan(facts),
                                   common.options(args.pid or 0, facts)))
        return 0
    live = common.start(args.strict, filter_pid=args.pid or 0)
    arch = live.facts.arch
    print(views.plan_table(live.attachments), file=sys.stderr)
    if not args.json:
        print(views.event_header(args.time), flush=True)

    def on_attempt(a: Attempt) -> None:  # a chain no KVM_CREATE_VM claimed
        if not common.wanted(args, a.pid, a.comm) or (args.failed and not a.rejected):
            return
        if args.json:
            print(json.dumps({"kind": "attempt", "attempt": a.to_json()}, sort_keys=True))
        else:
            print("\n".join(views.attempt_note(a)), flush=True)

    def on_event(ev: Event, done: list[Attempt]) -> None:
        for a in done[:-1] if ev.probe == planmod.CREATE_VM else done:
            on_attempt(a)
        if (args.failed and not ev.rejected) or not common.wanted(args, ev.pid, ev.comm):
            return
        attempt = done[-1] if ev.probe == planmod.CREATE_VM and done else None
        if args.json:
            data = json.loads(views.event_json(ev, arch))
            data["kind"] = "event"
            if attempt is not None:
                data["attempt"] = attempt.to_json()
            print(json.dumps(data, sort_keys=True), flush=True)
        else:
            lines = [views.event_line(ev, arch, args.time)]
            if attempt is not None:
                lines += views.attempt_note(attempt)
            print("\n".join(lines), flush=True)

    def on_start(st: Start) -> None:
        if not common.wanted(args, st.pid, st.comm) or (args.failed and not st.failed):
            return
        if args.json:
            print(json.dumps(st.to_json(), sort_keys=True), flush=True)
        elif st.failed:
            print("\n".join(views.start_note(st)), flush=True)

    live.runtime.on_start = on_start
    live.open_events(on_event)
    print("Tracing KVM VM-type dispatch... Hit Ctrl-C to end.", file=sys.stderr, flush=True)
    try:
        live.run(100, on_attempt, duration=args.duration, tick=common.retirer(live))
        live.runtime.retire_exited()  # the starts that ended before the stop
        live.lost_warning()
    finally:
        live.close()
    return 0
