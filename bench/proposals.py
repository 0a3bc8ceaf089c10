"""Proposed kvmtrace changes, applied by monkeypatching so they can be measured
without editing kvmtrace/ (bench/serve_variant.py, bench/profile_scrape.py).

Each function here mirrors one diff in bench/README.md ("Proposed changes").

  trim_after_load   RSS: after bcc compiled and loaded the program, give the
                    compiler's freed heap back (malloc_trim) and drop the
                    LLVM/clang pages it touched from the resident set
                    (madvise MADV_PAGEOUT; they fault back in if ever needed)
  fast_scrape       /metrics: classify() memoized (pure; 10,000 series share a
                    handful of (errno, type, verdicts) keys) and the text
                    exposition rendered with label-name escaping done once per
                    name instead of once per sample (byte-identical output)
  bpf_variant       the BPF text with a bench/variants.py edit
  consume_after_poll  Session.poll() drains the ring buffer after waiting (what
                    a BPF_RB_NO_WAKEUP producer needs)
"""

from __future__ import annotations

import ctypes
import functools
import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
MADV_PAGEOUT = 21  # Linux 5.4+


def trim_memory() -> int:
    """malloc_trim(0) and MADV_PAGEOUT of libLLVM/libclang mappings; returns mappings paged out."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.malloc_trim(0)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    n = 0
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and re.search(r"/lib(LLVM|clang)", parts[5]):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                n += libc.madvise(lo, hi - lo, MADV_PAGEOUT) == 0
    return n


def trim_after_load() -> None:
    from kvmtrace import loader

    real = loader.load

    @functools.wraps(real)
    def load(*args, **kwargs):
        session = real(*args, **kwargs)
        trim_memory()
        return session

    loader.load = load


def consume_after_poll() -> None:
    """Session.poll(): also drain the ring buffer after the wait. Needed with
    BPF_RB_NO_WAKEUP: epoll then never reports the ring, and libbpf's
    ring_buffer__poll() only reads rings epoll reported."""
    from kvmtrace import loader

    real = loader.Session.poll

    @functools.wraps(real)
    def poll(self, timeout_ms: int) -> None:
        real(self, timeout_ms)
        if hasattr(self.bpf["events"], "open_ring_buffer"):
            self.bpf.ring_buffer_consume()

    loader.Session.poll = poll


def bpf_variant(name: str) -> None:
    from kvmtrace import loader

    sys.path.insert(0, str(BENCH))
    import variants

    real = loader.build_text

    @functools.wraps(real)
    def build_text(*args, **kwargs):
        return variants.apply(name, real(*args, **kwargs))

    loader.build_text = build_text


def fast_generate_latest(registry) -> bytes:
    """prometheus_client.generate_latest (text format 0.0.4), same bytes, less work per sample."""
    from prometheus_client import exposition
    from prometheus_client.openmetrics import exposition as om
    from prometheus_client.utils import floatToGoString

    label_name = functools.lru_cache(maxsize=None)(om.escape_label_name)
    metric_name = functools.lru_cache(maxsize=None)(om.escape_metric_name)
    legacy = functools.lru_cache(maxsize=None)(om._is_valid_legacy_metric_name)
    out: list[str] = []
    for metric in registry.collect():
        mname, mtype = metric.name, metric.type
        if mtype not in ("counter", "gauge", "histogram") or any(
                s.timestamp is not None or s.exemplar is not None or s.native_histogram
                for s in metric.samples[:1]):
            # Anything unusual: the library's own code for this one family.
            class One:
                def collect(self, m=metric):
                    return [m]
            out.append(exposition.generate_latest(One()).decode())
            continue
        if mtype == "counter":
            mname += "_total"
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {metric_name(mname)} {doc}\n")
        out.append(f"# TYPE {metric_name(mname)} {mtype}\n")
        om_samples: dict[str, list[str]] = {}
        suffixes = {metric.name + sfx: sfx for sfx in ("_created", "_gsum", "_gcount")}
        for s in metric.samples:
            if s.timestamp is not None or not legacy(s.name):
                raise ValueError("fast path: unexpected sample")  # never for kvmtrace
            if s.labels:
                labels = ",".join(
                    f'{label_name(k)}="'
                    + v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"") + '"'
                    for k, v in sorted(s.labels.items()))
                line = f"{metric_name(s.name)}{{{labels}}} {floatToGoString(s.value)}\n"
            else:
                line = f"{metric_name(s.name)} {floatToGoString(s.value)}\n"
            sfx = suffixes.get(s.name)
            if sfx:
                om_samples.setdefault(sfx, []).append(line)
            else:
                out.append(line)
        for sfx, lines in sorted(om_samples.items()):
            out.append(f"# HELP {metric_name(metric.name + sfx)} {doc}\n")
            out.append(f"# TYPE {metric_name(metric.name + sfx)} gauge\n")
            out.extend(lines)
    return "".join(out).encode("utf-8")


def fast_scrape() -> None:
    from kvmtrace import attempts, collector
    from prometheus_client import exposition

    # classify() is pure: memoize it for the collector.
    collector.attemptsmod.classify = functools.lru_cache(maxsize=65536)(attempts.classify)
    real_choose = exposition.choose_encoder

    def choose_encoder(accept_header):
        encoder, content_type = real_choose(accept_header)
        if encoder is exposition.generate_latest:
            return fast_generate_latest, content_type
        return encoder, content_type

    exposition.choose_encoder = choose_encoder


_SERIES_CACHE: dict = {}


def render_create_families(totals, host_mask) -> list[str]:
    """Sketch of a kvmtrace-owned renderer for the two per-series KVM_CREATE_VM
    families: each Series' sample-line prefix is built once and cached across
    scrapes (series identities are stable), so a scrape is one dict lookup, one
    add and one short f-string per series. Measures what such a renderer costs;
    profile_scrape.py checks its lines against prometheus_client's."""
    from collections import defaultdict

    from kvmtrace import attempts
    from kvmtrace import plan as planmod
    from prometheus_client.utils import floatToGoString

    def esc(v: str) -> str:
        return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')

    sums: dict = defaultdict(float)
    for s, n in totals.items():
        if s.probe != planmod.CREATE_VM or s.pid is not None:
            continue
        c = _SERIES_CACHE.get((s, host_mask))
        if c is None:
            base = (f'comm="{esc(s.comm)}",vm_type="{s.vm_type}",'
                    f'vm_type_name="{esc(s.vm_type_name)}"')
            att = (("kvmtrace_vm_create_attempts_total", s.comm, str(s.vm_type),
                    s.vm_type_name), f"kvmtrace_vm_create_attempts_total{{{base}}} ")
            rej = None
            if s.rejected:
                reason = attempts.classify(s.errno, s.vm_type, s.verdicts, host_mask).reason
                errno = s.errno or "none"
                rej = (("kvmtrace_vm_create_rejected_total", s.comm, str(s.vm_type),
                        s.vm_type_name, errno, reason),
                       f'kvmtrace_vm_create_rejected_total{{comm="{esc(s.comm)}",'
                       f'errno="{esc(errno)}",reason="{esc(reason)}",vm_type="{s.vm_type}",'
                       f'vm_type_name="{esc(s.vm_type_name)}"}} ')
            c = _SERIES_CACHE[(s, host_mask)] = (att, rej)
        sums[c[0]] += n
        if c[1]:
            sums[c[1]] += n
    return [prefix + floatToGoString(v) + "\n" for (_, prefix), v in sorted(sums.items())]
