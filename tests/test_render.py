"""The /metrics fast path against prometheus_client, byte for byte.

`kvmtrace serve` renders /metrics with KvmtraceCollector.exposition() (cached
per-series lines) instead of prometheus_client's encoders; tests, and requests the
fast path does not handle, use the registry. These tests hold the two to the same
bytes in every format the library negotiates, across scrapes that change the
counts, and check that the caches behind both (raw-key decoding, per-series samples)
compute what decoding and aggregating every entry from scratch computes.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import threading
from collections import Counter, defaultdict
from wsgiref.util import setup_testing_defaults

import pytest
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import choose_encoder

from kvmtrace import attempts as attemptsmod
from kvmtrace import contract, vmm
from kvmtrace import plan as planmod
from kvmtrace.collector import KvmtraceCollector
from kvmtrace.contract import VERDICT_ARCH_INIT_FAILED, VERDICT_ARCH_INIT_SEEN
from kvmtrace.decode import CountRecord, Decoder, Key
from kvmtrace.kvmdev import KvmInfo
from kvmtrace.plan import Attachment
from kvmtrace.runtime import Runtime
from kvmtrace.server import metrics_app
from tests.recorded import RecordedSource

CREATE, QUERY, ARCH, CHECK = (contract.PROBE_CREATE_VM, contract.PROBE_VM_TYPES_QUERY,
                              contract.PROBE_ARCH_INIT_VM, contract.FIRST_TYPE_CHECK + 1)
# Raw counts (tgid, probe, vm type, result, verdicts, detail, comm, count): every family, odd
# comms (a quote, a backslash, a newline, UTF-8, NUL padding, format characters),
# 2**32+1, an unknown probe id, an unknown errno, two keys that fold into one series.
RAWS = [
    (100, CREATE, 0, 0, 0, 0, b"qemu-system-x86", 4),
    (100, CREATE, 0, 5, 0, 0, b"qemu-system-x86", 2),  # another fd: the same series
    (100, CREATE, 2, -22, 0, 0, b"qemu-system-x86", 3),
    (101, CREATE, 2, -22, 0, 0, b"qemu-system-x86", 1),
    (101, CREATE, 2**32 + 1, -22, 0, 0, b"fuzz\x07er", 1),
    (102, CREATE, 3, -22, 0, 0, b'q"uo\\te', 7),
    (102, CREATE, 4, -24, VERDICT_ARCH_INIT_SEEN, 0, b"a\nb\tc", 2),
    (102, CREATE, 1, -12, VERDICT_ARCH_INIT_SEEN | VERDICT_ARCH_INIT_FAILED, 0,
     "é日本".encode() + b"\0junk", 1),
    (103, CREATE, 5, -4095, 0, 0, b"%s%%{}", 2**53 + 1),
    (103, QUERY, 0, 1, 0, 0, b"%s%%{}", 2),
    (100, QUERY, 0, 1, 0, 0, b"qemu-system-x86", 2),
    (100, ARCH, 2, -22, 0, 0, b"qemu-system-x86", 3),
    (100, CHECK, 2, 0, 0, 0, b"qemu-system-x86", 3),
    (100, CHECK, 0, 1, 0, 0, b"qemu-system-x86", 4),
    (101, 77, 9, 0, 0, 0, b"unknownprobe", 1),
]
PROMETHEUS = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
              "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
ACCEPTS = [
    None,  # curl, and the bench: text format 0.0.4
    "text/plain;version=0.0.4",
    PROMETHEUS,  # Prometheus 2.x: OpenMetrics 1.0.0
    "application/openmetrics-text",
    "application/openmetrics-text; version=1.0.0; escaping=allow-utf-8",
    "application/openmetrics-text; version=1.0.0; escaping=values",
    "application/openmetrics-text; version=2.0.0; escaping=dots",
    "text/plain; version=1.0.0; escaping=allow-utf-8",
    "text/plain; version=1.0.0; escaping=dots",
    "text/plain; version=1.0.0; escaping=values",
]


class Host:
    """What the collector asks of the host; tests change it between scrapes."""

    def __init__(self, mask: int | None = 0x1):
        self.mask = mask

    def query(self) -> KvmInfo:
        return KvmInfo(True, 12, self.mask) if self.mask is not None else KvmInfo(
            False, error="/dev/kvm does not exist")


# Made-up cgroups of the recorded processes (for --metrics.labels; built by hand): a
# libvirt domain, a pod's container (systemd driver), a service; 103's is not known.
CGROUPS = {
    100: "/machine.slice/machine-qemu\\x2d1\\x2dvm\\x2da.scope/libvirt/emulator",
    101: ("/kubepods.slice/kubepods-pod1e597579_417e_482f_bf65_5fe170c3aebd.slice/"
          "cri-containerd-" + "ab" * 32 + ".scope"),
    102: "/system.slice/odd\\x22unit.service",
}


def make(kernel_facts, raws=RAWS, with_pid=False, live=frozenset({100, 101, 102, 103}),
         host=None, owner_labels=()):
    plan = planmod.make_plan(kernel_facts("seed-tdx-v12-kprobes"))
    source = RecordedSource(raws)
    source.latency = ([(0, 18, 3), (1, 13, 2)], [900_000, 20_000])
    rt = Runtime(source, Decoder(plan, "x86_64"), live_pids=lambda: set(live),
                 request=lambda pid: vmm.NOT_KNOWN, resolve_stderr=lambda pid, hold: "none",
                 cgroup_of=lambda pid, cid: CGROUPS.get(pid), owner_labels=owner_labels)
    collector = KvmtraceCollector(
        rt, [Attachment(p, p.mechanism is not None) for p in plan.points],
        (host or Host()).query, "x86_64",
        {"version": "t", "bcc_version": "0.26.0", "kernel": "6.3"}, with_pid=with_pid,
        owner_labels=owner_labels)
    reg = CollectorRegistry()
    reg.register(collector)
    return reg, collector, rt, source


def assert_same(reg, collector, accepts=ACCEPTS, failing=False):
    """Both paths give the same bytes. ``failing``: the map reads fail, so the library's
    scrape, one after the fast one, has counted one more scrape error."""
    for accept in accepts:
        encoder, content_type = choose_encoder(accept)
        fast = collector.exposition(encoder, content_type)
        assert fast is not None, accept
        if failing:
            # The sample line in any format's spelling of the name (e.g. U__ escapes).
            m = re.search(rb"\n([^\n]*scrape_+errors[^\n]*OSError[^\n]*) (\d+)\.0\n", fast)
            assert m, fast
            fast = fast.replace(m.group(0), b"\n%s %d.0\n" % (m.group(1), int(m.group(2)) + 1))
        assert fast == encoder(reg), accept


@pytest.mark.parametrize(("with_pid", "owner_labels"), [
    (False, ()), (True, ()), (False, ("vm", "pod")), (True, ("vm", "unit", "pod", "namespace"))])
@pytest.mark.parametrize("accept", ACCEPTS)
def test_exposition_is_the_librarys_in_every_negotiated_format(kernel_facts, accept, with_pid,
                                                                owner_labels):
    reg, collector, _, _ = make(kernel_facts, with_pid=with_pid, owner_labels=owner_labels)
    assert_same(reg, collector, [accept])
    assert_same(reg, collector, [accept])  # again: from the cached lines


def test_exposition_follows_every_change_between_scrapes(kernel_facts):
    host = Host()
    reg, collector, rt, source = make(kernel_facts, host=host, live={100, 101, 103})
    assert_same(reg, collector)
    source.raws = [(*r[:7], r[7] + 10) if r[0] == 100 else r for r in source.raws]  # values
    assert_same(reg, collector)
    source.raws.append((104, CREATE, 7, -22, 0, 0, b"newcomer", 1))  # a new series, sorted in
    assert_same(reg, collector)
    source.raws = [r for r in source.raws if r[6] != b"newcomer"]  # a series gone
    assert_same(reg, collector)
    assert rt.retire_exited() == 3  # 102 exited: its three entries fold into the residual
    assert_same(reg, collector)
    source.raws.append((105, CREATE, 3, -22, 0, 0, b'q"uo\\te', 5))  # live + exited, one series
    assert_same(reg, collector)
    host.mask = 0x1F  # the host's types changed: reasons are classified again
    assert_same(reg, collector)
    host.mask = None  # /dev/kvm gone
    assert_same(reg, collector)
    source.fail = True  # the map read fails: partial output
    assert_same(reg, collector, failing=True)
    source.fail, host.mask = False, 0x1
    assert_same(reg, collector)


def test_odd_label_values_are_escaped_like_the_library():
    """Values the decoder never makes (a raw newline, a NUL, non-ASCII, quotes), through
    a runtime that serves only an exited residual."""
    comms = ['plain', 'q"uote', 'back\\slash', 'new\nline', 'nul\0byte', 'é日本🙂', '%s%d',
             '{}{0}', '', 'a\\"\n\\n', '\x7f\x01', 'x', 'x\0!']  # 'x' sorts before 'x\0!'

    class Residual:
        decoder = None

        def __init__(self, owner_labels: tuple[str, ...]) -> None:
            self.owner_labels = owner_labels

        def raw_counts(self):
            series = [Key(None, c, planmod.CREATE_VM, "ioctl", t, f"unknown:{t}", -22, True,
                          "EINVAL", 0, 0) for t, c in enumerate(comms)]
            series += [Key(None, c, "probe\n\"x\\", "type_check", 2, "SEV", 0, True, None, 1, 0)
                       for c in comms]
            # With owner labels, their values as odd as the comms (the comm's own, per label).
            owned = [(k, tuple(f"{k.comm}{n}" for n in self.owner_labels)) for k in series]
            return [], owned, list(range(1, len(series) + 1))

        def owner_keys(self, pids):
            return [()] * len(pids)

        def health(self):
            return {}

        def latency(self):
            return [], [0, 0]

    for with_pid, owner_labels in ((False, ()), (True, ()), (False, ("vm", "pod")),
                                   (True, ("vm", "unit", "pod", "namespace"))):
        collector = KvmtraceCollector(Residual(owner_labels), [], Host().query, "x86_64",
                                      {"version": "é\"\n", "bcc_version": "b\\", "kernel": ""},
                                      with_pid=with_pid, owner_labels=owner_labels)
        reg = CollectorRegistry()
        reg.register(collector)
        assert_same(reg, collector)
        text = collector.exposition(*choose_encoder(None)).decode()
        assert 'comm="new\\nline"' in text and 'comm="q\\"uote"' in text
        assert 'comm="back\\\\slash"' in text and "é日本🙂" in text
        for name in owner_labels:  # escaped as the comm is
            assert f'{name}="new\\nline{name}"' in text and f'{name}="q\\"uote{name}"' in text
        for family in reg.collect():  # each family's samples in the order of their labels
            labels = [tuple(s.labels.values()) for s in family.samples]
            if family.type == "counter" and family.name.startswith("kvmtrace_vm_"):
                assert labels == sorted(labels), family.name


def reference_samples(rt: Runtime, with_pid: bool, mask: int | None) -> dict:
    """The collector's per-series samples as it computed them before any caching:
    decode every entry, total per Key and owner, classify, sum per label set, sort."""
    totals: Counter = Counter()
    exited, counts = rt.aggregator.exited()
    for pair, n in zip(exited, counts, strict=True):
        totals[pair] += n
    for r in rt.source.read_counts():
        record = rt.decoder.count(r)
        totals[record.key(with_pid), *rt.owner_keys([record.pid])] += record.count
    sums: dict[tuple[str, tuple[str, ...]], float] = defaultdict(float)
    for (s, owner), n in totals.items():
        p = [] if not with_pid else ["" if s.pid is None else str(s.pid)]
        p += owner
        vt = [str(s.vm_type), s.vm_type_name]
        if s.probe == planmod.CREATE_VM:
            sums["kvmtrace_vm_create_attempts", (s.comm, *p, *vt)] += n
            if s.rejected:
                reason = attemptsmod.classify(s.errno, s.vm_type, s.verdicts, mask).reason
                sums["kvmtrace_vm_create_rejected",
                     (s.comm, *p, *vt, s.errno or "none", reason)] += n
        elif s.probe == planmod.VM_TYPES_QUERY:
            sums["kvmtrace_vm_types_queries", (s.comm, *p)] += n
        else:
            sums["kvmtrace_vm_type_checks", (s.probe, s.comm, *p, *vt)] += n
            if s.rejected:
                sums["kvmtrace_vm_type_check_rejected", (s.probe, s.comm, *p, *vt)] += n
    out: dict[str, list] = defaultdict(list)
    for (name, labels), n in sorted(sums.items()):
        out[name].append((labels, n))
    return out


def collected_samples(reg: CollectorRegistry) -> dict:
    out: dict[str, list] = defaultdict(list)
    for family in reg.collect():
        if family.type == "counter" and family.samples and family.samples[0].labels:
            names = list(family.samples[0].labels)
            for s in family.samples:
                out[family.name].append((tuple(s.labels[k] for k in names), s.value))
    return out


@pytest.mark.parametrize(("with_pid", "owner_labels"), [
    (False, ()), (True, ()), (False, ("vm", "pod")), (True, ("vm", "unit", "pod", "namespace"))])
def test_cached_samples_are_what_decoding_everything_gives(kernel_facts, with_pid, owner_labels):
    host = Host()
    reg, _, rt, source = make(kernel_facts, with_pid=with_pid, live={100, 101}, host=host,
                              owner_labels=owner_labels)
    for step in range(5):
        got = {k: v for k, v in collected_samples(reg).items() if k.startswith("kvmtrace_vm_")}
        assert got == dict(reference_samples(rt, with_pid, host.mask)), step
        if step == 0:
            rt.retire_exited()  # 102 and 103 exit
        elif step == 1:
            source.raws += [(106, CREATE, 2, -22, 0, 0, b"qemu-system-x86", 9),
                            (107, CREATE, 2, -22, 0, 0, b"qemu-system-x86", 1)]
        elif step == 2:
            source.raws = source.raws[2:]
        else:
            host.mask = 0x3F  # SEV and friends now supported: other reasons


def test_count_labels_is_count_without_the_value(kernel_facts):
    d = Decoder(planmod.make_plan(kernel_facts("seed-tdx-v12-kprobes")), "x86_64")
    for _ in range(2):  # the second time from the memos
        for raw in RAWS:
            assert CountRecord(*d.count_labels(raw[:7]), raw[7]) == d.count(raw)


def test_caches_stay_bounded_and_right_as_series_come_and_go(kernel_facts):
    reg, collector, _, source = make(kernel_facts)
    for batch in range(3):
        source.raws = [(1000 + batch, CREATE, t, -22, 0, 0, f"p{batch}".encode(), 1)
                       for t in range(1500 * batch, 1500 * batch + 1500)]
        assert_same(reg, collector, [None, PROMETHEUS])
        assert len(collector._sums.slots) <= 2 * len(source.raws) + 1024


def test_concurrent_scrapes_each_get_the_whole_exposition(kernel_facts):
    reg, collector, _, _ = make(kernel_facts)
    expected = {a: choose_encoder(a)[0](reg) for a in (None, PROMETHEUS)}
    bad: list[str] = []

    def scrape(accept):
        for _ in range(20):
            if collector.exposition(*choose_encoder(accept)) != expected[accept]:
                bad.append(str(accept))

    threads = [threading.Thread(target=scrape, args=(a,)) for a in (None, PROMETHEUS) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []


def test_promtool_accepts_the_fast_exposition(kernel_facts):
    _, collector, _, _ = make(kernel_facts)
    assert shutil.which("promtool"), "promtool missing: 'make test' installs Debian's prometheus"
    out = subprocess.run(["promtool", "check", "metrics"],
                         input=collector.exposition(*choose_encoder(None)),
                         capture_output=True, check=False)
    assert out.returncode == 0 and out.stdout == b"" and out.stderr == b"", out


def call(app, method="GET", accept=None, encoding=None, query=""):
    environ: dict = {"REQUEST_METHOD": method, "PATH_INFO": "/metrics", "QUERY_STRING": query}
    if accept is not None:
        environ["HTTP_ACCEPT"] = accept
    if encoding is not None:
        environ["HTTP_ACCEPT_ENCODING"] = encoding
    setup_testing_defaults(environ)
    got = {}

    def start_response(status, headers):
        got["status"], got["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response))
    if got["headers"].get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return got["status"], got["headers"], body


@pytest.mark.parametrize(("method", "accept", "encoding", "query"), [
    ("GET", None, None, ""),
    ("GET", PROMETHEUS, "gzip", ""),  # what Prometheus sends
    ("GET", PROMETHEUS, None, ""),
    ("GET", None, "deflate, gzip;q=0.5", ""),
    ("GET", "text/plain; version=1.0.0; escaping=dots", "identity", ""),
    ("GET", "application/openmetrics-text; version=2.0.0", "gzip", ""),
    ("GET", None, None, "name[]=kvmtrace_host_kvm_up"),  # left to the library
    ("POST", None, None, ""),
    ("OPTIONS", None, None, ""),
])
def test_metrics_app_answers_like_prometheus_clients(kernel_facts, method, accept, encoding,
                                                     query):
    reg, collector, _, _ = make(kernel_facts)
    fast, library = metrics_app(reg, collector.exposition), make_wsgi_app(reg)
    assert call(fast, method, accept, encoding, query) == call(library, method, accept,
                                                               encoding, query)


def test_retirement_lists_processes_before_it_reads_the_counts(kernel_facts):
    calls: list[str] = []

    class Spy(RecordedSource):
        def read_counts(self):
            calls.append("read_counts")
            return super().read_counts()

    def live_pids():
        calls.append("live_pids")
        return {100}

    plan = planmod.make_plan(kernel_facts("seed-tdx-v12-kprobes"))
    rt = Runtime(Spy(RAWS), Decoder(plan, "x86_64"), live_pids=live_pids)
    assert rt.retire_exited() == len([r for r in RAWS if r[0] != 100])
    assert calls == ["live_pids", "read_counts"]


def test_name_filter_serves_the_named_families(kernel_facts):
    """/metrics?name[]=... (prometheus_client's restricted registry) finds this
    collector's families through describe(), which reads nothing."""
    reg, collector, _, source = make(kernel_facts)
    before = source.read_counts
    source.read_counts = lambda: pytest.fail("describe() read the maps")
    described = {f.name for f in collector.describe()}
    source.read_counts = before
    assert {"kvmtrace_build_info", "kvmtrace_vm_create_attempts", "kvmtrace_scrape_errors",
            "kvmtrace_vm_create_duration_seconds"} <= described
    app = metrics_app(reg, collector.exposition)
    _, _, body = call(app, "GET", None, None, "name[]=kvmtrace_build_info")
    lines = [ln for ln in body.decode().splitlines() if not ln.startswith("#")]
    assert lines == ['kvmtrace_build_info{bcc_version="0.26.0",kernel="6.3",version="t"} 1.0']
    _, _, body = call(app, "GET", None, None,
                      "name[]=kvmtrace_vm_create_attempts_total&name[]=kvmtrace_host_kvm_up")
    names = {ln.split("{")[0].split(" ")[0] for ln in body.decode().splitlines()
             if ln and not ln.startswith("#")}
    assert names == {"kvmtrace_vm_create_attempts_total", "kvmtrace_host_kvm_up"}, body
