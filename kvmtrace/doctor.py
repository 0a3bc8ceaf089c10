"""doctor: can this host run each VM type, and can it be traced? The report, from the
host facts (with their readiness evidence) and an attach test.

:func:`report` is pure (facts and attach results in, a JSON-ready dict out), so tests
hand it the facts of other hosts; :func:`attach_test` really loads and attaches the
plan in this process and detaches again (doctor exits right after: no loader child).
The per-type chains are :mod:`kvmtrace.readiness`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmtrace import __version__, checks, kernellog, tables
from kvmtrace import facts as factsmod
from kvmtrace import loader as loadermod
from kvmtrace import plan as planmod
from kvmtrace import readiness as readinessmod

# Exit statuses: the asked VM types are usable and tracing works; a FAIL (or an asked
# type that cannot apply here); the run could not decide (a check lacked what it needs,
# or the facts could not be read).
EXIT_OK, EXIT_FAIL, EXIT_INCOMPLETE = 0, 1, 2


def attach_test(facts: factsmod.HostFacts, opts: loadermod.Options
                ) -> tuple[list[planmod.Attachment] | None, str | None]:
    """(attachments, None) after loading and attaching the plan, or (None, why not).
    Attaches nothing when this process could not (not root, no bcc, no headers)."""
    plan = planmod.make_plan(facts)
    if not facts.is_root or loadermod.preflight(facts, plan):
        return None, None  # report() says why (not root, no bcc, headers, nothing to plan)
    try:
        session = loadermod.load(plan, opts)
    except loadermod.LoadError as exc:
        return None, str(exc)
    attachments = session.attachments
    session.close()
    return attachments, None


def asked_types(facts: factsmod.HostFacts, types: Sequence[str] | None) -> list[str]:
    """The VM types whose readiness decides the exit status: ``types`` (--type), else
    DEFAULT and every type the host's mask offers (what it claims must hold)."""
    if types:
        return list(types)
    offered = {tables.vm_type_name(t, facts.arch) for t in facts.kvm.supported_types}
    return [n for n in readinessmod.type_names(facts.arch) if n == "DEFAULT" or n in offered]


def _host_problems(facts: factsmod.HostFacts,
                   requirements: Sequence[tuple[str, bool | None, str]] | None,
                   load_error: str | None) -> tuple[list[str], list[str]]:
    """(errors, warnings) about this host and process, before any probe point."""
    errors, warnings = [], []
    if not facts.is_root:
        errors.append("not root: doctor's attach test loads BPF programs (run it as root)")
    errors += [detail for _, ok, detail in requirements or () if ok is False]
    if facts.bcc_version is None:
        errors.append("bcc not importable: install python3-bpfcc, use the .venv (make setup)")
    if facts.headers.path is None:
        errors.append(f"no kernel headers ({facts.headers.error}): run 'make setup'")
    elif facts.headers.release != facts.kernel_release:
        warnings.append(f"kernel headers are for {facts.headers.release}, the kernel is "
                        f"{facts.kernel_release}: fine for kvmtrace (no struct layouts), "
                        "but other bcc tools may misread kernel structs")
    if facts.tracefs is None:
        warnings.append(planmod.tracefs_problem(facts))
    if not facts.kvm.present:
        warnings.append(f"/dev/kvm: {facts.kvm.error}")
    elif facts.kvm.error:
        warnings.append(facts.kvm.error)
    if load_error:
        errors.append(load_error)
    return errors, warnings


def _points(plan: planmod.Plan, attachments: Sequence[planmod.Attachment] | None) -> list[dict]:
    """Each planned point with whether it attached (None: attach not tried)."""
    by_id = {a.point.id: a for a in attachments or []}
    points = []
    for p in plan.points:
        a = by_id.get(p.id)
        points.append({
            "probe": p.name, "layer": p.layer, "mechanism": p.mechanism or planmod.Mechanism.NONE,
            "target": p.target, "attached": bool(a and a.attached),
            "detail": a.reason if a else p.reason,
        })
    return points


