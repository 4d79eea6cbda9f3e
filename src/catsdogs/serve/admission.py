"""Admission by images and by bytes: what one worker holds for the requests it has accepted.

A request reserves its upload bytes before its body is read (the declared ``Content-Length``, or
chunk by chunk as it arrives) and its images once they are parsed. The reservation is held by the
request and by every pool job working for it, and returned only when the last of them is done: a
request answered 504 while its decode still runs keeps its bytes counted until the decode ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from catsdogs.serve.errors import ApiError

logger = logging.getLogger(__name__)


def overloaded(detail: str) -> ApiError:
    return ApiError(503, "overloaded", f"{detail}; retry in a second", headers={"Retry-After": "1"})


class Admission:
    """The worker's budget: at most ``max_images`` images and ``max_bytes`` upload bytes at once."""

    def __init__(
        self,
        *,
        max_images: int,
        max_bytes: int,
        on_change: Callable[[int, int], None],
        on_refuse: Callable[[], None],
    ) -> None:
        self.max_images = max_images
        self.max_bytes = max_bytes
        self.images = 0
        self.bytes = 0
        self._on_change = on_change  # (images, bytes), after every change, under the lock
        self._on_refuse = on_refuse  # a 503
        self._lock = threading.Lock()  # pool threads return reservations too

    def ticket(self, nbytes: int = 0) -> Ticket:
        """A reservation of ``nbytes`` (none yet for an unknown length); raises 413/503 if it cannot fit."""
        ticket = Ticket(self)
        ticket.reserve_bytes(nbytes)
        return ticket

    def _take(self, images: int, nbytes: int) -> None:
        with self._lock:
            if self.bytes + nbytes > self.max_bytes:
                refusal = overloaded(f"{self.bytes} upload bytes are in flight")
            elif self.images + images > self.max_images:
                refusal = overloaded(f"{self.images} images are queued")
            else:
                refusal = None
                self.images += images
                self.bytes += nbytes
                self._on_change(self.images, self.bytes)  # under the lock: gauges never go stale
        if refusal is not None:
            self._on_refuse()
            raise refusal

    def _give_back(self, images: int, nbytes: int) -> None:
        with self._lock:
            self.images -= images
            self.bytes -= nbytes
            self._on_change(self.images, self.bytes)


class Ticket:
    """One request's reservation; a context manager for the request, :meth:`hold`/:meth:`drop` for jobs."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.images = 0
        self.nbytes = 0
        self._holders = 1  # the request itself
        self._lock = threading.Lock()

    def reserve_bytes(self, total: int) -> None:
        """Grow the byte reservation to ``total`` (a no-op when already that large)."""
        if total > self._admission.max_bytes:
            raise ApiError(
                413,
                "upload_too_large",
                f"the request is {total} bytes, over this service's in-flight limit of "
                f"{self._admission.max_bytes} bytes; send fewer or smaller images per request",
            )
        if total > self.nbytes:
            self._admission._take(0, total - self.nbytes)
            self.nbytes = total

    def reserve_images(self, count: int) -> None:
        self._admission._take(count, 0)
        self.images += count

    def hold(self) -> None:
        """A job starts working for the request: the reservation stays until it calls :meth:`drop`."""
        with self._lock:
            self._holders += 1

    def drop(self, *_: object) -> None:
        """The request or one of its jobs is done; the last one returns the reservation."""
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self._admission._give_back(self.images, self.nbytes)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *_: object) -> None:
        self.drop()
