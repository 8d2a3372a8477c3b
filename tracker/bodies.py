"""Reading request bodies: under a deadline, at a minimum rate, and only so many at once.

A body that trickles in (one byte every few seconds) would otherwise hold its connection,
a descriptor and a task for as long as the client likes; a thousand such requests need
no credentials (``POST /session`` reads its body to find the token) and exhaust the
file limit. :class:`BodyReads` bounds both:

* **time**: a body must be complete ``body_timeout_s`` after reading starts, plus one
  second per ``body_min_rate_bytes_s`` bytes received so far (a large upload at a decent
  rate finishes; a trickle is cut after ``body_timeout_s``): 408 ``request_timeout``.
* **count**: at most ``max_body_reads`` bodies are read at once; the next gets 503
  ``busy`` with ``Retry-After`` at once, instead of a slot it would hold.

Either way the response closes the connection (the rest of the body is never read).
Size stays Quart's ``MAX_CONTENT_LENGTH`` (413). Owns no tasks.
"""

from __future__ import annotations

from collections.abc import AsyncIterable

import trio
from quart import Request, g

from tracker.config import TrackerConfig
from tracker.errors import PayloadTooLarge, RequestTimeout, ServiceBusy, UnsupportedMediaType
from tracker.metrics import Metrics

__all__ = ["BodyReads", "json_body"]

BUSY_RETRY_AFTER_S = 1.0  # what a refused upload is told to wait


class BodyReads:
    """The request bodies being read now, each against its deadline."""

    def __init__(self, config: TrackerConfig, metrics: Metrics) -> None:
        self._limit = config.max_body_reads
        self._timeout_s = config.body_timeout_s
        self._min_rate = config.body_min_rate_bytes_s
        self._metrics = metrics
        self.reading = 0

    async def read(self, body: AsyncIterable[bytes], *, limit: int | None = None) -> bytes:
        """The whole body; 503 if too many are being read, 408 if it comes too slowly.

        ``limit``: 413 as soon as more bytes than this arrive (Quart's
        ``MAX_CONTENT_LENGTH`` applies to every body anyway).
        """
        if self.reading >= self._limit:
            self._metrics.bodies_refused += 1
            raise ServiceBusy(
                f"{self._limit} request bodies are being read already; retry shortly",
                retry_after_s=BUSY_RETRY_AFTER_S,
            )
        self.reading += 1
        try:
            return await self._read_in_time(body, limit)
        finally:
            self.reading -= 1

    async def _read_in_time(self, body: AsyncIterable[bytes], limit: int | None) -> bytes:
        received = bytearray()
        started = trio.current_time()
        with trio.CancelScope(deadline=started + self._timeout_s) as scope:
            async for chunk in body:
                received += chunk
                if limit is not None and len(received) > limit:
                    raise PayloadTooLarge(f"body is larger than {limit} bytes", limit=limit)
                scope.deadline = started + self._timeout_s + len(received) / self._min_rate
        if scope.cancelled_caught:
            self._metrics.bodies_timed_out += 1
            raise RequestTimeout(
                f"the request body did not arrive within {self._timeout_s:g} s "
                f"(at {self._min_rate} bytes/s or faster)",
                received=len(received),
            )
        return bytes(received)


async def json_body(reads: BodyReads, request: Request, *, limit: int, what: str) -> bytes:
    """A small JSON request body (an admin's ``POST /links``, ``PUT /meta``): 415 unless
    ``application/json``, 413 beyond ``limit`` bytes, read by ``reads``; marks it read."""
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(f"{what} takes application/json", allowed=["application/json"])
    if (request.content_length or 0) > limit:
        raise PayloadTooLarge(f"body is larger than {limit} bytes", limit=limit)
    body = await reads.read(request.body, limit=limit)
    g.body_read = True
    return body
