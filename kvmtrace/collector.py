"""Prometheus collector: fresh metric families from the BPF maps at every scrape.

One computation, two outputs:

- ``collect()``: prometheus_client metric families (the registry path: tests and the
  reference output);
- ``exposition()``: the whole /metrics body for ``serve``, the per-series families
  rendered by kvmtrace.render in the format the library itself would write.

Both read the maps once per scrape and share the per-series work. What does not
change between scrapes is kept: each series' family membership and label values
(classified once per host mask), the samples' order, and each sample's rendered line
(re-rendered only when its value changes).
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from itertools import chain

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kvmtrace import attempts as attemptsmod
from kvmtrace import plan as planmod
from kvmtrace import readiness as readinessmod
from kvmtrace import tables
from kvmtrace.aggregate import OTHER, NameBudget, SlotSums
from kvmtrace.contract import LATENCY_OUTCOMES, RAW_KEY_LEN, RawCount, firmware_status
from kvmtrace.decode import Key, vm_type_label
from kvmtrace.evidence import Evidence
from kvmtrace.kvmdev import KvmInfo
from kvmtrace.plan import Attachment
from kvmtrace.render import FixedFamilies, Renderer
from kvmtrace.runtime import Runtime

NS = "kvmtrace"
log = logging.getLogger(__name__)

# The per-series counter families, in exposition order: (name, help, label names
# before the optional pid label, label names after it).
_PER_SERIES: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    (f"{NS}_vm_create_attempts", "KVM_CREATE_VM calls seen at the ioctl layer.",
     ("comm",), ("vm_type", "vm_type_name")),
    (f"{NS}_vm_create_rejected", "KVM_CREATE_VM calls that failed, by errno.",
     ("comm",), ("vm_type", "vm_type_name", "errno", "reason")),
    (f"{NS}_vm_type_checks",
     "Calls of kernel functions seen by function probes (kvm_arch_init_vm, "
     "*_is_vm_type_supported, the confidential launch's functions).",
     ("probe", "comm"), ("vm_type", "vm_type_name")),
    (f"{NS}_vm_type_check_rejected",
     "Function-probe calls that said no (false, or a negative errno).",
     ("probe", "comm"), ("vm_type", "vm_type_name")),
    (f"{NS}_vm_types_queries", "KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES) calls.",
     ("comm",), ()),
    (f"{NS}_encrypt_ops",
     "KVM_MEMORY_ENCRYPT_OP calls (the confidential launch), by command, errno and "
     "firmware status; vm_type: the VM the fd belongs to.",
     ("comm",), ("vm_type", "vm_type_name", "command", "errno", "firmware_status")),
)
ATTEMPTS, REJECTED, CHECKS, CHECK_REJECTED, QUERIES, ENCRYPT = range(len(_PER_SERIES))

# Samples no longer exported (exited pids with --pid-label) are dropped by starting
# over when there are more than _CACHE_SLACK per exported one (plus _CACHE_FLOOR);
# cache entries of keys no longer read, as soon as there are _CACHE_FLOOR of them.
_CACHE_SLACK, _CACHE_FLOOR = 2, 1024
_KEY, _COUNT = operator.itemgetter(slice(0, RAW_KEY_LEN)), operator.itemgetter(RAW_KEY_LEN)

# A series as the collector reads it is a decoded Key: Decoder.count_labels() of a
# live map key, or an exited series as the aggregator keeps it (pid None).
_PID, _COMM, _VM_TYPE, _NAME = (operator.itemgetter(Key._fields.index(name))
                                for name in ("pid", "comm", "vm_type", "vm_type_name"))


class _Samples:
    """The samples of the per-series families, kept across scrapes as columns indexed
    by a sample id (one per family and label set, valid until clear()): few objects
    for the garbage collector to walk, however many series there are."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.ids: list[dict[tuple[str, ...], int]] = [{} for _ in _PER_SERIES]  # per family
        self.family: list[int] = []
        self.labels: list[tuple[str, ...]] = []
        # The sample's line as last rendered, the value in it, the length of its label
        # part and the template it follows (extended on demand by the renderer).
        self.line: list[bytes] = []
        self.line_value: list[int | None] = []
        self.plen: list[int] = []
        self.tid: list[int] = []

    def grow_lines(self) -> None:
        """Extend the line columns to every sample."""
        new = len(self.labels) - len(self.line)
        if new > 0:
            self.line.extend([b""] * new)
            self.line_value.extend([None] * new)
            self.plen.extend([0] * new)
            self.tid.extend([-1] * new)


