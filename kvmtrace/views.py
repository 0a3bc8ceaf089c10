"""Text views shared by the commands: the probe-plan table and event lines."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from kvmtrace import kvmabi, tables
from kvmtrace import plan as planmod
from kvmtrace.attempts import Attempt, Step
from kvmtrace.decode import Event
from kvmtrace.owners import summary as owner_summary
from kvmtrace.plan import Attachment, Layer, layer_depth
from kvmtrace.starts import Start, exit_of


def plan_rows(attachments: Sequence[Attachment]) -> list[list[str]]:
    return [[a.point.name, a.mechanism, "yes" if a.attached else "NO",
             (f"{a.point.target}: " if a.attached and a.point.target else "")
             + ("optional; " if a.point.optional and not a.attached else "") + a.reason]
            for a in attachments]


def plan_table(attachments: Sequence[Attachment]) -> str:
    rows = [["PROBE", "MECHANISM", "ATTACHED", "DETAIL"], *plan_rows(attachments)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
        for r in rows)


def wall_time(ts_ns: int, now: float | None = None, mono_ns: int | None = None) -> float:
    """bpf_ktime_get_ns() (CLOCK_MONOTONIC) → seconds since the epoch."""
    now = time.time() if now is None else now
    mono_ns = time.monotonic_ns() if mono_ns is None else mono_ns
    return now - (mono_ns - ts_ns) / 1e9


def describe_result(ev: Event, arch: str) -> str:
    if ev.probe == planmod.CREATE_VM:
        return f"fd={ev.result}" if ev.result >= 0 else str(ev.result)
    if ev.probe == planmod.VM_TYPES_QUERY:
        if ev.result < 0:
            return str(ev.result)
        names = [tables.vm_type_name(t, arch) for t in tables.vm_types_in_mask(ev.result)]
        return f"{ev.result:#x}({'|'.join(names) or 'none'})"
    if ev.layer == Layer.TYPE_CHECK:
        return "true" if ev.result else "false"
    if ev.probe == planmod.ENCRYPT_OP:
        return encrypt_text(ev, arch)
    if ev.probe == planmod.PROCESS_END:
        return end_text(ev, arch)
    if ev.probe == planmod.KVM_CALL:  # the ioctl that failed (its errno is in ERRNO)
        return kvmabi.ioctl_name(ev.verdicts, arch).removeprefix("KVM_")
    if ev.probe == planmod.KVM_RUN:
        return f"exit={kvmabi.exit_reason_name(ev.verdicts)}"
    return str(ev.result)


def encrypt_fields(ev: Event, arch: str) -> dict[str, str]:
    """A KVM_MEMORY_ENCRYPT_OP event's family, command and firmware status, by name."""
    family = tables.encrypt_family(ev.vm_type, arch)
    return {"family": family, "command": tables.encrypt_command_name(family, ev.verdicts),
            "firmware_status": tables.firmware_status_label(family, ev.status, ev.result < 0)}


def encrypt_text(ev: Event, arch: str) -> str:
    """A KVM_MEMORY_ENCRYPT_OP: its command, result and firmware status."""
    f = encrypt_fields(ev, arch)
    return (f"{f['family']}:{f['command']} {'ok' if ev.result >= 0 else ev.result} "
            f"fw={f['firmware_status']}")


def end_text(ev: Event, arch: str) -> str:
    """A followed process's end: how it ended."""
    ex = exit_of(ev.result, ev.verdicts, ev.detail)
    if ex["how"] == "exited":
        return f"exit={ex['status']}"
    return f"killed:{ex['signal']}" if ex["how"] == "killed" else "exit=?"


HEADER = ["PID", "COMM", "PROBE", "VMTYPE", "NAME", "OUTCOME", "RESULT", "ERRNO", "LAT(us)"]
_FMT = "{:<7} {:<16} {:<38} {:>6} {:<12} {:<8} {:<16} {:<7} {:>8}"


def event_header(show_time: bool) -> str:
    head = _FMT.format(*HEADER)
    return ("TIME     " + head) if show_time else head


