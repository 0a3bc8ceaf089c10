"""serve's live view: lines nobody reads are dropped and counted, never waited for."""

import os
import threading
import time

from kvmtrace.linesink import LineSink


def test_lines_reach_a_reader_in_order(tmp_path):
    with open(tmp_path / "out", "w") as f:
        sink = LineSink(f)
        for i in range(100):
            sink.write(f"line {i}")
        sink.flush(timeout=5)
    assert (tmp_path / "out").read_text().splitlines() == [f"line {i}" for i in range(100)]
    assert sink.dropped == 0


def test_a_pipe_nobody_reads_never_blocks_the_writer():
    r, w = os.pipe()
    out = os.fdopen(w, "w")
    sink = LineSink(out, maxsize=10)
    done = threading.Event()

    def write_many():
        for i in range(20_000):  # ~1.2 MB: far more than a pipe holds (64 KiB)
            sink.write(f"{i:08d} " + "x" * 50)
        done.set()

    t = threading.Thread(target=write_many, daemon=True)
    t.start()
    assert done.wait(timeout=30), "write() blocked on a pipe nobody reads"
    assert sink.dropped > 15_000  # all but what the pipe and the queue hold
    t0 = time.monotonic()
    sink.flush(timeout=0.2)  # the writer thread is stuck: flush gives up on time
    assert time.monotonic() - t0 < 5
    os.close(r)
