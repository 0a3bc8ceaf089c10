"""The fast /metrics renderer: the per-series families' text, learned from prometheus_client.

At 10,000 series prometheus_client's encoders take ~277 ms per scrape; this takes
~18 ms (bench/, scale phase) by keeping each sample's rendered line and re-rendering
only its value when that changes. The formats themselves (names, label order,
HELP/TYPE lines, escaping) are never written here: they are learned from the
library's own output for the negotiated format (an empty family, one with marker
label values, one with values that need escaping, checked against the template), so
the two paths cannot drift; tests/test_render.py checks them byte for byte.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

VALUE_TEXTS_MAX = 4096  # memoized value texts before the memo is cleared
FORMATS_MAX = 16  # learned formats (per content type) before they are forgotten


class FixedFamilies:
    """A collector over fixed families: prometheus_client encoders take a collector."""

    def __init__(self, families: Iterable[Metric]):
        self._families = list(families)

    def collect(self) -> list[Metric]:
        return self._families


@dataclass(frozen=True)
class Format:
    """One exposition format's text for the per-series families, learned from the
    prometheus_client encoder: per family, the HELP/TYPE block and the sample-line
    template."""

    headers: tuple[bytes, ...]
    templates: tuple[Template, ...]


def escape_values(values: tuple[str, ...]) -> tuple[str, ...]:
    # Label values as prometheus_client escapes them in both formats.
    return tuple(v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
                 for v in values)


class Template:
    """A family's sample line up to its value, learned from the library's output:
    ``literal`` with a %s per label, filled with the escaped label values picked in
    the library's label order; ``tid`` identifies it across formats."""

    def __init__(self, tid: int, literal: str, index: list[int]):
        self.tid = tid
        self.literal = literal
        # The labels as they are when the library's order is the family's (no copy).
        self._pick = None if index == list(range(len(index))) and len(index) > 1 else (
            operator.itemgetter(*index))
        self._single = len(index) == 1

    def prefixes(self, labels: Iterable[tuple[str, ...]]) -> list[bytes]:
        """The line prefixes of samples with these labels (in family order)."""
        # A str each when there is one label, else a tuple.
        values = list(labels) if self._pick is None else list(map(self._pick, labels))
        flat = "".join(values if self._single else map("".join, values))
        if "\\" in flat or "\n" in flat or '"' in flat:
            values = [escape_values((v,) if self._single else v) for v in values]
            if self._single:
                values = [v[0] for v in values]
        return list(map(str.encode, map(self.literal.__mod__, values)))


class Renderer:
    """Renders the per-series families' samples in a learned format.

    ``families()`` gives the per-series families, empty, in exposition order, with
    ``labelnames`` (one tuple per family). The
    samples are the collector's columns (``labels``, and the line cache ``line``,
    ``line_value``, ``plen``, ``tid`` this extends and fills) with their totals. Not thread
    safe: the collector calls it under its lock."""

    def __init__(self, families: Callable[[], list[CounterMetricFamily]],
                 labelnames: tuple[tuple[str, ...], ...]):
        self._families = families
        self._labelnames = labelnames  # of each family, in order
        self._formats: dict[str, Format | None] = {}
        self._templates: dict[tuple[str, ...], int] = {}
        self._value_texts: dict[int | float, bytes] = {}

    def format(self, encoder: Callable[[Collector], bytes], content_type: str
               ) -> Format | None:
        """The format ``encoder`` writes (learned once per content type), or None when
        its output does not have the shape this renders."""
        fmt = self._formats.get(content_type, False)
        if fmt is False:
            fmt = self._learn(encoder)
            if len(self._formats) >= FORMATS_MAX:
                self._formats.clear()
            self._formats[content_type] = fmt
        return fmt

    def samples(self, fmt: Format, sm, value: list[int], order: list[list[int]]
                ) -> list[bytes]:
        """Per family in ``order`` (sample ids, sorted): its header, then its lines."""
        parts: list[bytes] = []
        sm.grow_lines()
        labels, line, line_value, plen, tids = sm.labels, sm.line, sm.line_value, sm.plen, sm.tid
        texts = self._value_texts
        for header, template, ids in zip(fmt.headers, fmt.templates, order, strict=True):
            parts.append(header)
            tid = template.tid
            new = [i for i in ids if tids[i] != tid]  # no line yet (or another format's)
            if new:
                for i, prefix in zip(new, template.prefixes(map(labels.__getitem__, new)),
                                     strict=True):
                    n = value[i]
                    line[i] = prefix + (texts.get(n) or self._value_text(n))
                    plen[i], tids[i], line_value[i] = len(prefix), tid, n
            for i in ids:
                n = value[i]
                if line_value[i] != n:  # the value changed: the same prefix, a new value
                    line[i] = line[i][:plen[i]] + (texts.get(n) or self._value_text(n))
                    line_value[i] = n
                parts.append(line[i])
        return parts

    def _value_text(self, n: int) -> bytes:
        """A sample value as the library writes it, with the newline (memoized)."""
        texts = self._value_texts
        if len(texts) >= VALUE_TEXTS_MAX:
            texts.clear()
        text = texts[n] = f"{floatToGoString(n)}\n".encode()
        return text

    def _learn(self, encoder: Callable[[Collector], bytes]) -> Format | None:
        """Headers and sample-line templates of the per-series families, from what
        ``encoder`` makes of them: empty, with one sample whose label values are
        markers, and with one whose values need escaping (checked against the
        template). None when its output does not have the expected shape."""

        def render(family: Metric | None = None) -> str:
            return encoder(FixedFamilies([family] if family else [])).decode("utf-8")

        try:
            end = render()  # "# EOF\n" in OpenMetrics, nothing in the text format
            headers, templates = [], []
            for f, names in enumerate(self._labelnames):
                empty = render(self._families()[f])
                header = empty[:len(empty) - len(end)]
                marked = self._families()[f]
                marked.add_metric([f"\0{i}\0" for i in range(len(names))], 0.0)
                one = render(marked)
                line = one[len(header):len(one) - len(end)]
                if (not empty.endswith(end) or not one.startswith(header)
                        or not one.endswith(end) or not line.endswith(" 0.0\n")
                        or line.count("\0") != 2 * len(names) or "\n" in line[:-1]):
                    return None
                # 'name{a="\0i\0",...} 0.0\n' → 'name{a="%s",...} ' and the label order.
                pieces = line[:-len("0.0\n")].split("\0")
                literal = "%s".join(p.replace("%", "%%") for p in pieces[0::2])
                index = [int(i) for i in pieces[1::2]]
                if sorted(index) != list(range(len(names))):
                    return None
                template = Template(self._template_id(tuple(pieces)), literal, index)
                odd = self._families()[f]
                labels = tuple(f'{i}\\"\n\\n\x7fé' for i in range(len(names)))
                odd.add_metric(list(labels), 3.0)
                if render(odd).encode() != (header.encode() + template.prefixes([labels])[0]
                                            + b"3.0\n" + end.encode()):
                    return None
                headers.append(header.encode())
                templates.append(template)
        except Exception:  # an encoder this does not know: the library renders instead
            return None
        return Format(tuple(headers), tuple(templates))

    def _template_id(self, pieces: tuple[str, ...]) -> int:
        """Formats with the same sample lines share rendered lines. Caller holds _lock."""
        return self._templates.setdefault(pieces, len(self._templates))
