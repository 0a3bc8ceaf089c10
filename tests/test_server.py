"""The HTTP side's pieces that hold under load, without root: shared collections and
the request cap."""

import threading
import time

from kvmtrace.server import SingleFlight, limit_requests


def test_concurrent_calls_share_one_run():
    flights = SingleFlight()
    runs = []
    started = threading.Event()
    release = threading.Event()

    def collect():
        runs.append(1)
        started.set()
        release.wait(10)
        return b"body"

    results = []
    threads = [threading.Thread(target=lambda: results.append(flights.do("k", collect)))
               for _ in range(20)]
    threads[0].start()
    started.wait(10)
    for t in threads[1:]:
        t.start()
    time.sleep(0.2)  # the others are waiting for the first run, not running their own
    release.set()
    for t in threads:
        t.join(10)
    assert len(runs) == 1 and results == [b"body"] * 20
    assert flights.do("k", lambda: b"again") == b"again"  # a later call runs anew


def test_an_error_reaches_every_caller_of_the_run():
    flights = SingleFlight()

    def boom():
        raise OSError(9, "Bad file descriptor")

    for _ in range(2):
        try:
            flights.do("k", boom)
        except OSError as exc:
            assert exc.errno == 9
        else:
            raise AssertionError("no error")


def test_requests_past_the_cap_get_503_at_once():
    inside = threading.Event()
    release = threading.Event()

    def slow(environ, start_response):
        inside.set()
        release.wait(10)
        start_response("200 OK", [])
        return [b"ok"]

    app = limit_requests(slow, 1)
    statuses = []

    def call():
        app({}, lambda status, headers: statuses.append(status))

    t = threading.Thread(target=call)
    t.start()
    inside.wait(10)
    call()  # a second request while the first holds the only slot
    release.set()
    t.join(10)
    assert statuses == ["503 Service Unavailable", "200 OK"]
    assert limit_requests(slow, 0) is slow
