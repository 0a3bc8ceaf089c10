"""glibc's malloc, tuned for a long-running exporter (measured in bench/, scale phase)."""

from __future__ import annotations

import contextlib
import ctypes


class Allocator:
    """By default glibc raises its mmap and trim thresholds after a large block is freed,
    so from the second scrape on a 2.4 MB /metrics body (10,000 series) is carved from
    the heap and its pages stay resident when freed. Fixed thresholds keep such blocks
    in their own mappings, returned when freed; ``trim()`` after a retirement pass gives
    back what the folded records left free in the heap. No-ops where there is no glibc."""

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    THRESHOLD = 256 * 1024

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None)
        with contextlib.suppress(AttributeError):
            self._libc.mallopt(self.M_MMAP_THRESHOLD, self.THRESHOLD)
            self._libc.mallopt(self.M_TRIM_THRESHOLD, self.THRESHOLD)

    def trim(self) -> None:
        with contextlib.suppress(AttributeError):
            self._libc.malloc_trim(0)
