"""The Redis bus's decisions, apart from its sockets: pure code, tested without Redis.

What :class:`tracker.bus.RedisBus` decides before and after each Redis call lives here:
which shard a ping goes to and which old shard must hear that it left
(:func:`plan_publish`), which shards to (un)subscribe (:class:`Watchers`), how long to wait
before retrying (:class:`Backoff`), whether Redis is up (:class:`Link`), which vehicles to
publish again after an outage (:class:`LatestPings`), and whether a ping that came
through Redis may enter the index (:func:`accept_bus_ping`).

Owns no tasks, does no I/O and reads no clock: callers pass the time in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Final, Literal

import h3.api.basic_int as h3i

from tracker.config import TrackerConfig
from tracker.ingest import check_ping
from tracker.pings import Ping
from tracker.wire import BusPing

__all__ = [
    "CONNECTED",
    "DEGRADED",
    "Backoff",
    "BusState",
    "LatestPings",
    "Link",
    "PublishPlan",
    "Watchers",
    "accept_bus_ping",
    "plan_publish",
    "republish_args",
    "shard_of",
    "shards_of",
    "to_bus_ping",
]

BusState = Literal["connected", "degraded"]
CONNECTED: Final[BusState] = "connected"
"""Redis answered the last call made to it."""
DEGRADED: Final[BusState] = "degraded"
"""Redis refused, broke or did not answer a call within ``bus_timeout_s``: the instance
serves what it has, and pings are not forwarded until Redis answers again."""

_vehicle_id = attrgetter("vehicle_id")

BACKOFF_FIRST_S: Final = 0.1
BACKOFF_MAX_S: Final = 5.0


# --- shards ---------------------------------------------------------------------------------


def shard_of(lat: float, lon: float, *, index_resolution: int, resolution: int) -> int:
    """The shard (coarse H3 cell) a position belongs to: the parent of its index cell.

    Not the coarse cell the point lies in: H3 children do not tile their parent exactly,
    so for about 6% of positions the two differ, and a feed subscribes to the parents of
    the cells it watches (:func:`shards_of`).
    """
    cell = h3i.latlng_to_cell(lat, lon, index_resolution)
    shard: int = h3i.cell_to_parent(cell, resolution)
    return shard


def shards_of(cells: Iterable[int], resolution: int) -> set[int]:
    """The shards covering index cells (each cell lies in exactly one)."""
    return {h3i.cell_to_parent(cell, resolution) for cell in cells}


def to_bus_ping(ping: Ping) -> BusPing:
    """A ping accepted here, as the bus carries it."""
    return BusPing(ping.vehicle_id, ping.lat, ping.lon, ping.ts, ping.speed, ping.heading)


def accept_bus_ping(ping: BusPing, now: float, config: TrackerConfig) -> Ping | None:
    """The ping as the index takes it, or None if ``/ingest`` would have rejected it.

    Whatever comes through Redis (another instance's message, a state entry, or anything a
    stranger with access to Redis wrote) passes the same checks as ``/ingest`` input, so a
    NaN or an out-of-range value can never reach the index and the tick.
    """
    candidate = Ping(
        vehicle_id=ping.vehicle_id,
        lat=ping.lat,
        lon=ping.lon,
        ts=ping.ts,
        speed=ping.speed,
        heading=ping.heading,
    )
    return None if check_ping(candidate, now, config) is not None else candidate


@dataclass
class PublishPlan:
    """What one batch of pings becomes in Redis."""

    channels: dict[int, list[BusPing]] = field(default_factory=dict)
    """Shard -> pings to publish on its channel (the shard it is in, and the one it left)."""
    states: dict[int, dict[str, BusPing]] = field(default_factory=dict)
    """Shard -> vehicle -> latest ping, for the shard's state hash."""
    left: dict[int, list[str]] = field(default_factory=dict)
    """Shard -> vehicles to delete from its state hash (they are in another shard now)."""
    now_at: dict[str, int] = field(default_factory=dict)
    """Vehicle -> shard it is in now (``trk:where``)."""


def plan_publish(
    pings: Sequence[BusPing], was: Sequence[int | None], shard: Callable[[BusPing], int]
) -> PublishPlan:
    """Group a batch by shard; ``was[i]`` is where Redis last saw ``pings[i]``'s vehicle.

    A vehicle that changed shard is also published on its old shard's channel (instances
    watching only that shard see it leave) and deleted from the old shard's state.
    """
    plan = PublishPlan()
    for ping, before in zip(pings, was, strict=True):
        here = shard(ping)
        plan.channels.setdefault(here, []).append(ping)
        plan.states.setdefault(here, {})[ping.vehicle_id] = ping
        plan.now_at[ping.vehicle_id] = here
        if before is not None and before != here:
            plan.channels.setdefault(before, []).append(ping)
            plan.left.setdefault(before, []).append(ping.vehicle_id)
    return plan


