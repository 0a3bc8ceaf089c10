"""Run the kvmtrace CLI with proposed changes applied in-process (bench/proposals.py).

    serve_variant.py [--bpf VARIANT] [--trim] [--fast-scrape] -- serve ARGS...

--bpf VARIANT   compile kvmtrace's BPF text with the bench/variants.py edit VARIANT
                (and drain the ring buffer after every poll wait, for NO_WAKEUP)
--trim          after loading: malloc_trim + MADV_PAGEOUT of the LLVM/clang pages
--fast-scrape   memoized classify() and a faster text exposition for /metrics

Nothing under kvmtrace/ or bpf/ is modified: the measured code is the shipped
code plus exactly these patches. Used by `bench/run.py --variants serve:...`
and `--proposed`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bpf")
    ap.add_argument("--trim", action="store_true")
    ap.add_argument("--fast-scrape", action="store_true")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest

    import proposals

    if args.bpf:
        proposals.bpf_variant(args.bpf)
        proposals.consume_after_poll()
    if args.trim:
        proposals.trim_after_load()
    if args.fast_scrape:
        proposals.fast_scrape()
    from kvmtrace import cli

    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
