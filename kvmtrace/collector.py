"""Prometheus collector: fresh metric families from the BPF maps at every scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
            labels=["comm", *pid, "vm_type", "vm_type_name", "errno"])
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
        try:
            totals = self._rt.totals(self._with_pid)
            health = self._rt.health()
        except Exception:  # a map read failed: degrade, never a 500
            totals, health, ok = {}, {}, 0
        for s, n in sorted(totals.items(), key=lambda kv: repr(kv[0])):
            p = [] if not self._with_pid else ["" if s.pid is None else str(s.pid)]
            vt = [str(s.vm_type), s.vm_type_name]
            if s.probe == planmod.CREATE_VM:
                attempts.add_metric([s.comm, *p, *vt], n)
                if s.rejected:
                    rejected.add_metric([s.comm, *p, *vt, s.errno or "none"], n)
            elif s.probe == planmod.VM_TYPES_QUERY:
                queries.add_metric([s.comm, *p], n)
            else:
                checks.add_metric([s.probe, s.comm, *p, *vt], n)
                if s.rejected:
                    check_rej.add_metric([s.probe, s.comm, *p, *vt], n)
        yield from (attempts, rejected, checks, check_rej, queries)

        kvm = self._kvm_query()
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

