"""bench/overlay.py and bench/variants.py against the product's BPF C (pure, no compiler).

The benchmark's knobs are edits it applies to bpf/kvmtrace.bpf.c's text at bench time;
the product's C carries none. Every variant must apply to the current C and change it
exactly where its knobs say, and nothing else; an edit that no longer applies is one
clear line.
"""

from __future__ import annotations

import difflib
import importlib
import itertools
import re
import sys

import pytest

from kvmtrace import loader
from kvmtrace import plan as planmod
from kvmtrace.facts import HostFacts
from tests.conftest import HERE, KERNELS, with_follow_points

BENCH = HERE.parent / "bench"
C = loader.bpf_source()


def _bench(name: str):
    """A module of bench/ (they import each other by bare name, as bench/run.py runs)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


overlay = _bench("overlay")
variants = _bench("variants")

# What each knob takes away or swaps: (C function, text its body has only without it).
KNOB_EFFECTS = {
    "no_emit": ("ioctl_return", "emit_w(ctx, id, PROBE_CREATE_VM"),
    "no_latency": ("ioctl_return", "latency_record("),
    "no_count": ("ioctl_return", "count(tgid, PROBE_CREATE_VM"),
    "rb_wakeup": ("emit_x", "BPF_RB_NO_WAKEUP"),
    "percpu_latency": ("latency_record", "__sync_fetch_and_add"),
}


def body(text: str, function: str) -> str:
    """The body of the C function ``function`` (its definition up to the closing brace
    at column 0)."""
    m = re.search(rf"^static __always_inline \w+ {function}\(.*?^\}}$", text, re.M | re.S)
    assert m, f"{function} not found"
    return m.group(0)


def test_the_product_c_has_no_benchmark_knobs():
    assert "BENCH" not in C
    assert "bench overlay" not in C


def test_every_knob_is_some_variants_and_every_variants_knob_exists():
    used = {k for knobs in variants.VARIANTS.values() for k in knobs}
    assert used == set(overlay.KNOBS) == set(KNOB_EFFECTS)
    assert variants.VARIANTS["shipped"] == ()


def _spans(knobs: tuple[str, ...]) -> list[tuple[int, int, str]]:
    """(start, end, new) in the product's C of every edit of ``knobs``, by position."""
    spans = []
    for knob in knobs:
        for edit in overlay.KNOBS[knob]:
            assert C.count(edit.old) == 1, (knob, edit.old)
            start = C.index(edit.old)
            spans.append((start, start + len(edit.old), edit.new))
    spans.sort()
    for (_, end, _), (start, _, _) in itertools.pairwise(spans):
        assert end <= start, f"edits of {knobs} overlap"
    return spans


@pytest.mark.parametrize("name", sorted(variants.VARIANTS))
def test_every_variant_changes_the_c_exactly_where_its_knobs_say(name):
    knobs = variants.VARIANTS[name]
    text = variants.apply(name, C)
    # The product's C, with each edit's text replaced at its own place and nothing else.
    want, at = [], 0
    for start, end, new in _spans(knobs):
        want += [C[at:start], new]
        at = end
    assert text == "".join(want) + C[at:]
    # Line by line: removed lines are the edits' lines, added lines their replacements.
    diff = list(difflib.unified_diff(C.splitlines(), text.splitlines(), n=0, lineterm=""))
    removed = {ln[1:] for ln in diff if ln.startswith("-") and not ln.startswith("---")}
    added = {ln[1:] for ln in diff if ln.startswith("+") and not ln.startswith("+++")}
    old_lines, new_lines = set(), set()
    for start, end, new in _spans(knobs):  # the whole lines an edit touches
        first = C.rfind("\n", 0, start) + 1
        last = end if C[end - 1] == "\n" else C.index("\n", end)
        old_lines |= set(C[first:last].splitlines())
        new_lines |= set((C[first:start] + new + C[end:last]).splitlines())
    assert removed <= old_lines, removed - old_lines
    assert added <= new_lines, added - new_lines
    assert bool(diff) == bool(knobs)
    # And each knob does what it is for; the others' parts stay.
    for knob, (function, part) in KNOB_EFFECTS.items():
        assert part in body(C, function), (knob, function, part)
        assert (part in body(text, function)) == (knob not in knobs), (name, knob)


@pytest.mark.parametrize("name", sorted(variants.VARIANTS))
def test_every_variant_applies_to_the_text_bpfload_builds(name):
    """bpfload.py applies a variant to `kvmtrace trace --ebpf`'s text (defines + C + FN_*
    lines): only the C between them changes."""
    plan = planmod.make_plan(with_follow_points(HostFacts.load(
        KERNELS / "seed-tdx-v12-kprobes.json")))
    head, tail = loader.build_text(plan, loader.Options()).split(C)
    assert variants.apply(name, head + C + tail) == head + variants.apply(name, C) + tail


def test_an_edit_that_no_longer_applies_is_one_line_naming_the_knob():
    edit = overlay.KNOBS["no_latency"][0]
    for changed, says in ((C.replace(edit.old, ""), "is not in"),
                          (C.replace(edit.old, edit.old * 2), "is 2 times in")):
        with pytest.raises(overlay.OverlayError) as exc:
            variants.apply("bookkeeping", changed)
        msg = str(exc.value)
        assert "\n" not in msg and "'no_latency'" in msg and says in msg, msg
        assert "bpf/kvmtrace.bpf.c" in msg and "bench/overlay.py" in msg, msg
    with pytest.raises(overlay.OverlayError, match="no knob 'nope'"):
        overlay.apply(("nope",), C)


def test_the_harness_checks_every_variant_before_it_runs(monkeypatch):
    configs = _bench("configs")
    monkeypatch.setattr(sys, "path", list(sys.path))  # variant_names() adds bench/
    assert configs.variant_names() == set(variants.VARIANTS)
    stale = overlay.Edit("\t\tlatency_record(ret < 0, elapsed);\n", "")
    monkeypatch.setitem(overlay.KNOBS, "no_latency", (stale,))
    with pytest.raises(configs.BenchError) as exc:
        configs.variant_names()
    assert "\n" not in str(exc.value) and "'no_latency' no longer applies" in str(exc.value)
