"""doctor: can this host be traced? The report, from the host facts and an attach test.

:func:`report` is pure (facts and attach results in, a JSON-ready dict out), so tests
hand it the facts of other hosts; :func:`attach_test` really loads and attaches the
plan in this process and detaches again (doctor exits right after: no loader child).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmtrace import __version__, tables
from kvmtrace import facts as factsmod
from kvmtrace import loader as loadermod
from kvmtrace import plan as planmod


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


def report(facts: factsmod.HostFacts, attachments: Sequence[planmod.Attachment] | None,
                  load_error: str | None) -> dict:
    """The doctor's verdict from facts and (when root could try) attach results. Pure."""
    plan = planmod.make_plan(facts)
    errors, warnings = [], []
    if not facts.is_root:
        errors.append("not root: kvmtrace loads BPF programs (run as root)")
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
    points = []
    by_id = {a.point.id: a for a in attachments or []}
    for p in plan.points:
        a = by_id.get(p.id)
        points.append({
            "probe": p.name, "layer": p.layer, "mechanism": p.mechanism or planmod.Mechanism.NONE,
            "target": p.target, "attached": bool(a and a.attached),
            "detail": a.reason if a else p.reason,
        })
    ioctl_ok = any(pt["attached"] for pt in points if pt["layer"] == planmod.Layer.IOCTL)
    if attachments is not None and not ioctl_ok:
        errors.append("the ioctl layer (KVM_CREATE_VM) could not attach: "
                      + points[0]["detail"])
    if attachments is None and plan.ioctl_mechanism is None:
        errors.append(f"no mechanism for the ioctl layer: {plan.points[0].reason}")
    kvm = facts.kvm
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
        "attach_tested": attachments is not None,
        "points": points,
        "warnings": warnings,
        "errors": errors,
        "ok": not errors,
    }


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
        "",
        "probe points" + ("" if r["attach_tested"] else " (planned; attach not tested)") + ":",
    ]
    for p in r["points"]:
        planned = not r["attach_tested"] and p["mechanism"] != planmod.Mechanism.NONE
        state = "attached" if p["attached"] else ("planned" if planned else "NOT ATTACHED")
        lines.append(f"  {p['probe']:<40} {p['mechanism']:<10} {state:<12} {p['detail']}")
    lines += [f"WARNING: {w}" for w in r["warnings"]]
    lines.append("verdict: tracing works here" if r["ok"] else "verdict: tracing cannot work here")
    return "\n".join(lines)