def report(facts: factsmod.HostFacts, attachments: Sequence[planmod.Attachment] | None,
           load_error: str | None, types: Sequence[str] | None = None,
           requirements: Sequence[tuple[str, bool | None, str]] | None = None) -> dict:
    """The doctor's verdict from facts and (when root could try) attach results. Pure.
    ``types``: the VM types asked for (--type; None: see :func:`asked_types`);
    ``requirements``: what tracing needs of this process (kvmtrace.privileges: name,
    met or not or not applicable, one line), None for another host's facts."""
    plan = planmod.make_plan(facts)
    errors, warnings = _host_problems(facts, requirements, load_error)
    points = _points(plan, attachments)
    ioctl_ok = any(pt["attached"] for pt in points if pt["layer"] == planmod.Layer.IOCTL)
    if attachments is not None and not ioctl_ok:
        errors.append("the ioctl layer (KVM_CREATE_VM) could not attach: "
                      + points[0]["detail"])
    if attachments is None and plan.ioctl_mechanism is None:
        errors.append(f"no mechanism for the ioctl layer: {plan.points[0].reason}")
    kvm = facts.kvm
    asked = asked_types(facts, types)
    shown = readinessmod.assess(facts, list(types) if types else None)
    if facts.evidence is None:
        warnings.append("these facts have no readiness evidence (written by an older "
                        "kvmtrace): each type is judged from KVM_CAP_VM_TYPES alone")
    verdicts = {t.name: t.verdict for t in shown}
    unusable = [n for n in asked if verdicts.get(n) in (readinessmod.NOT_READY,
                                                         readinessmod.NOT_APPLICABLE)]
    undecided = [n for n in asked if verdicts.get(n) == readinessmod.INCOMPLETE]
    status = EXIT_FAIL if errors or unusable else EXIT_INCOMPLETE if undecided else EXIT_OK
    return {
        "kvmtrace": __version__,
        "kernel": facts.kernel_release,
        "arch": facts.arch,
        "root": facts.is_root,
        "bcc": facts.bcc_version,
        "kvm": {
            "present": kvm.present, "api_version": kvm.api_version,
            "vm_types_mask": kvm.vm_types_mask, "error": kvm.error,
            "vm_types": [{"vm_type": t, "name": tables.vm_type_name(t, facts.arch)}
                         for t in kvm.supported_types],
        },
        "vendor_modules": facts.vendor_modules,
        "kprobes": {"available": facts.kprobes, "detail": facts.kprobes_detail},
        "fentry": facts.fentry,
        "btf": facts.btf,
        "tracefs": facts.tracefs,
        "ringbuf": facts.ringbuf,
        "task_storage": facts.task_storage,
        "headers": {"path": facts.headers.path, "release": facts.headers.release,
                    "matches_kernel": facts.headers.release == facts.kernel_release},
        "requirements": None if requirements is None else [
            {"name": n, "ok": ok, "detail": d} for n, ok, d in requirements],
        "attach_tested": attachments is not None,
        "points": points,
        "warnings": warnings,
        "errors": errors,
        "ok": not errors,
        "readiness": {
            "asked": asked, "unusable": unusable, "undecided": undecided,
            "guest": facts.evidence is not None and "hypervisor" in facts.evidence.cpu_flags,
            "types": [t.to_json() for t in shown],
            "capacity": [vars(c) for c in readinessmod.capacities(facts.evidence)],
            "firmware": [vars(f) for f in readinessmod.firmware(facts.evidence)],
            "kernel_log": bringup_lines(facts.evidence),
        },
        "exit_status": status,
    }


def bringup_lines(ev, most: int = 20) -> list[str] | None:
    """The kernel's own lines of the subsystems that bring VM types up (kvm, kvm_amd,
    kvm_intel, SEV, TDX: kvmtrace.kernellog), the last ``most``; None: not readable."""
    if ev is None or ev.dmesg is None:
        return None
    out = [ln for ln in ev.dmesg
           if kernellog.subsystem(ln.split("] ", 1)[1] if "] " in ln else ln)]
    return out[-most:]