def event_line(ev: Event, arch: str, show_time: bool) -> str:
    query = ev.probe in (planmod.VM_TYPES_QUERY, planmod.PROCESS_END)
    line = _FMT.format(
        ev.pid, ev.comm, ev.probe,
        "-" if query else ev.vm_type, "-" if query else ev.vm_type_name,
        "REJECTED" if ev.rejected else "ok", describe_result(ev, arch), ev.errno or "-",
        f"{ev.duration_ns / 1000:.1f}" if ev.duration_ns else "-")
    if show_time:
        line = time.strftime("%H:%M:%S ", time.localtime(wall_time(ev.ts_ns))) + line
    return line


def event_json(ev: Event, arch: str) -> str:
    data = ev.to_json()
    data["time"] = round(wall_time(ev.ts_ns), 6)
    data["result_text"] = describe_result(ev, arch)
    if ev.probe == planmod.ENCRYPT_OP:
        data.update(encrypt_fields(ev, arch))
    elif ev.probe == planmod.PROCESS_END:
        data.update(exit=exit_of(ev.result, ev.verdicts, ev.detail), mask=ev.vm_type)
    elif ev.probe == planmod.KVM_CALL:
        data["command"] = kvmabi.ioctl_name(ev.verdicts, arch)
    elif ev.probe == planmod.KVM_RUN:
        data["exit_reason"] = kvmabi.exit_reason_name(ev.verdicts)
    return json.dumps(data, sort_keys=True)


def start_note(s: Start) -> list[str]:
    """The lines `trace`, `serve` and `explain` print for a failed VM start."""
    out = [f"    ↳ VM start failed {s.summary}",
           f"    ↳ cause {s.cause}: {s.cause_evidence}", f"    ↳ hint: {s.cause_hint}"]
    if owner_summary(s.owner):
        out.insert(1, f"    ↳ owned by {owner_summary(s.owner)}")
    said = next((ln for ln in (s.vmm_words or "").splitlines()[::-1] if ln.strip()), None)
    if said:
        out.append(f"    ↳ the VMM said: {said[:200]}")
    if s.kernel_log:
        out.append(f"    ↳ kernel: {s.kernel_log[-1][:200]}"
                   + (f" (+{len(s.kernel_log) - 1} lines)" if len(s.kernel_log) > 1 else ""))
    return out


def start_report(s: Start, number: int) -> str:
    """explain's text for one failed VM start."""
    lines = [f"#{number} VM start failed {s.stage}: pid {s.pid} ({s.comm}), reason {s.reason}",
             f"  {s.summary}",
             f"  asked for: {s.requested_type} ({s.vmm}: {s.request_evidence})"]
    if s.vm_name:
        lines.append(f"  VM name: {s.vm_name}")
    if s.owner:
        lines.append("  owned by: " + ", ".join(f"{k} {v}" for k, v in s.owner.items())
                     + f" (cgroup {s.cgroup})")
    if s.owner_note:
        lines.append(f"  owner: {s.owner_note}")
    if s.mask is not None:
        lines.append(f"  KVM_CAP_VM_TYPES: {s.mask:#x} ({', '.join(s.offered) or 'none'})")
    for c in s.creates:
        lines.append(f"  KVM_CREATE_VM {c['vm_type_name']}: {c['result']} (x{c['count']})")
    for op in s.launch:
        lines.append(f"  KVM_MEMORY_ENCRYPT_OP {op['family']}:{op['command']}: "
                     f"{op['errno'] or 'ok'}, firmware status {op['firmware_status']} "
                     f"(x{op['count']})")
    for c in s.calls:
        lines.append(f"  {c['command']} ({c['vm_type_name']} VM): {c['errno']} "
                     f"(x{c['count']})")
    if s.run is not None:
        lines.append(f"  first KVM_RUN: {s.run['errno'] or 'ok'}, exit "
                     f"{s.run['exit_reason']}")
    lines.append(f"  cause: {s.cause} ({s.cause_evidence})")
    lines.append(f"  fix: {s.cause_hint}")
    lines.append(f"  hint: {s.hint}")
    if s.vmm_words:
        lines += ["  the VMM's own words (stderr):", *(f"    {ln}" for ln in
                                                     s.vmm_words.splitlines()[-10:])]
    elif s.vmm_words_note:
        lines.append(f"  the VMM's own words: {s.vmm_words_note}")
    if s.kernel_log:
        lines += ["  the kernel's log in its window:", *(f"    {ln}" for ln in s.kernel_log)]
    elif s.kernel_log_note:
        lines.append(f"  the kernel's log: {s.kernel_log_note}")
    return "\n".join(lines)


