"""Prometheus collector: fresh metric families from the BPF maps at every scrape.

One computation, two outputs:

- ``collect()``: prometheus_client metric families (the registry path: tests and the
  reference output);
- ``exposition()``: the whole /metrics body for ``serve``, the per-series families
  rendered by kvmtrace.render in the format the library itself would write.

Both read the maps once per scrape and share the per-series work. What does not
change between scrapes is kept: each series' family membership and label values
(classified once per host mask), the samples' order, and each sample's rendered line
(re-rendered only when its value changes). Every family is the catalogue's
(kvmtrace.catalogue), made fresh at each scrape; the ones that are not per series are
made and filled by kvmtrace.families from what the scrape read.
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from itertools import chain

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from kvmtrace import attempts as attemptsmod
from kvmtrace import families as familiesmod
from kvmtrace import plan as planmod
from kvmtrace import tables
from kvmtrace.aggregate import OTHER, NameBudget, OwnerKey, SlotSums, folded, series_name
from kvmtrace.catalogue import FAMILIES, Family
from kvmtrace.contract import RAW_KEY_LEN, RawCount, firmware_status
from kvmtrace.decode import Key, vm_type_label
from kvmtrace.evidence import Evidence
from kvmtrace.kvmdev import KvmInfo
from kvmtrace.plan import Attachment
from kvmtrace.render import FixedFamilies, Renderer
from kvmtrace.runtime import Runtime

log = logging.getLogger(__name__)

# The per-series families are the catalogue's per-process ones, in its order; these
# indices name them in the samples' columns (tests/test_collector.py holds the two
# together).
N_SERIES = 6
ATTEMPTS, REJECTED, CHECKS, CHECK_REJECTED, QUERIES, ENCRYPT = range(N_SERIES)


def per_series() -> list[Family]:
    """The per-series families, in the order of their indices ATTEMPTS .. ENCRYPT."""
    return [f for f in FAMILIES if f.per_process]


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
        self.ids: list[dict[tuple[str, ...], int]] = [{} for _ in range(N_SERIES)]  # per family
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
                 evidence_query: Callable[[], Evidence | None] = lambda: None,
                 owner_labels: tuple[str, ...] = ()):
        self._rt = runtime
        self._evidence_query = evidence_query  # readiness evidence (kvmtrace.evidence)
        self._attachments = attachments
        self._kvm_query = kvm_query
        self._arch = arch
        self._build = build_info
        self._with_pid = with_pid
        # --metrics.labels: each series also by its process's owner (runtime.owner_keys)
        self._owner_labels = owner_labels
        self._extra_health = extra_health  # counters kept outside the runtime (live view)
        # Which names get series of their own: the runtime's aggregator's budget, so the
        # exited residual and the live map fold the same names.
        aggregator = getattr(runtime, "aggregator", None)
        self._budget = aggregator.budget if aggregator is not None else NameBudget()
        self._series = per_series()
        self._labelnames = tuple(familiesmod.label_names(f, with_pid, owner_labels)
                                 for f in self._series)
        # Scrape state, under _lock (the HTTP server answers scrapes in threads).
        self._lock = threading.Lock()
        self._samples = _Samples()
        # A live map entry's raw key, or an exited series → its sample ids, and the
        # samples' totals.
        self._sums = SlotSums()
        self._mask: int | None = None  # the host mask the keys' samples were made with
        self._order: list[list[int]] = [[] for _ in range(N_SERIES)]  # per family, sorted
        self._ordered = 0
        self._exported = 0  # samples exported at the last scrape that read the maps
        self._renderer = Renderer(self._per_series_families, self._labelnames)
        self._scrape_errors: dict[str, int] = {}  # exception kind -> failed map reads

    # ---- the scrape, shared by both outputs ---------------------------------

    def _scrape(self) -> tuple[familiesmod.Scrape, list[list[int]]]:
        """Read everything once; update the samples. Caller holds _lock."""
        ok = 1
        kvm = self._kvm_query()
        evidence = self._evidence_query()
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
        return familiesmod.Scrape(self._arch, self._attachments, self._build, kvm, evidence,
                                  health, latency, ok, dict(self._scrape_errors),
                                  self._owner_labels), order

    def _update(self, raws: list[RawCount], exited: list[tuple[Key, OwnerKey]],
                counts: list[int],
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

        owned = bool(self._owner_labels)

        def samples_of(rows: Callable[[list[Hashable]], list[Key]]):
            return lambda keys: self._new_entries(
                rows(keys), [owner for _, owner in keys] if owned else None, mask)

        # A live entry's key: its raw key; with owner labels, with its process's owner's.
        live: list[Hashable] | None = None
        if owned:
            live = list(zip(map(_KEY, raws), self._rt.owner_keys([r[0] for r in raws]),
                            strict=True))
            live_rows = self._rows_of_owned_keys
        else:
            live_rows = self._rows_of_keys

        # A key adds to at most 2 samples.
        active, moved = sums.sum(
            ((map(_KEY, raws) if live is None else live, map(_COUNT, raws),
              samples_of(live_rows)),
             (exited, counts, samples_of(lambda keys: [key for key, _ in keys]))),
            len(samples.labels) + 2 * (len(raws) + len(exited)))
        sums.trim(len(samples.labels))
        self._budget.exported = len(samples.labels)
        if complete:
            self._exported = len(active)
            sums.forget(len(raws) + len(exited),
                        lambda: chain(map(_KEY, raws) if live is None else live, exited),
                        _CACHE_FLOOR)  # keys no longer read
        # The same samples as at the previous scrape (none new, as many): same order.
        if moved or len(active) != self._ordered:
            order: list[list[int]] = [[] for _ in range(N_SERIES)]
            family = samples.family
            for i in active:
                order[family[i]].append(i)
            order = [_sorted(ids, samples.labels) for ids in order]
            self._order, self._ordered = order, len(active)
        return self._order

    def _rows_of_keys(self, keys: list[Hashable]) -> list[Key]:
        return list(map(self._rt.decoder.count_labels, keys))

    def _rows_of_owned_keys(self, keys: list[Hashable]) -> list[Key]:
        return list(map(self._rt.decoder.count_labels, (raw for raw, _ in keys)))

    def _heads(self, rows: list[Key], owners: list[OwnerKey] | None,
               labels: list) -> Iterator[tuple[str, ...]]:
        """Each series' first labels: comm, pid (--pid-label), the owner labels
        (--metrics.labels). A name past the series budget is exported as comm="other"
        with empty owner labels (lazily, row by row, so the budget sees the samples
        made so far)."""
        name_of = self._budget.name
        if owners is None:
            comms: Iterable[str] = (name_of(c, len(labels)) for c in map(_COMM, rows))
            if not self._with_pid:
                return zip(comms)
            return ((c, "" if pid is None or c == OTHER else str(pid))
                    for c, pid in zip(comms, map(_PID, rows), strict=True))

        def owned() -> Iterator[tuple[str, ...]]:
            for c, pid, owner in zip(map(_COMM, rows), map(_PID, rows), owners, strict=True):
                if name_of(series_name(c, owner), len(labels)) == OTHER:
                    c, owner = OTHER, folded(owner)
                if self._with_pid:
                    yield (c, "" if pid is None or c == OTHER else str(pid), *owner)
                else:
                    yield (c, *owner)
        return owned()

    def _new_entries(self, rows: list[Key], owners: list[OwnerKey] | None,
                     mask: int | None) -> list[tuple[int, ...]]:
        """The samples each series adds to (one or two ids), creating new samples;
        ``owners``: each row's owner labels' values (None: none exported).

        Written for many rows at once (the first scrape after a burst of new series):
        the label tuples are built by zip and the samples registered inline.
        """
        sm = self._samples
        ids, labels, family = sm.ids, sm.labels, sm.family
        vts, names = map(vm_type_label, map(_VM_TYPE, rows)), map(_NAME, rows)
        bases: Iterable[tuple[str, ...]] = (
            (*head, vt, name) for head, vt, name in zip(self._heads(rows, owners, labels),
                                                        vts, names, strict=True))
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
            elif layer in (planmod.Layer.PROCESS, planmod.Layer.START):
                # a process's end, a start's failed calls: kept by the runtime for the
                # start records (and in the host-wide totals)
                out.append(())
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
        return [familiesmod.fresh(f, names)
                for f, names in zip(self._series, self._labelnames, strict=True)]

    # ---- output 1: prometheus_client families -------------------------------

    def describe(self) -> Iterator[Metric]:
        """The families this collector serves, without their samples and without
        reading anything: what the registry maps names to (``/metrics?name[]=``)."""
        for family in FAMILIES:
            yield familiesmod.fresh(family)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            scrape, order = self._scrape()
            labels, value = self._samples.labels, self._sums.value
            samples = [[(labels[i], value[i]) for i in ids] for ids in order]
        families = self._per_series_families()
        for family, values in zip(families, samples, strict=True):
            for label_values, n in values:
                family.add_metric(list(label_values), float(n))
        yield from families
        yield from familiesmod.build(scrape)

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
            scrape, order = self._scrape()
            parts = self._renderer.samples(fmt, self._samples, self._sums.value, order)
        # The other families are small: built fresh, rendered by the library.
        parts.append(encoder(FixedFamilies(familiesmod.build(scrape))))
        return b"".join(parts)


def _sorted(ids: list[int], labels: list[tuple[str, ...]]) -> list[int]:
    """``ids`` in the order of their label tuples (all of one length). Joined with
    NULs they sort the same when no value holds a NUL (checked), and strings compare
    faster than tuples."""
    keys = list(map("\0".join, map(labels.__getitem__, ids)))
    if not ids or "".join(keys).count("\0") != len(ids) * (len(labels[ids[0]]) - 1):
        return sorted(ids, key=labels.__getitem__)
    return list(map(ids.__getitem__, sorted(range(len(ids)), key=keys.__getitem__)))
