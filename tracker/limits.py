"""Limits that free up with time: open feeds per token and per address, ingest rate per key.

Both answer 429 with a JSON body and ``Retry-After`` (see ``errors.TooManyRequests``).
Synchronous and task-free: a limit is checked where the request is handled.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from tracker.errors import TooManyRequests

__all__ = ["IngestRate", "SlotGroup", "StreamSlot", "StreamSlots", "held_while_streaming"]


class SlotGroup(Protocol):
    """Where slots are counted: a ``weakref.WeakSet`` of them, or a bare count."""

    def add(self, slot: StreamSlot, /) -> None:
        """Count ``slot`` in (once per slot)."""

    def discard(self, slot: StreamSlot, /) -> None:
        """Count ``slot`` out (once per slot, after :meth:`add`)."""

    def __len__(self) -> int:
        """Slots counted now."""


class StreamSlot:
    """One open feed's place in the per-token and per-address counts.

    Released explicitly when the feed ends, or when it is dropped unreleased (a slot whose
    response was dropped before it ever started streaming is released all the same).
    """

    __slots__ = ("__weakref__", "_groups")

    def __init__(self, groups: Sequence[SlotGroup]) -> None:
        self._groups = tuple(groups)
        for group in groups:
            group.add(self)

    def release(self) -> None:
        """Give the place back (idempotent)."""
        for group in self._groups:
            group.discard(self)
        self._groups = ()

    def __del__(self) -> None:
        self.release()


class _Count:
    """How many slots of one token or address are open: a number, not a set of them
    (a ``WeakSet`` per token cost every tracking link, one token each, about 1 KiB)."""

    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open = 0

    def add(self, slot: StreamSlot, /) -> None:
        self._open += 1

    def discard(self, slot: StreamSlot, /) -> None:
        self._open -= 1

    def __len__(self) -> int:
        return self._open


class StreamSlots:
    """Counts open feeds per token and per client address, and refuses the one too many."""

    def __init__(self, *, per_token: int, per_address: int, retry_after_s: float) -> None:
        self._limits = {"token": per_token, "address": per_address}
        self._retry_after_s = retry_after_s
        self._open: dict[tuple[str, str], _Count] = {}

    def acquire(self, *, token: str | None, address: str) -> StreamSlot:
        """A slot for a new feed, or 429 if the token or the address has too many open."""
        groups: list[SlotGroup] = []
        for kind, who in (("token", token), ("address", address)):
            limit = self._limits[kind]
            if who is None or not limit:
                continue
            group = self._open.get((kind, who))
            if group is None:
                group = self._open[kind, who] = _Count()
            if len(group) >= limit:
                raise TooManyRequests(
                    f"this {kind} already holds {limit} open feeds, the most allowed; close "
                    "one (or share one connection between tabs) and retry",
                    retry_after_s=self._retry_after_s,
                    limit=limit,
                )
            groups.append(group)
        self._forget_empty()
        return StreamSlot(groups)

    def _forget_empty(self) -> None:
        if len(self._open) > 1024:
            for key in [key for key, group in self._open.items() if not group]:
                del self._open[key]


async def held_while_streaming(
    stream: AsyncIterator[bytes], slot: StreamSlot
) -> AsyncIterator[bytes]:
    """``stream``, releasing ``slot`` as soon as it ends, however it ends."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        slot.release()


class IngestRate:
    """A token bucket per key: ``rate`` pings per second, one second of burst.

    Keys are ingest keys, or devices (``what`` names them in the refusal).
    """

    def __init__(
        self, rate: float, clock: Callable[[], float] = time.monotonic, *, what: str = "ingest key"
    ) -> None:
        self._rate = rate
        self._what = what
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def admit(self, key: str, pings: int) -> None:
        """Take ``pings`` from ``key``'s bucket, or 429 saying when they would fit."""
        if not self._rate:
            return
        now = self._clock()
        tokens, at = self._buckets.get(key, (self._rate, now))
        tokens = min(self._rate, tokens + (now - at) * self._rate)
        needed = min(pings, self._rate)  # a batch bigger than the burst passes when full
        if tokens < needed:
            self._buckets[key] = (tokens, now)
            raise TooManyRequests(
                f"this {self._what} may post {self._rate:g} pings per second; slow down",
                retry_after_s=(needed - tokens) / self._rate,
                limit_per_s=self._rate,
            )
        self._buckets[key] = (tokens - pings, now)
