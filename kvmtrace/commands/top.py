"""``kvmtrace top``: a live table, one row per VM or workload (kvmtrace.top), refreshed
in place with curses, or printed once (``--once``) for scripts and ``watch``.

It reads a running exporter's /api/processes and /api/rejections (``--from URL``), or
attaches a session of its own (one loader, as `serve`): then its poll loop runs in a
thread of its own, so a terminal that is slow to draw never holds up the reading.
"""

from __future__ import annotations

import curses
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from kvmtrace import top as topmod
from kvmtrace.commands import common

FETCH_TIMEOUT = 5.0
Fetch = Callable[[], tuple[list[dict], list[dict]]]


def _from_url(url: str) -> Fetch:
    base = url.rstrip("/")

    def get(path: str) -> list[dict]:
        try:
            with urllib.request.urlopen(base + path, timeout=FETCH_TIMEOUT) as r:
                data = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise common.UserError(f"cannot read {base + path}: {reason}") from None
        if not isinstance(data, list):
            raise common.UserError(f"{base + path} is not a kvmtrace API (not a list)")
        return data

    return lambda: (get("/api/processes"), get("/api/rejections"))


def _own_session() -> tuple[Fetch, Callable[[], None]]:
    """A session of this process's own: its poll loop in a thread; (fetch, close)."""
    live = common.start(False)
    runner = threading.Thread(
        target=live.run, args=(100, lambda _a: None),
        kwargs={"tick": common.retirer(live), "drain": False}, daemon=True)
    runner.start()

    def fetch() -> tuple[list[dict], list[dict]]:
        starts = [s.to_json() for s in reversed(live.runtime.recent_starts)]
        return live.runtime.processes(), starts

    def close() -> None:
        live.stop.event.set()
        runner.join(timeout=5)
        live.close()

    return fetch, close


class Screen:
    """What the table shows: sort, filter, and the rates' last refresh."""

    def __init__(self, fetch: Fetch, source: str, sort: str = "f") -> None:
        self.fetch, self.source, self.sort, self.text = fetch, source, sort, ""
        self._before: dict[str, int] = {}
        self._at = 0.0
        self.error = ""

    def refresh(self) -> list[topmod.Row]:
        processes, rejections = self.fetch()
        now = time.monotonic()
        try:
            table = topmod.rows(processes, rejections)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise common.UserError(f"{self.source} answered rows that are not kvmtrace's "
                                   f"(not a kvmtrace API: {type(exc).__name__} {exc})") from None
        table = topmod.with_rates(table, self._before, now - self._at if self._at else 0.0)
        self._before, self._at = {r.key: r.rejected for r in table}, now
        return table

    def text_lines(self, table: list[topmod.Row], width: int) -> list[str]:
        head = topmod.status(self.sort, self.text, self.source)
        return [head[:width], *topmod.lines(table, self.sort, self.text, width)]


def _loop(stdscr, screen: Screen, interval: float) -> None:
    curses.curs_set(0)
    stdscr.timeout(int(interval * 1000))
    table = screen.refresh()
    while True:
        height, width = stdscr.getmaxyx()
        stdscr.erase()
        for y, line in enumerate(screen.text_lines(table, width - 1)[:height - 1]):
            stdscr.addstr(y, 0, line)
        if screen.error:
            stdscr.addstr(height - 1, 0, screen.error[:width - 1])
        stdscr.refresh()
        key = stdscr.getch()
        if key in (ord("q"), ord("Q"), 27):
            return
        if 0 <= key < 256 and chr(key) in topmod.SORTS:
            screen.sort = chr(key)
        elif key == ord("/"):
            curses.echo()
            stdscr.addstr(height - 1, 0, "filter: ".ljust(width - 1))
            screen.text = stdscr.getstr(height - 1, 8, 60).decode(errors="replace").strip()
            curses.noecho()
        if key == -1 or key == curses.KEY_RESIZE:
            try:
                table, screen.error = screen.refresh(), ""
            except common.UserError as exc:
                screen.error = str(exc)


def run(args) -> int:
    if args.source:
        fetch, close, source = _from_url(args.source), (lambda: None), args.source
    else:
        fetch, close = _own_session()
        source = "this session"
    try:
        screen = Screen(fetch, source, args.sort)
        screen.text = args.filter or ""
        if args.once:
            if not args.source:  # one interval of reading before the table
                print(f"top: attached; reading for {args.interval:g} s", file=sys.stderr,
                      flush=True)
                time.sleep(args.interval)
            for line in screen.text_lines(screen.refresh(), 10_000):
                print(line)
            return 0
        if not sys.stdout.isatty():
            raise common.UserError("top draws on a terminal: use --once for scripts")
        curses.wrapper(_loop, screen, args.interval)
        return 0
    finally:
        close()
