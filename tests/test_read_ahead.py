"""core/read_ahead.py: every element in order in the caller's thread, at most the byte bound
made ahead, the reading thread's exception raised where it happened, an early stop stopping
the reader."""

from __future__ import annotations

import threading
import time

import pytest

from beam_caption.core.read_ahead import ELEMENT_OVERHEAD, element_weight, read_ahead


def test_every_element_comes_in_order_in_the_callers_thread():
    threads = set()

    def made():
        for i in range(500):
            yield {"key": str(i), "images": [bytes(i % 7)]}

    got = []
    for element in read_ahead(made, 10 * ELEMENT_OVERHEAD):
        threads.add(threading.get_ident())
        got.append(element["key"])
    assert got == [str(i) for i in range(500)] and threads == {threading.get_ident()}


def test_the_reader_holds_at_most_the_bound_ahead():
    made_count = 0
    image = bytes(10_000)
    weight = element_weight({"images": [image]})

    def made():
        nonlocal made_count
        for i in range(100):
            made_count += 1
            yield {"key": i, "images": [image]}

    ahead = []
    for element in read_ahead(made, 3 * weight):
        time.sleep(0.002)  # the reader has time to fill the buffer
        ahead.append(made_count - element["key"] - 1)  # made, not yet handed over
    assert max(ahead) <= 3 + 1  # the bound, and the one being put when the bound allows it
    assert max(ahead) >= 2  # it did read ahead
    assert element_weight({"record": {}}) == ELEMENT_OVERHEAD


def test_an_element_over_the_bound_still_passes_alone():
    big = {"images": [bytes(1 << 20)]}
    assert list(read_ahead(lambda: iter([big, big]), 1)) == [big, big]


def test_the_readers_exception_is_raised_after_the_elements_before_it():
    def made():
        yield {"key": 1}
        raise OSError("the store went away")

    got = []
    with pytest.raises(OSError, match="went away"):
        for element in read_ahead(made, 1 << 20):
            got.append(element["key"])
    assert got == [1]


def test_a_caller_that_stops_early_stops_the_reader():
    stopped = threading.Event()

    def made():
        try:
            for i in range(10**9):
                yield {"key": i}
        finally:
            stopped.set()

    elements = read_ahead(made, 4 * ELEMENT_OVERHEAD)
    assert [next(elements)["key"] for _ in range(3)] == [0, 1, 2]
    elements.close()
    assert stopped.wait(5)
