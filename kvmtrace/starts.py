"""Starts: a followed process's history, stitched into how its VM start went. Pure.

The kernel keeps, per process, exact counts of its VM-types queries (with the mask it
was given), its KVM_CREATE_VM calls (type, result), its KVM_MEMORY_ENCRYPT_OP calls
(command, errno, firmware status) and, once it has ended, one count of its end (the
mask, its exit code, what it did: kvmtrace.contract PROC_* bits, the last signal
delivered). :func:`stitch` turns those records, and what its command line asked for
(kvmtrace.vmm), into a :class:`Start`: whether it failed, at which stage, why, on what
evidence, and what to do about it.

Stages: ``before_create`` (the VMM read the mask and gave up: QEMU >= 9 does this for a
type KVM does not offer), ``at_create`` (KVM_CREATE_VM failed), ``during_launch``
(KVM made the VM; the confidential launch or another KVM ioctl of its setup failed, or
the VMM exited with an error), ``at_first_run`` (its first KVM_RUN failed or ended the
VM). A start ends well at its first KVM_RUN that ran (``ran``: whatever ends the process
later is not a failed start); a clean exit, or a stop by SIGTERM/SIGINT/SIGHUP/SIGKILL,
is not a failure either. Every failed start gets one cause (kvmtrace.causes).
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

from kvmtrace import attempts as attemptsmod
from kvmtrace import causes as causesmod
from kvmtrace import kvmabi, owners, tables
from kvmtrace import plan as planmod
from kvmtrace.contract import (
    PROC_CREATE_FAILED,
    PROC_CREATED,
    PROC_EXIT_CODE,
    PROC_LAUNCH_FAILED,
    PROC_QUERIED,
    PROC_RAN,
    firmware_status,
)
from kvmtrace.decode import CountRecord
from kvmtrace.vmm import VmmRequest

BEFORE_CREATE, AT_CREATE, DURING_LAUNCH = "before_create", "at_create", "during_launch"
AT_FIRST_RUN = "at_first_run"
STAGES = (BEFORE_CREATE, AT_CREATE, DURING_LAUNCH, AT_FIRST_RUN)
# Outcomes of a followed process.
FAILED, CLEAN, STOPPED, RAN = "failed", "clean_exit", "stopped", "ran"
NOT_KNOWN = "not_known"  # requested_type when the command line does not say
# An operator's (or a supervisor's) stop: not a failed start.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL})


@dataclass(frozen=True)
class Start:
    pid: int
    comm: str
    outcome: str  # FAILED, CLEAN or STOPPED
    stage: str | None  # one of STAGES when failed
    reason: str | None  # a kvmtrace.attempts reason when failed
    requested_type: str  # what the command line asked for, or NOT_KNOWN
    vm_name: str | None
    vmm: str  # kvmtrace.vmm kind
    request_evidence: str  # which flags said so, or why nobody knows
    mask: int | None  # the KVM_CAP_VM_TYPES answer it was given (None: never asked)
    offered: list[str]  # the VM types in that mask
    exit: dict  # {"how": "exited", "status": 1} | {"how": "killed", "signal": "SIGSEGV"}
    creates: list[dict] = field(default_factory=list)
    launch: list[dict] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)  # its start's failed KVM ioctls
    run: dict | None = None  # its first KVM_RUN that failed or ended the VM
    cause: str | None = None  # kvmtrace.causes, when failed
    cause_evidence: str | None = None  # what decided the cause
    cause_hint: str | None = None  # the cause's fix
    # The VMM's own last words on its stderr (at most 4 KiB, escaped), or None with
    # vmm_words_note saying why they could not be had.
    vmm_words: str | None = None
    vmm_words_note: str | None = None
    # The kernel's lines of its window (kvm, kvm_amd, kvm_intel, SEV, TDX, kvm WARNs),
    # or kernel_log_note saying why there are none.
    kernel_log: list[str] = field(default_factory=list)
    kernel_log_note: str | None = None
    # Its cgroup v2 path when first seen and who owns it (kvmtrace.owners: vm, unit,
    # pod_uid, runtime, container; a KubeVirt VM's namespace), or owner_note saying why
    # not, or where the command line's VM name and libvirt's domain disagree.
    cgroup: str | None = None
    cgroup_id: int | None = None  # the kernel's (v2) id of it, kept where the path is gone
    owner: dict = field(default_factory=dict)
    owner_note: str | None = None
    hint: str | None = None
    summary: str = ""  # one line for the live view and explain

    @property
    def failed(self) -> bool:
        return self.outcome == FAILED

    def to_json(self) -> dict:
        return {"kind": "start", **asdict(self)}


def exit_of(code: int, flags: int, last_signal: int) -> dict:
    """How a process ended, from its end record: exit code seen, else the last signal."""
    if flags & PROC_EXIT_CODE:
        how, value = tables.exit_status(code)
        if how == "exited":
            return {"how": "exited", "status": value}
        return {"how": "killed", "signal": tables.signal_name(value)}
    if last_signal:
        return {"how": "killed", "signal": tables.signal_name(last_signal),
                "basis": "the last signal delivered (no exit_group seen)"}
    return {"how": "unknown"}


def _stopped(ex: dict) -> bool:
    names = {s.name for s in STOP_SIGNALS}
    return ex["how"] == "killed" and ex["signal"] in names


def _launch_row(r: CountRecord, arch: str) -> dict:
    family = tables.encrypt_family(r.vm_type, arch)
    status = firmware_status(family == "TDX", r.detail)
    return {"vm_type": r.vm_type, "vm_type_name": r.vm_type_name, "family": family,
            "command": tables.encrypt_command_name(family, r.verdicts),
            "errno": r.errno, "firmware_status": tables.firmware_status_label(family, status,
                                                                         r.errno is not None),
            "firmware_status_code": status, "count": r.count}


def _call_row(r: CountRecord, arch: str) -> dict:
    return {"command": kvmabi.ioctl_name(r.verdicts, arch), "errno": r.errno,
            "vm_type": r.vm_type, "vm_type_name": r.vm_type_name, "count": r.count}


def _run_row(r: CountRecord) -> dict:
    return {"errno": r.errno, "exit_reason": kvmabi.exit_reason_name(r.verdicts),
            "vm_type": r.vm_type, "vm_type_name": r.vm_type_name}


def stitch(records: Sequence[CountRecord], request: VmmRequest, arch: str = "x86_64",
           vendor_modules: Sequence[str] = (),
           params: Mapping[str, str] | None = None) -> list[Start]:
    """One Start per end record among one process's ``records`` (none: it has not
    ended, or was not followed to its end). ``params``: the host's vendor module
    parameters (kvm_amd.sev_snp ...), to tell a feature left off at bring-up."""
    by_probe: dict[str, list[CountRecord]] = {}
    for r in records:
        by_probe.setdefault(r.probe, []).append(r)
    seen = {"creates": by_probe.get(planmod.CREATE_VM, []),
            "launch": by_probe.get(planmod.ENCRYPT_OP, []),
            "calls": by_probe.get(planmod.KVM_CALL, []),
            "runs": by_probe.get(planmod.KVM_RUN, [])}
    return [_one(end, seen, request, arch, vendor_modules, params or {})
            for end in by_probe.get(planmod.PROCESS_END, [])]


def _one(end: CountRecord, seen: Mapping[str, list[CountRecord]], request: VmmRequest,
         arch: str, vendor_modules: Sequence[str], params: Mapping[str, str]) -> Start:
    creates, launch = seen["creates"], seen["launch"]
    mask = end.vm_type if end.verdicts & PROC_QUERIED else None
    ex = exit_of(end.result, end.verdicts, end.detail)
    # What it did, from the end record's bits (exact even when a busy map made the
    # exporter fold the process's own records early); the records give the detail.
    flags = end.verdicts
    accepted = [r for r in creates if not r.rejected] or flags & PROC_CREATED
    refused = [r for r in creates if r.rejected]
    failed_ops = [r for r in launch if r.rejected or r.detail]
    failed_launch = bool(failed_ops) or flags & PROC_LAUNCH_FAILED
    wanted = request.requested_type or NOT_KNOWN
    create_rows = [{"vm_type": r.vm_type, "vm_type_name": r.vm_type_name,
                    "result": r.errno or "ok", "count": r.count} for r in creates]
    offered = [tables.vm_type_name(t, arch) for t in tables.supported_vm_types(mask)] \
        if mask is not None and mask >= 0 else []
    calls = [_call_row(r, arch) for r in seen["calls"]]
    run = _run_row(seen["runs"][-1]) if seen["runs"] else None
    base = dict(pid=end.pid or 0, comm=end.comm, requested_type=wanted,
                vm_name=request.name, vmm=request.kind, request_evidence=request.evidence,
                mask=mask, offered=offered, exit=ex, creates=create_rows,
                launch=[_launch_row(r, arch) for r in launch], calls=calls, run=run)
    if ex["how"] == "exited" and ex["status"] == 0:
        return Start(outcome=CLEAN, stage=None, reason=None, **base)
    if _stopped(ex):
        return Start(outcome=STOPPED, stage=None, reason=None, **base)
    if flags & PROC_RAN:  # a vCPU ran: the start went well; a later end is not its
        return Start(outcome=RAN, stage=None, reason=None, **base)
    crashed = ex["how"] == "killed"
    if run is not None and not failed_launch and not calls:
        stage, reason = AT_FIRST_RUN, attemptsmod.FIRST_RUN_FAILED
    elif failed_launch:
        stage, reason = DURING_LAUNCH, attemptsmod.LAUNCH_FAILED
    elif calls:
        stage, reason = DURING_LAUNCH, attemptsmod.SETUP_FAILED
    elif accepted:
        stage = DURING_LAUNCH
        reason = attemptsmod.VMM_CRASHED if crashed else attemptsmod.EXITED_AFTER_CREATE
    elif refused or flags & PROC_CREATE_FAILED:
        stage = AT_CREATE
        reason = attemptsmod.classify(refused[-1].errno, refused[-1].vm_type,
                                      refused[-1].verdicts, mask).reason \
            if refused else attemptsmod.OTHER
    elif crashed:
        stage, reason = BEFORE_CREATE, attemptsmod.VMM_CRASHED
    elif mask is not None and _refused_by_mask(wanted, mask, arch):
        stage, reason = BEFORE_CREATE, attemptsmod.VMM_REFUSED_TYPE
    else:
        stage, reason = BEFORE_CREATE, attemptsmod.VMM_EXITED
    hint_type = wanted if wanted != NOT_KNOWN else (
        refused[-1].vm_type_name if refused else "*")
    text = attemptsmod.hint(reason, hint_type, vendor_modules)
    if failed_ops:
        text = attemptsmod.LAUNCH_HINTS.get(failed_ops[-1].errno or "EIO", text)
    cause = causesmod.decide(causesmod.Failure(
        stage=stage, reason=reason, requested_type=wanted, exit=ex,
        creates=[c for c in create_rows if c["result"] != "ok"],
        launch=[op for op in base["launch"] if op["errno"] or op["firmware_status_code"]],
        calls=calls, run=run,
        disabled=causesmod.disabled_at_bringup(wanted, params)))
    start = Start(outcome=FAILED, stage=stage, reason=reason, hint=text, cause=cause.name,
                  cause_evidence=cause.evidence, cause_hint=cause.hint, **base)
    return Start(**{**asdict(start), "summary": summary(start)})


def _refused_by_mask(wanted: str, mask: int, arch: str) -> bool:
    """The type asked for is missing from the mask (or nobody knows what was asked:
    the VMM read the mask and then gave up, which is what the mask is for)."""
    if wanted == NOT_KNOWN:
        return True
    number = tables.vm_type_number(wanted, arch)
    return number is None or number not in tables.supported_vm_types(mask)


def _exit_text(ex: dict) -> str:
    if ex["how"] == "exited":
        return f"exit status {ex['status']}"
    if ex["how"] == "killed":
        return f"killed by {ex['signal']}"
    return "exit not seen"


def summary(s: Start) -> str:
    """One line: who, what it asked for, where it stopped, on what evidence."""
    who = f"pid {s.pid} ({s.comm}{', VM ' + repr(s.vm_name) if s.vm_name else ''})"
    asked = ("asked for an unknown VM type" if s.requested_type == NOT_KNOWN
             else f"asked for {s.requested_type}")
    parts = [f"{who} {asked}"]
    if s.mask is not None:
        parts.append(f"KVM offered {', '.join(s.offered) or 'nothing'} "
                     f"(KVM_CAP_VM_TYPES={s.mask:#x})")
    if s.stage == AT_CREATE and s.creates:
        bad = [c for c in s.creates if c["result"] != "ok"][-1]
        parts.append(f"KVM_CREATE_VM({bad['vm_type_name']}) failed with {bad['result']}")
    elif s.stage == DURING_LAUNCH:
        bad = [op for op in s.launch if op["errno"] or op["firmware_status_code"]]
        if bad:
            op = bad[-1]
            parts.append(f"{op['family']} {op['command']} failed with {op['errno'] or 'ok'}"
                         f" (firmware status {op['firmware_status']})")
        elif s.calls:
            parts.append(f"{s.calls[0]['command']} failed with {s.calls[0]['errno']}")
        else:
            made = ", ".join(sorted({c["vm_type_name"] for c in s.creates
                                     if c["result"] == "ok"}))
            parts.append(f"KVM created a {made + ' ' if made else ''}VM")
    elif s.stage == AT_FIRST_RUN and s.run is not None:
        parts.append(f"its first KVM_RUN failed with {s.run['errno']}" if s.run["errno"]
                     else f"its first KVM_RUN ended the VM (exit {s.run['exit_reason']})")
    elif s.stage == BEFORE_CREATE:
        parts.append("no KVM_CREATE_VM")
    parts.append(_exit_text(s.exit))
    return f"{s.stage}: " + "; ".join(parts) + f" [{s.reason}; cause {s.cause}]"


def failure_labels(s: Start, comm: str) -> tuple[str, str, str, str, str]:
    """The labels of kvmtrace_vm_start_failures_total for a failed start: comm, stage,
    reason, cause, requested type."""
    return (comm, s.stage or "", s.reason or "", s.cause or "", s.requested_type)


def with_owner(start: Start, cgroup: str | None, cgroup_id: int | None = None) -> Start:
    """A start with the cgroup its process was in at its first KVM call (the kernel's
    id, and its path), and who owns it."""
    if cgroup is None:
        why = (f"cgroup {cgroup_id} was gone before kvmtrace resolved it" if cgroup_id
               else "cgroup not known: the process was gone when kvmtrace first looked, "
                    "and the kernel kept no id of it")
        return replace(start, cgroup_id=cgroup_id, owner_note=why)
    owner = owners.decode(cgroup)
    return replace(start, cgroup=cgroup, cgroup_id=cgroup_id,
                   owner=_labels(owner, start.vm_name),
                   owner_note=owners.disagreement(start.vm_name, owner))


def owner_of(cgroup: str | None, vm_name: str | None) -> dict:
    """Who owns a process in ``cgroup`` whose command line names VM ``vm_name``: the
    cgroup's owner (kvmtrace.owners), a KubeVirt VM's namespace and name in a pod."""
    return {} if cgroup is None else _labels(owners.decode(cgroup), vm_name)


def _labels(owner: owners.Owner, vm_name: str | None) -> dict:
    labels = owner.labels()
    namespace, kubevirt = owners.kubevirt_vm(vm_name, owner)
    if kubevirt:
        labels.update(namespace=namespace, vm=kubevirt)
    return labels
