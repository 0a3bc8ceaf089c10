"""Lines for a terminal or pipe that may stop reading, written without ever blocking.

`serve`'s live view must never hold up counting: if nobody reads its stdout (a pipe
whose reader stopped, a stuck terminal), lines are dropped and counted instead of
blocking the poll loop. A writer thread drains a bounded queue; when it is full, new
lines are dropped (kvmtrace_live_lines_dropped_total). The thread is a daemon: a
write that never returns cannot keep the process from exiting.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TextIO


class LineSink:
    def __init__(self, stream: TextIO, maxsize: int = 256):
        self._stream = stream
        self._queue: queue.Queue[str] = queue.Queue(maxsize)
        self.dropped = 0
        self._thread = threading.Thread(target=self._drain, name="live-view", daemon=True)
        self._thread.start()

    def write(self, text: str) -> None:
        """Queue ``text`` (a whole line or lines, without the final newline)."""
        try:
            self._queue.put_nowait(text)
        except queue.Full:
            self.dropped += text.count("\n") + 1

    def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the queued lines to be written."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _drain(self) -> None:
        while True:
            text = self._queue.get()
            try:
                self._stream.write(text + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # EPIPE, closed: drop the rest quietly
                self.dropped += text.count("\n") + 1
            finally:
                self._queue.task_done()
