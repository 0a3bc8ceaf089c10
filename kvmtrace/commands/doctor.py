"""``kvmtrace doctor``: the command -- its arguments checked, this host's (or a facts
file's) facts gathered, a test attach and this process's requirements -- handed to the
report builder, kvmtrace/doctor.py (imported here as ``doctor_report``), then printed."""

from __future__ import annotations

import json
import sys

from kvmtrace import access, privileges
from kvmtrace import doctor as doctor_report
from kvmtrace import readiness as readinessmod
from kvmtrace.commands import common
from kvmtrace.commands.common import UserError


def run(args) -> int:
    facts = common.host_facts(args.facts)
    if args.dump_facts:
        print(json.dumps(facts.to_json(), indent=2, sort_keys=True))
        return 0
    known = readinessmod.type_names(facts.arch)
    types = [t.strip().upper() for t in ",".join(args.type or []).split(",") if t.strip()]
    bad = [t for t in types if t not in known]
    if bad:
        raise UserError(f"--type {','.join(bad)}: not a VM type of {facts.arch} (one of "
                        f"{', '.join(known)})", doctor_report.EXIT_INCOMPLETE)
    attachments, load_error = (None, None) if args.facts is not None else \
        doctor_report.attach_test(facts, common.options(0, facts))
    needs = None if args.facts is not None else privileges.requirements(access.gather())
    report = doctor_report.report(facts, attachments, load_error, types or None, needs)
    print(json.dumps(report, indent=2) if args.json else doctor_report.text(report))
    for e in report["errors"]:
        print(f"ERROR: {e}", file=sys.stderr)
    return report["exit_status"]