def republish_args(
    pings: Sequence[BusPing],
    was: Sequence[int | None],
    shard: Callable[[BusPing], int],
    encode: Callable[[BusPing], bytes],
) -> list[str | bytes | float]:
    """Arguments of the compare-and-set script (``tracker.bus``), 7 per vehicle.

    vehicle id, new shard (decimal, as ``trk:where`` stores it) and its hex (as state keys
    name it), the shard Redis had (decimal, "" if none) and its hex, ``ts``, the packed ping.
    """
    args: list[str | bytes | float] = []
    for ping, before in zip(pings, was, strict=True):
        here = shard(ping)
        args += [ping.vehicle_id, str(here), f"{here:x}"]
        args += ["", ""] if before is None else [str(before), f"{before:x}"]
        args += [repr(ping.ts), encode(ping)]
    return args


# --- watching -------------------------------------------------------------------------------


class Watchers:
    """How many feeds here watch each shard, and which shards to (un)subscribe.

    A shard is subscribed when its first watcher comes and unsubscribed once its last one
    has gone, unless a watcher came back before the unsubscription was sent.
    """

    def __init__(self) -> None:
        self._count: dict[int, int] = {}
        self._leaving: set[int] = set()

    def watch(self, shards: Iterable[int]) -> list[int]:
        """Count one more watcher of each shard; the shards nobody watched before."""
        new = []
        for shard in shards:
            if not self._count.get(shard):
                new.append(shard)
            self._count[shard] = self._count.get(shard, 0) + 1
            self._leaving.discard(shard)
        return new

    def unwatch(self, shards: Iterable[int]) -> list[int]:
        """Count one watcher less of each shard; the shards nobody watches any more."""
        gone = []
        for shard in shards:
            left = self._count.get(shard, 0) - 1
            if left > 0:
                self._count[shard] = left
            else:
                self._count.pop(shard, None)
                self._leaving.add(shard)
                gone.append(shard)
        return gone

    def take_leaving(self) -> list[int]:
        """Shards to unsubscribe from now (unwatched and not watched again since)."""
        leaving = [shard for shard in self._leaving if shard not in self._count]
        self._leaving.clear()
        return leaving

    @property
    def watched(self) -> list[int]:
        """Every shard with a watcher here."""
        return list(self._count)

    def __contains__(self, shard: object) -> bool:
        return shard in self._count


# --- retrying and outages -------------------------------------------------------------------


class Backoff:
    """Delays before retrying: 0.1 s doubling to 5 s; back to 0.1 s after a success."""

    def __init__(self, first_s: float = BACKOFF_FIRST_S, max_s: float = BACKOFF_MAX_S) -> None:
        self._first = first_s
        self._max = max_s
        self._delay = first_s

    def next(self) -> float:
        """The delay before the next attempt."""
        delay = self._delay
        self._delay = min(self._max, self._delay * 2)
        return delay

    def reset(self) -> None:
        """A call succeeded: the next failure starts from the first delay again."""
        self._delay = self._first


class Link:
    """Whether Redis answers: only transitions matter (the caller logs and resyncs on them).

    Every Redis call reports its outcome; :attr:`outages` lets a task that began before
    the current outage know that it has missed it.
    """

    def __init__(self) -> None:
        self.state: BusState = CONNECTED
        self.outages = 0
        """Outages so far."""

    def down(self) -> bool:
        """A call failed; True if this starts an outage."""
        if self.state == DEGRADED:
            return False
        self.state = DEGRADED
        self.outages += 1
        return True

    def up(self) -> bool:
        """A call succeeded; True if this ends an outage."""
        if self.state == CONNECTED:
            return False
        self.state = CONNECTED
        return True


class LatestPings:
    """The latest ping of every vehicle this instance holds, to publish again after an outage.

    One entry per vehicle (bounded by the fleet); entries older than the removal horizon
    are pruned, as the index removes those vehicles too. Holds the :class:`Ping` objects
    the index holds (no copies, no conversion on ingest).
    """

    def __init__(self) -> None:
        self._by_id: dict[str, Ping] = {}

    def taken(self, pings: Sequence[Ping]) -> None:
        """Pings the index has just accepted, in order.

        The index accepts only a ping newer than its vehicle's last one, so each of these
        is its vehicle's newest: stored without comparing (a C-level dict update, a few
        ms for a 50,000-ping batch on the ingest path).
        """
        self._by_id.update(zip(map(_vehicle_id, pings), pings, strict=False))

    def prune(self, horizon: float) -> int:
        """Forget vehicles silent since before ``horizon``; how many were forgotten."""
        silent = [vid for vid, ping in self._by_id.items() if ping.ts < horizon]
        for vid in silent:
            del self._by_id[vid]
        return len(silent)

    def chunks(self, size: int) -> Iterator[list[Ping]]:
        """Everything held now, ``size`` vehicles at a time (a copy: safe across awaits)."""
        held = list(self._by_id.values())
        for start in range(0, len(held), size):
            yield held[start : start + size]

    def __len__(self) -> int:
        return len(self._by_id)