def text(r: dict) -> str:
    kvm = r["kvm"]
    if kvm["present"] and kvm["vm_types_mask"] is not None:
        names = ", ".join(f"{t['vm_type']} {t['name']}" for t in kvm["vm_types"])
        kvm_line = (f"/dev/kvm: API {kvm['api_version']}, KVM_CAP_VM_TYPES="
                    f"{kvm['vm_types_mask']:#x} ({names})")
    else:
        kvm_line = f"/dev/kvm: {kvm['error']}"
    lines = [
        f"kvmtrace {r['kvmtrace']} on {r['kernel']} ({r['arch']}), bcc {r['bcc']}",
        kvm_line,
        f"vendor modules: {', '.join(r['vendor_modules']) or 'none loaded'}",
        f"kprobes: {'yes' if r['kprobes']['available'] else 'NO'} ({r['kprobes']['detail']})",
        f"fentry: {r['fentry'] or 'not probed'}",
        f"BTF: {'yes' if r['btf'] else 'no'}; tracefs: {r['tracefs'] or 'NOT MOUNTED'}; "
        f"ring buffer: {'yes' if r['ringbuf'] else 'no (perf buffer)'}",
        f"headers: {r['headers']['path'] or 'MISSING'} ({r['headers']['release']})",
    ]
    if r["requirements"] is not None:
        lines.append("what tracing needs of this process:")
        lines += [f"  {_MET[q['ok']]:<7} {q['name']:<16} {q['detail']}"
                  for q in r["requirements"]]
    lines += [
        "",
        "probe points" + ("" if r["attach_tested"] else " (planned; attach not tested)") + ":",
    ]
    for p in r["points"]:
        planned = not r["attach_tested"] and p["mechanism"] != planmod.Mechanism.NONE
        state = "attached" if p["attached"] else ("planned" if planned else "NOT ATTACHED")
        lines.append(f"  {p['probe']:<40} {p['mechanism']:<10} {state:<12} {p['detail']}")
    lines += [f"WARNING: {w}" for w in r["warnings"]]
    lines.append("verdict: tracing works here" if r["ok"] else "verdict: tracing cannot work here")
    lines += ["", *readiness_text(r["readiness"])]
    log = r["readiness"].get("kernel_log")
    if log:
        lines += ["", "the kernel's bring-up lines (kvm, kvm_amd, kvm_intel, SEV, TDX):",
                  *(f"  {ln}" for ln in log)]
    return "\n".join(lines)


_MET = {True: "ok", False: "MISSING", None: "n/a"}

_VERDICT_WORDS = {readinessmod.READY: "ready", readinessmod.NOT_READY: "NOT READY",
                  readinessmod.NOT_APPLICABLE: "not applicable",
                  readinessmod.INCOMPLETE: "not decided"}


def readiness_text(rd: dict) -> list[str]:
    """The per-type chains as a readable tree: a type, then its checks in chain order
    (each the child of the one before it), evidence after the title, a fix line for
    what failed."""
    lines = ["VM types" + (" (this host is a VM: confidential host features do not apply)"
                           if rd["guest"] else "") + ":"]
    for t in rd["types"]:
        mark = "*" if t["name"] in rd["asked"] else " "
        lines.append(f"{mark} {t['name']} ({t['vm_type']}): {_VERDICT_WORDS[t['verdict']]}"
                     f" - {t['reason']}")
        behind: dict[str, list[dict]] = {}
        for ch in t["checks"]:
            if ch["blocked_by"]:
                behind.setdefault(ch["blocked_by"], []).append(ch)
        for ch in t["checks"]:
            if ch["blocked_by"]:
                continue
            branch = "    "
            ev = "; ".join(e for e in ch["evidence"] if e)
            lines.append(f"{branch}{ch['status']:<4} {ch['id']:<22} {ch['title']}"
                         + (f": {ev}" if ev else ""))
            if ch["hint"] and ch["status"] in (checks.FAIL, checks.SKIP,
                                               checks.WARN, checks.NA):
                lines.append(f"{branch}     {'why' if ch['status'] == 'N/A' else 'fix'}: "
                             f"{ch['hint']}")
            after = behind.get(ch["id"])
            if after:
                lines.append(f"{branch}  `- {after[0]['status']} after it: "
                             + ", ".join(a["id"] for a in after))
        if t["disagreement"]:
            lines.append(f"    DISAGREEMENT: {t['disagreement']}")
    for c in rd["capacity"]:
        lines.append(f"capacity: {c['resource']} {c['used']} of {c['capacity']} in use")
    for f in rd["firmware"]:
        lines.append(f"firmware: {f['component']} {f['version']}")
    lines.append("(* the types that decide the exit status: "
                 + (", ".join(rd["asked"]) or "none") + ")")
    return lines