class KvmtraceCollector(Collector):
    def __init__(self, runtime: Runtime, attachments: Sequence[Attachment],
                 kvm_query: Callable[[], KvmInfo], arch: str,
                 build_info: dict[str, str], with_pid: bool = False,
                 extra_health: Callable[[], dict[str, int]] = dict,
                 evidence_query: Callable[[], Evidence | None] = lambda: None):
        self._rt = runtime
        self._evidence_query = evidence_query  # readiness evidence (kvmtrace.evidence)
        self._attachments = attachments
        self._kvm_query = kvm_query
        self._arch = arch
        self._build = build_info
        self._with_pid = with_pid
        self._extra_health = extra_health  # counters kept outside the runtime (live view)
        # Which names get series of their own: the runtime's aggregator's budget, so the
        # exited residual and the live map fold the same names.
        aggregator = getattr(runtime, "aggregator", None)
        self._budget = aggregator.budget if aggregator is not None else NameBudget()
        pid = ("pid",) if with_pid else ()
        self._labelnames = tuple((*before, *pid, *after) for _, _, before, after in _PER_SERIES)
        # Scrape state, under _lock (the HTTP server answers scrapes in threads).
        self._lock = threading.Lock()
        self._samples = _Samples()
        # A live map entry's raw key, or an exited series → its sample ids.
        # A live map entry's raw key, or an exited series → its sample ids, and the
        # samples' totals.
        self._sums = SlotSums()
        self._mask: int | None = None  # the host mask the keys' samples were made with
        self._order: list[list[int]] = [[] for _ in _PER_SERIES]  # per family, sorted
        self._ordered = 0
        self._exported = 0  # samples exported at the last scrape that read the maps
        self._renderer = Renderer(self._per_series_families, self._labelnames)
        self._scrape_errors: dict[str, int] = {}  # exception kind -> failed map reads
        self._evidence: Evidence | None = None  # as read at the last scrape

    # ---- the scrape, shared by both outputs ---------------------------------

    def _scrape(self) -> tuple[KvmInfo, dict, tuple, int, list[list[int]]]:
        """Read everything once; update the samples. Caller holds _lock."""
        ok = 1
        kvm = self._kvm_query()
        self._evidence = self._evidence_query()
        try:
            raws, exited, counts = self._rt.raw_counts()
            health = {**self._rt.health(), **self._extra_health(),
                      "start_failures": getattr(self._rt, "start_failures", dict)(),
                      "totals": getattr(self._rt, "totals_by_labels", dict)()}
            latency = self._rt.latency()
        except Exception as exc:  # whatever a map read raised: degrade, never a 500
            raws, exited, counts, health, latency, ok = [], [], [], {}, ([], [0, 0]), 0
            kind = type(exc).__name__
            if kind not in self._scrape_errors:  # logged once per kind, counted always
                log.warning("reading the BPF maps failed (%s: %s); serving partial "
                            "metrics (kvmtrace_scrape_errors_total counts each)", kind, exc)
            self._scrape_errors[kind] = self._scrape_errors.get(kind, 0) + 1
        order = self._update(raws, exited, counts, kvm.vm_types_mask, bool(ok))
        if ok:  # names folded by this very update count at this scrape
            health["names_folded"] = self._budget.folded
        return kvm, health, latency, ok, order

    def _update(self, raws: list[RawCount], exited: list[Key], counts: list[int],
                mask: int | None, complete: bool) -> list[list[int]]:
        """Total the live map's counts and the exited residual per sample (one per label
        set: kvmtrace.aggregate.SlotSums); return the sample ids of each family, sorted
        by label values."""
        sums, samples = self._sums, self._samples
        if (mask != self._mask
                or len(samples.labels) > _CACHE_SLACK * self._exported + _CACHE_FLOOR):
            sums.clear()  # reasons depend on the mask; or too many stale samples
            samples.clear()
            self._mask = mask

        def samples_of(rows: Callable[[list[Hashable]], list[Key]]):
            return lambda keys: self._new_entries(rows(keys), mask)

        # A key adds to at most 2 samples.
        active, moved = sums.sum(
            ((map(_KEY, raws), map(_COUNT, raws), samples_of(self._rows_of_keys)),
             (exited, counts, samples_of(list))),
            len(samples.labels) + 2 * (len(raws) + len(exited)))
        sums.trim(len(samples.labels))
        self._budget.exported = len(samples.labels)
        if complete:
            self._exported = len(active)
            sums.forget(len(raws) + len(exited), lambda: chain(map(_KEY, raws), exited),
                        _CACHE_FLOOR)  # keys no longer read
        # The same samples as at the previous scrape (none new, as many): same order.
        if moved or len(active) != self._ordered:
            order: list[list[int]] = [[] for _ in _PER_SERIES]
            family = samples.family
            for i in active:
                order[family[i]].append(i)
            order = [_sorted(ids, samples.labels) for ids in order]
            self._order, self._ordered = order, len(active)
        return self._order

    def _rows_of_keys(self, keys: list[Hashable]) -> list[Key]:
        return list(map(self._rt.decoder.count_labels, keys))

    def _new_entries(self, rows: list[Key], mask: int | None) -> list[tuple[int, ...]]:
        """The samples each series adds to (one or two ids), creating new samples.

        Written for many rows at once (the first scrape after a burst of new series):
        the label tuples are built by zip and the samples registered inline.
        """
        sm = self._samples
        ids, labels, family = sm.ids, sm.labels, sm.family
        # Names past the series budget are exported as comm="other" (lazily, row by row,
        # so the budget sees the samples made so far).
        name_of = self._budget.name
        comms = (name_of(c, len(labels)) for c in map(_COMM, rows))
        vts, names = map(vm_type_label, map(_VM_TYPE, rows)), map(_NAME, rows)
        if self._with_pid:
            pairs = ((c, "" if pid is None or c == OTHER else str(pid))
                     for c, pid in zip(comms, map(_PID, rows), strict=True))
            bases: Iterable[tuple[str, ...]] = (
                (c, pid, vt, name) for (c, pid), vt, name in zip(pairs, vts, names,
                                                                  strict=True))
        else:
            bases = zip(comms, vts, names, strict=True)
        classify = attemptsmod.classify
        arch = self._arch
        out: list[tuple[int, ...]] = []
        for (_, _, probe, layer, vm_type, _, _, rejected, errno, verdicts, detail), base in zip(
                rows, bases, strict=True):
            if probe == planmod.CREATE_VM:
                f, key = ATTEMPTS, base
            elif probe == planmod.VM_TYPES_QUERY:
                f, key, rejected = QUERIES, base[:-2], False  # queries: one family
            elif probe == planmod.ENCRYPT_OP:
                kind = tables.encrypt_family(vm_type, arch)
                f, rejected = ENCRYPT, False
                key = (*base, tables.encrypt_command_name(kind, verdicts), errno or "none",
                       tables.firmware_status_label(
                           kind, firmware_status(kind == "TDX", detail), errno is not None))
            elif layer == planmod.Layer.PROCESS:
                out.append(())  # a process's end: kept by the runtime (start failures)
                continue
            else:
                f, key = CHECKS, (probe, *base)
            i = ids[f].get(key)
            if i is None:
                i = ids[f][key] = len(labels)
                labels.append(key)
                family.append(f)
            if not rejected:
                out.append((i,))
                continue
            if f == ATTEMPTS:
                f = REJECTED
                key = (*base, errno or "none", classify(errno, vm_type, verdicts, mask).reason)
            else:
                f = CHECK_REJECTED  # the same labels as the check's
            j = ids[f].get(key)
            if j is None:
                j = ids[f][key] = len(labels)
                labels.append(key)
                family.append(f)
            out.append((i, j))
        return out

    def _per_series_families(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(name, doc, labels=list(names))
                for (name, doc, _, _), names in zip(_PER_SERIES, self._labelnames, strict=True)]

    # ---- output 1: prometheus_client families -------------------------------

    def _readiness_families(self, kvm: KvmInfo) -> list[Metric]:
        """Per VM type: ready 1/0 with its verdict and the check that failed, from the
        same chains as doctor (kvmtrace.readiness); ASID/KeyID capacity and use; the
        firmware and TDX module versions the kernel log states."""
        ev = self._evidence
        ready = GaugeMetricFamily(
            f"{NS}_vm_type_ready",
            "1 when the VM type is usable here (offered by KVM_CAP_VM_TYPES, no layer "
            "failed, capacity left), else 0; verdict ready, not_ready, not_applicable or "
            "incomplete, and the id of the check that decided it (as kvmtrace doctor).",
            labels=["vm_type", "vm_type_name", "verdict", "failed_check"])
        capacity = GaugeMetricFamily(
            f"{NS}_host_encryption_ids",
            "ASIDs (sev, sev_es: SNP uses SEV-ES's) or TDX KeyIDs (tdx) the host has, "
            "from the misc cgroup's misc.capacity.", labels=["resource"])
        used = GaugeMetricFamily(
            f"{NS}_host_encryption_ids_used",
            "Of those, in use by running VMs (misc.current).", labels=["resource"])
        firmware = GaugeMetricFamily(
            f"{NS}_host_firmware_info",
            "1 for each firmware or TDX module version the kernel log states.",
            labels=["component", "version"])
        if kvm.present or ev is not None:
            for t in readinessmod.assess_parts(self._arch, kvm, ev):
                ready.add_metric([str(t.vm_type), t.name, t.verdict, t.failed_check or ""],
                                 1 if t.verdict == readinessmod.READY else 0)
        for c in readinessmod.capacities(ev):
            capacity.add_metric([c.resource], c.capacity)
            if c.used is not None:
                used.add_metric([c.resource], c.used)
        for f in readinessmod.firmware(ev):
            firmware.add_metric([f.component, f.version], 1)
        return [ready, capacity, used, firmware]

    def describe(self) -> Iterator[Metric]:
        """The families this collector serves, without their samples and without
        reading anything: what the registry maps names to (``/metrics?name[]=``)."""
        yield from self._per_series_families()
        yield from self._other_families(KvmInfo(present=False), {}, ([], [0, 0]), 1)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            kvm, health, latency, ok, order = self._scrape()
            labels, value = self._samples.labels, self._sums.value
            samples = [[(labels[i], value[i]) for i in ids] for ids in order]
        families = self._per_series_families()
        for family, values in zip(families, samples, strict=True):
            for label_values, n in values:
                family.add_metric(list(label_values), float(n))
        yield from families
        yield from self._other_families(kvm, health, latency, ok)

    # ---- output 2: the /metrics body ----------------------------------------

    def exposition(self, encoder: Callable[[Collector], bytes], content_type: str
                   ) -> bytes | None:
        """The exposition ``encoder`` (a prometheus_client encoder, as chosen by
        ``prometheus_client.exposition.choose_encoder``, whose content type is
        ``content_type``) would make of a registry holding only this collector, at
        a fraction of the cost (kvmtrace.render). None when the format is not one this
        can render (then use the encoder on the registry)."""
        with self._lock:
            fmt = self._renderer.format(encoder, content_type)
            if fmt is None:
                return None
            kvm, health, latency, ok, order = self._scrape()
            parts = self._renderer.samples(fmt, self._samples, self._sums.value, order)
        parts.append(encoder(FixedFamilies(self._other_families(kvm, health, latency, ok))))
        return b"".join(parts)

    # ---- the other families (small; built fresh, rendered by the library) ----

    def _other_families(self, kvm: KvmInfo, health: dict, latency: tuple,
                        ok: int) -> list[Metric]:
        out: list[Metric] = [_latency_histogram(*latency)]
        failures = CounterMetricFamily(
            f"{NS}_vm_start_failures",
            "Followed processes whose VM start failed, by stage (before_create, at_create, "
            "during_launch), reason and the VM type their command line asked for.",
            labels=["comm", "stage", "reason", "requested_type"])
        for labels, n in sorted(health.get("start_failures", {}).items()):
            failures.add_metric(list(labels), n)
        out.append(failures)
        calls = CounterMetricFamily(
            f"{NS}_probe_calls",
            "Calls seen at each probe point, host-wide and exact whatever processes do "
            "(VM types above 255 count as vm_type=\"other\"), by result (ok, an errno, "
            "or true/false).", labels=["probe", "vm_type", "vm_type_name", "result"])
        for labels, n in sorted(health.get("totals", {}).items()):
            calls.add_metric(list(labels), n)
        out.append(calls)
        kvm_up = GaugeMetricFamily(
            f"{NS}_host_kvm_up", "1 when /dev/kvm answered the exporter's KVM_CAP_VM_TYPES query.")
        kvm_up.add_metric([], 1 if kvm.vm_types_mask is not None else 0)
        out.append(kvm_up)
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
        out.append(supported)
        out += self._readiness_families(kvm)

        attached = GaugeMetricFamily(
            f"{NS}_probe_attached", "1 for each planned probe point that is attached, else 0.",
            labels=["probe", "mechanism"])
        for a in self._attachments:
            attached.add_metric([a.point.name, a.mechanism], 1 if a.attached else 0)
        out.append(attached)
        for key, doc in (
            ("events_lost", "Events the live stream could not carry (buffer full)."),
            ("events_throttled", "Events left out of the live stream by the per-CPU event "
                                 "budget (counts stay exact)."),
            ("counts_dropped", "Count updates lost because the counts map was full."),
            ("counts_over_share", "Calls of a process past its share of the counts map "
                                  "(256 keys), counted under comm=\"other\" without their "
                                  "VM type above 255, reason or detail (sums stay exact)."),
            ("counts_inserted", "Keys inserted into the kernel's counts map (its fill is "
                                "this less what the retirement passes folded out)."),
            ("calls_dropped", "Calls not tracked because the in-flight map was full."),
            ("procs_dropped", "Processes not followed to their end because the map of "
                              "followed processes was full."),
            ("totals_dropped", "Host-wide total updates lost because the totals map was "
                               "full (its keys are bounded: expected to stay 0)."),
            ("decode_errors", "Events that could not be decoded."),
            ("retire_errors", "Retirement passes skipped because the process list could "
                              "not be read (e.g. out of file descriptors)."),
            ("exited_processes", "Count entries of exited processes folded out of the map."),
            ("live_entries_folded", "Count entries of live processes folded out of the map "
                                    "early, because it was half full (sums stay exact)."),
            ("live_lines_dropped", "Lines of serve's live view dropped because its stdout "
                                   "was not read (counting never waits for it)."),
            ("names_folded", "Process names exported as comm=\"other\" instead of their "
                             "own series (past --max-series, or unseen for --series-ttl)."),
        ):
            c = CounterMetricFamily(f"{NS}_{key}", doc)
            c.add_metric([], health.get(key, 0))
            out.append(c)
        success = GaugeMetricFamily(
            f"{NS}_collect_success", "1 when the BPF maps were read at this scrape.")
        success.add_metric([], ok)
        out.append(success)
        errors = CounterMetricFamily(
            f"{NS}_scrape_errors", "Scrapes whose BPF map reads failed, by exception kind.",
            labels=["kind"])
        for kind in sorted(self._scrape_errors):
            errors.add_metric([kind], self._scrape_errors[kind])
        out.append(errors)
        info = GaugeMetricFamily(f"{NS}_build_info", "kvmtrace build and host information.",
                                 labels=sorted(self._build))
        info.add_metric([self._build[k] for k in sorted(self._build)], 1)
        out.append(info)
        return out


