"""Prometheus collector: fresh metric families from the BPF maps at every scrape."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kvmtrace import attempts as attemptsmod
from kvmtrace import plan as planmod
from kvmtrace import tables
from kvmtrace.kvmdev import KvmInfo
from kvmtrace.loader import Attachment
from kvmtrace.runtime import Runtime

NS = "kvmtrace"


class KvmtraceCollector(Collector):
    def __init__(self, runtime: Runtime, attachments: Sequence[Attachment],
                 kvm_query: Callable[[], KvmInfo], arch: str,
                 build_info: dict[str, str], with_pid: bool = False):
        self._rt = runtime
        self._attachments = attachments
        self._kvm_query = kvm_query
        self._arch = arch
        self._build = build_info
        self._with_pid = with_pid

    def collect(self) -> Iterator[Metric]:
        pid = ["pid"] if self._with_pid else []
        attempts = CounterMetricFamily(
            f"{NS}_vm_create_attempts", "KVM_CREATE_VM calls seen at the ioctl layer.",
            labels=["comm", *pid, "vm_type", "vm_type_name"])
        rejected = CounterMetricFamily(
            f"{NS}_vm_create_rejected", "KVM_CREATE_VM calls that failed, by errno.",
            labels=["comm", *pid, "vm_type", "vm_type_name", "errno", "reason"])
        checks = CounterMetricFamily(
            f"{NS}_vm_type_checks",
            "Calls of kvm_arch_init_vm and *_is_vm_type_supported seen by function probes.",
            labels=["probe", "comm", *pid, "vm_type", "vm_type_name"])
        check_rej = CounterMetricFamily(
            f"{NS}_vm_type_check_rejected",
            "Function-probe calls that said no (false, or a negative errno).",
            labels=["probe", "comm", *pid, "vm_type", "vm_type_name"])
        queries = CounterMetricFamily(
            f"{NS}_vm_types_queries", "KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES) calls.",
            labels=["comm", *pid])
        ok = 1
        kvm = self._kvm_query()
        try:
            totals = self._rt.totals(self._with_pid)
            health = self._rt.health()
            latency = self._rt.latency()
        except Exception:  # a map read failed: degrade, never a 500
            totals, health, latency, ok = {}, {}, ([], [0, 0]), 0
        # Several kernel keys can map to one label set (e.g. two verdict sets):
        # sum per label set, so every sample is unique.
        families = {f.name: f for f in (attempts, rejected, checks, check_rej, queries)}
        sums: dict[tuple[str, tuple[str, ...]], float] = defaultdict(float)
        for s, n in totals.items():
            p = [] if not self._with_pid else ["" if s.pid is None else str(s.pid)]
            vt = [str(s.vm_type), s.vm_type_name]
            if s.probe == planmod.CREATE_VM:
                sums[attempts.name, (s.comm, *p, *vt)] += n
                if s.rejected:
                    reason = attemptsmod.classify(s.errno, s.vm_type, s.verdicts,
                                                  kvm.vm_types_mask).reason
                    sums[rejected.name, (s.comm, *p, *vt, s.errno or "none", reason)] += n
            elif s.probe == planmod.VM_TYPES_QUERY:
                sums[queries.name, (s.comm, *p)] += n
            else:
                sums[checks.name, (s.probe, s.comm, *p, *vt)] += n
                if s.rejected:
                    sums[check_rej.name, (s.probe, s.comm, *p, *vt)] += n
        for (name, labels), n in sorted(sums.items()):
            families[name].add_metric(list(labels), n)
        yield from (attempts, rejected, checks, check_rej, queries)
        yield _latency_histogram(*latency)

        kvm_up = GaugeMetricFamily(
            f"{NS}_host_kvm_up", "1 when /dev/kvm answered the exporter's KVM_CAP_VM_TYPES query.")
        kvm_up.add_metric([], 1 if kvm.vm_types_mask is not None else 0)
        yield kvm_up
        supported = GaugeMetricFamily(
            f"{NS}_host_vm_type_supported",
            "1 when the host's KVM_CAP_VM_TYPES mask has the VM type's bit.",
            labels=["vm_type", "vm_type_name"])
        if kvm.vm_types_mask is not None:
            known = tables.VM_TYPE_TABLES.get(self._arch, {0: "DEFAULT"})
            types = sorted(set(known) | set(kvm.supported_types))
            for t in types:
                supported.add_metric([str(t), tables.vm_type_name(t, self._arch)],
                                     1 if t in kvm.supported_types else 0)
        yield supported

        attached = GaugeMetricFamily(
            f"{NS}_probe_attached", "1 for each planned probe point that is attached, else 0.",
            labels=["probe", "mechanism"])
        for a in self._attachments:
            attached.add_metric([a.point.name, a.mechanism], 1 if a.attached else 0)
        yield attached
        for key, doc in (
            ("events_lost", "Events the live stream could not carry (buffer full)."),
            ("events_throttled", "Events left out of the live stream by the per-CPU event "
                                 "budget (counts stay exact)."),
            ("counts_dropped", "Count updates lost because the counts map was full."),
            ("calls_dropped", "Calls not tracked because the in-flight map was full."),
            ("decode_errors", "Events that could not be decoded."),
            ("exited_processes", "Count entries of exited processes folded out of the map."),
        ):
            c = CounterMetricFamily(f"{NS}_{key}", doc)
            c.add_metric([], health.get(key, 0))
            yield c
        success = GaugeMetricFamily(
            f"{NS}_collect_success", "1 when the BPF maps were read at this scrape.")
        success.add_metric([], ok)
        yield success
        info = GaugeMetricFamily(f"{NS}_build_info", "kvmtrace build and host information.",
                                 labels=sorted(self._build))
        info.add_metric([self._build[k] for k in sorted(self._build)], 1)
        yield info



# Bucket bounds of kvmtrace_vm_create_duration_seconds: powers of two of ns,
# 2**10 (~1 µs) .. 2**31 (~2.1 s), matching the kernel's log2 slots.
LATENCY_BOUNDS_LOG2 = range(10, 32)
OUTCOMES = ("accepted", "rejected")


def _latency_histogram(slots: list[tuple[int, int, int]], sums: list[int]) -> Metric:
    """Kernel log2(ns) slots → a cumulative Prometheus histogram per outcome."""
    h = HistogramMetricFamily(
        f"{NS}_vm_create_duration_seconds",
        "KVM_CREATE_VM latency, entry to return at the ioctl layer, by outcome.",
        labels=["outcome"])
    for outcome, name in enumerate(OUTCOMES):
        mine = [(slot, n) for o, slot, n in slots if o == outcome]
        # A value in slot s lies in [2**s, 2**(s+1)) ns: at most 2**(s+1).
        buckets = [(f"{2 ** b / 1e9:.9g}", sum(n for slot, n in mine if slot + 1 <= b))
                   for b in LATENCY_BOUNDS_LOG2]
        total = sum(n for _, n in mine)
        buckets.append(("+Inf", total))
        h.add_metric([name], buckets, sum_value=sums[outcome] / 1e9 if outcome < len(sums)
                     else 0)
    return h
