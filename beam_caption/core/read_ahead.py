"""Reading ahead of the caller: the elements of an iterator made by a thread, held up to a byte
bound, so that the slow start of the next unit (opening a shard on object storage) overlaps the
captioning of the current one (no Beam here).

The caller gets every element, in order, in its own thread (so it may update Beam metrics);
the reading thread holds at most ``limit_bytes`` of elements beyond the one being handed over
(an element's weight: its image bytes plus ELEMENT_OVERHEAD). An exception of the reading
thread is raised in the caller at the point it happened; a caller that stops early (closes the
generator) stops the reading thread at its next element.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator

ELEMENT_OVERHEAD = 1024  # bytes counted for an element's record besides its image bytes
JOIN_TIMEOUT_S = 5.0
_DONE = object()


def element_weight(element: dict) -> int:
    """The bytes an element is counted as holding: its carried image bytes and its record."""
    images = element.get("images")
    carried = sum(len(data) for data in images) if isinstance(images, list) else 0
    return carried + ELEMENT_OVERHEAD


class _Buffer:
    """Elements made ahead, their weight, and whether either side has stopped."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.items: collections.deque = collections.deque()
        self.held = 0
        self.closed = False  # the caller stopped: the reading thread stops too
        self.changed = threading.Condition()

    def put(self, item, weight: int) -> bool:
        """Add an item once it fits (one item always fits); False when the caller stopped."""
        with self.changed:
            self.changed.wait_for(lambda: self.closed or not self.items
                                  or self.held + weight <= self.limit)
            if self.closed:
                return False
            self.items.append((item, weight))
            self.held += weight
            self.changed.notify_all()
            return True

    def take(self):
        with self.changed:
            self.changed.wait_for(lambda: bool(self.items))
            item, weight = self.items.popleft()
            self.held -= weight
            self.changed.notify_all()
            return item

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()


def read_ahead(elements: Callable[[], Iterator[dict]], limit_bytes: int) -> Iterator[dict]:
    """The elements ``elements()`` makes, made by a reading thread up to ``limit_bytes`` ahead
    of the caller (see the module)."""
    buffer = _Buffer(limit_bytes)

    def read() -> None:
        try:
            for element in elements():
                if not buffer.put(element, element_weight(element)):
                    return
        except BaseException as exc:  # raised again in the caller
            buffer.put(_Raised(exc), 0)
            return
        buffer.put(_DONE, 0)

    reader = threading.Thread(target=read, name="beam_caption-read-ahead", daemon=True)
    reader.start()
    try:
        while (item := buffer.take()) is not _DONE:
            if isinstance(item, _Raised):
                raise item.exception
            yield item
    finally:
        buffer.close()
        reader.join(timeout=JOIN_TIMEOUT_S)  # a read under way ends by its own timeout


class _Raised:
    """An exception of the reading thread, on its way to the caller."""

    def __init__(self, exception: BaseException):
        self.exception = exception