def attempt_note(a: Attempt) -> list[str]:
    """The lines `trace` and `serve` print under a rejected KVM_CREATE_VM."""
    if not a.rejected:
        return []
    owned = [f"    ↳ owned by {owner_summary(a.owner)}"] if owner_summary(a.owner) else []
    return [f"    ↳ {a.reason}: {a.explanation}", *owned, f"    ↳ hint: {a.hint}"]


def _step_line(s: Step, arch: str) -> str:
    if not s.observed:
        return f"{s.probe:<38} [{s.mechanism}] not observed: {s.note}"
    if s.layer == Layer.IOCTL:
        verdict = f"fd={s.result}" if not s.rejected else f"{s.result} {s.errno}"
    elif s.layer == Layer.TYPE_CHECK:
        verdict = "true (supported)" if not s.rejected else "false (not supported)"
    else:
        verdict = str(s.result) + (f" {s.errno}" if s.errno else "")
    vt = "" if s.vm_type is None else f"(type={s.vm_type} {tables.vm_type_name(s.vm_type, arch)})"
    lat = f"  {s.duration_ns / 1000:.1f} µs" if s.duration_ns else ""
    return f"{s.probe + vt:<38} [{s.mechanism}] → {verdict}{lat}"


def attempt_report(a: Attempt, arch: str, number: int) -> str:
    """The readable report `explain` prints for one rejected attempt."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall_time(a.end_ns)))
    asked = ("unknown (the ioctl was not observed)" if a.vm_type is None
             else f"VM type {a.vm_type} = {a.vm_type_name}")
    title = tables.vm_type_title(a.vm_type, arch) if a.vm_type is not None else None
    if title:
        asked += f" ({title})"
    lines = [
        f"Rejected VM creation #{number} at {when}",
        f"  process:   pid {a.pid} ({a.comm}), thread {a.tid}",
        f"  asked for: {asked}",
    ]
    if a.owner:
        lines.append("  owned by:  " + ", ".join(f"{k} {v}" for k, v in a.owner.items())
                     + f" (cgroup {a.cgroup})")
    if a.host_mask is not None:
        sup = ", ".join(tables.vm_type_name(t, arch)
                        for t in tables.supported_vm_types(a.host_mask))
        lines.append(f"  host:      KVM_CAP_VM_TYPES={a.host_mask:#x} → supports {sup}")
    lines.append("  chain (call order; [mechanism]):")
    for s in a.steps:
        lines.append("    " + "  " * layer_depth(s.layer) + _step_line(s, arch))
    if a.result is not None:
        lines.append(f"  latency:   {a.latency_ns / 1000:.1f} µs")
    lines += [
        f"  reason:    {a.reason} ({a.basis})",
        f"  why:       {a.explanation}",
        f"  hint:      {a.hint}",
    ]
    return "\n".join(lines)


def host_summary(kvm, arch: str) -> str:
    """What the host's own KVM_CAP_VM_TYPES answer says (kvmtrace.kvmdev.KvmInfo)."""
    if kvm.vm_types_mask is None:
        return f"/dev/kvm could not be asked ({kvm.error})"
    names = ", ".join(f"{t} {tables.vm_type_name(t, arch)}" for t in kvm.supported_types)
    return f"this host supports {names} (KVM_CAP_VM_TYPES={kvm.vm_types_mask:#x})"
