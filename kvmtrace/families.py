"""Metric families from the catalogue (kvmtrace.catalogue), fresh at every scrape.

:func:`fresh` makes an empty prometheus_client family of a catalogue entry (the
collector fills the per-series ones from its samples); :func:`build` makes every other
family and fills it from what one scrape read (:class:`Scrape`): the create latency
histogram, start failures, host-wide probe calls, the host's KVM and VM types, each
type's readiness (kvmtrace.readiness: the same chains as doctor), ASIDs/KeyIDs and
firmware versions, the probe plan's attachments, the exporter's health and build info.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from kvmtrace import readiness, tables
from kvmtrace.catalogue import COUNTER, FAMILIES, GAUGE, HISTOGRAM, Family, family
from kvmtrace.contract import LATENCY_OUTCOMES
from kvmtrace.evidence import Evidence
from kvmtrace.kvmdev import KvmInfo
from kvmtrace.plan import Attachment

_KINDS = {COUNTER: CounterMetricFamily, GAUGE: GaugeMetricFamily,
          HISTOGRAM: HistogramMetricFamily}
# Bucket bounds of kvmtrace_vm_create_duration_seconds: powers of two of ns,
# 2**10 (~1 µs) .. 2**31 (~2.1 s), matching the kernel's log2 slots.
LATENCY_BOUNDS_LOG2 = range(10, 32)


class Scrape(NamedTuple):
    """What one scrape read, with the exporter's fixed facts it is exported with."""

    arch: str
    attachments: Sequence[Attachment]
    build_info: Mapping[str, str]  # kvmtrace_build_info's label values by name
    kvm: KvmInfo
    evidence: Evidence | None  # readiness evidence (kvmtrace.evidence)
    health: Mapping  # the runtime's counters, with start_failures and totals
    latency: tuple[list[tuple[int, int, int]], list[int]]  # log2 slots, sums per outcome
    ok: int  # 1 when the maps were read
    errors: Mapping[str, int]  # exception kind -> failed map reads so far
    owner_labels: tuple[str, ...] = ()  # serve --metrics.labels


def label_names(entry: Family, with_pid: bool = False,
                owner_labels: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A family's label names; a per-process one's with "pid" after "comm" when
    ``with_pid`` (--pid-label), then the ``owner_labels`` (--metrics.labels) where the
    family takes them."""
    pid = ("pid",) if with_pid and entry.per_process else ()
    owner = owner_labels if entry.per_process or entry.by_owner else ()
    if not (pid or owner):
        return entry.labels
    at = entry.labels.index("comm") + 1
    return (*entry.labels[:at], *pid, *owner, *entry.labels[at:])


def fresh(entry: Family, labels: Sequence[str] | None = None) -> Metric:
    """An empty prometheus_client family of a catalogue entry, with ``labels`` (default:
    the catalogue's)."""
    return _KINDS[entry.type](entry.name, entry.help,
                              labels=list(entry.labels if labels is None else labels))


def build(scrape: Scrape) -> list[Metric]:
    """Every family that is not per process, in catalogue order, with its samples."""
    out = []
    for entry in FAMILIES:
        if entry.per_process:
            continue
        metric = fresh(entry, label_names(entry, owner_labels=scrape.owner_labels))
        if entry.health:
            metric.add_metric([], scrape.health.get(entry.name.removeprefix("kvmtrace_"), 0))
        else:
            _FILL[entry.name](metric, scrape)
        out.append(metric)
    return out


def _latency(h: Metric, s: Scrape) -> None:
    """Kernel log2(ns) slots → a cumulative Prometheus histogram per outcome."""
    slots, sums = s.latency
    for outcome, name in enumerate(LATENCY_OUTCOMES):
        mine = [(slot, n) for o, slot, n in slots if o == outcome]
        # A value in slot s lies in [2**s, 2**(s+1)) ns: at most 2**(s+1).
        buckets = [(f"{2 ** b / 1e9:.9g}", sum(n for slot, n in mine if slot + 1 <= b))
                   for b in LATENCY_BOUNDS_LOG2]
        total = sum(n for _, n in mine)
        buckets.append(("+Inf", total))
        h.add_metric([name], buckets, sum_value=sums[outcome] / 1e9 if outcome < len(sums)
                     else 0)


def _counted(key: str) -> Callable[[Metric, Scrape], None]:
    """A counter per label tuple, from the health entry ``key`` (label tuple → count)."""
    def fill(f: Metric, s: Scrape) -> None:
        for labels, n in sorted(s.health.get(key, {}).items()):
            f.add_metric(list(labels), n)
    return fill


def _supported(f: Metric, s: Scrape) -> None:
    if s.kvm.vm_types_mask is None:
        return
    known = tables.VM_TYPE_TABLES.get(s.arch, {0: "DEFAULT"})
    for t in sorted(set(known) | set(s.kvm.supported_types)):
        f.add_metric([str(t), tables.vm_type_name(t, s.arch)],
                     1 if t in s.kvm.supported_types else 0)


def _ready(f: Metric, s: Scrape) -> None:
    if s.kvm.present or s.evidence is not None:
        for t in readiness.assess_parts(s.arch, s.kvm, s.evidence):
            f.add_metric([str(t.vm_type), t.name, t.verdict, t.failed_check or ""],
                         1 if t.verdict == readiness.READY else 0)


def _encryption_ids(f: Metric, s: Scrape) -> None:
    for c in readiness.capacities(s.evidence):
        f.add_metric([c.resource], c.capacity)


def _encryption_ids_used(f: Metric, s: Scrape) -> None:
    for c in readiness.capacities(s.evidence):
        if c.used is not None:
            f.add_metric([c.resource], c.used)


def _firmware(f: Metric, s: Scrape) -> None:
    for fw in readiness.firmware(s.evidence):
        f.add_metric([fw.component, fw.version], 1)


def _attached(f: Metric, s: Scrape) -> None:
    for a in s.attachments:
        f.add_metric([a.point.name, a.mechanism], 1 if a.attached else 0)


def _scrape_errors(f: Metric, s: Scrape) -> None:
    for kind in sorted(s.errors):
        f.add_metric([kind], s.errors[kind])


def _build_info(f: Metric, s: Scrape) -> None:
    f.add_metric([s.build_info[k] for k in family("kvmtrace_build_info").labels], 1)


# Where each family that is neither per process nor a health counter gets its samples.
_FILL: Mapping[str, Callable[[Metric, Scrape], None]] = {
    "kvmtrace_vm_create_duration_seconds": _latency,
    "kvmtrace_vm_start_failures": _counted("start_failures"),
    "kvmtrace_probe_calls": _counted("totals"),
    "kvmtrace_host_kvm_up": lambda f, s: f.add_metric(
        [], 1 if s.kvm.vm_types_mask is not None else 0),
    "kvmtrace_host_vm_type_supported": _supported,
    "kvmtrace_vm_type_ready": _ready,
    "kvmtrace_host_encryption_ids": _encryption_ids,
    "kvmtrace_host_encryption_ids_used": _encryption_ids_used,
    "kvmtrace_host_firmware_info": _firmware,
    "kvmtrace_probe_attached": _attached,
    "kvmtrace_collect_success": lambda f, s: f.add_metric([], s.ok),
    "kvmtrace_scrape_errors": _scrape_errors,
    "kvmtrace_build_info": _build_info,
}