def _sorted(ids: list[int], labels: list[tuple[str, ...]]) -> list[int]:
    """``ids`` in the order of their label tuples (all of one length). Joined with
    NULs they sort the same when no value holds a NUL (checked), and strings compare
    faster than tuples."""
    keys = list(map("\0".join, map(labels.__getitem__, ids)))
    if not ids or "".join(keys).count("\0") != len(ids) * (len(labels[ids[0]]) - 1):
        return sorted(ids, key=labels.__getitem__)
    return list(map(ids.__getitem__, sorted(range(len(ids)), key=keys.__getitem__)))


# Bucket bounds of kvmtrace_vm_create_duration_seconds: powers of two of ns,
# 2**10 (~1 µs) .. 2**31 (~2.1 s), matching the kernel's log2 slots.
LATENCY_BOUNDS_LOG2 = range(10, 32)


def _latency_histogram(slots: list[tuple[int, int, int]], sums: list[int]) -> Metric:
    """Kernel log2(ns) slots → a cumulative Prometheus histogram per outcome."""
    h = HistogramMetricFamily(
        f"{NS}_vm_create_duration_seconds",
        "KVM_CREATE_VM latency, entry to return at the ioctl layer, by outcome.",
        labels=["outcome"])
    for outcome, name in enumerate(LATENCY_OUTCOMES):
        mine = [(slot, n) for o, slot, n in slots if o == outcome]
        # A value in slot s lies in [2**s, 2**(s+1)) ns: at most 2**(s+1).
        buckets = [(f"{2 ** b / 1e9:.9g}", sum(n for slot, n in mine if slot + 1 <= b))
                   for b in LATENCY_BOUNDS_LOG2]
        total = sum(n for _, n in mine)
        buckets.append(("+Inf", total))
        h.add_metric([name], buckets, sum_value=sums[outcome] / 1e9 if outcome < len(sums)
                     else 0)
    return h
