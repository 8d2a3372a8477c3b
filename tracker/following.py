"""Following vehicles across instances: the Redis bus watches the shard each followed
vehicle is in, and moves with it.

On one instance a vehicle feed needs nothing: every vehicle is in the index. On a Redis
bus an instance holds only the vehicles of the shards its feeds watch, so a feed that
follows a vehicle (``/feed?vehicles=``, a tracking link) must make the bus watch the
vehicle's shard, wherever the vehicle is ingested, and the next shard when it moves
there. :class:`Follower` does it:

* before a vehicle feed subscribes, :meth:`Follower.opening` asks Redis where its
  vehicles are (``trk:where``) and watches those shards, so the first snapshot has them;
* every tick, :meth:`Follower.step` compares the shard of each followed vehicle (from
  the index; from Redis for one not known here) with the shard watched for it, and moves
  the watch. A vehicle that changes shard is also published to its old shard (the bus
  does so), so this instance sees the move that tells it where to look next.

The shards are watched through ``Bus.watch`` with one index cell of each, so that feeds
and followed vehicles share the bus's per-shard counts. Owns no tasks of its own:
:meth:`run` is started by ``Tracker.run`` (only with a Redis bus).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager

import h3.api.basic_int as h3i
import trio

from tracker.bus import Bus
from tracker.geoindex import GeoIndex

__all__ = ["Follower"]

logger = logging.getLogger(__name__)

MAX_ASKED = 1000
"""Vehicles asked of Redis per step (the rest on the next ticks)."""


class Follower:
    """Keeps the bus watching the shard of every followed vehicle (see the module doc)."""

    def __init__(
        self,
        bus: Bus,
        index: GeoIndex,
        *,
        followed: Callable[[], Iterable[str]],
        shard_resolution: int,
        next_tick: Callable[[], Awaitable[None]],
    ) -> None:
        self._bus = bus
        self._index = index
        self._followed = followed
        self._resolution = shard_resolution
        self._next_tick = next_tick
        self._watching: dict[str, int] = {}  # wire id -> the index cell watched for it
        self._opening: dict[str, int] = {}  # wire id -> feeds about to follow it
        self._lock = trio.Lock()  # one move at a time: watches are counted

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Step once per tick until cancelled."""
        task_status.started()
        while True:
            await self._next_tick()
            await self.step()

    @asynccontextmanager
    async def opening(self, vehicles: frozenset[str]) -> AsyncIterator[None]:
        """Watch the shards of ``vehicles`` now, and keep them while the block subscribes a
        feed to them (then the feed keeps them followed)."""
        for name in vehicles:
            self._opening[name] = self._opening.get(name, 0) + 1
        try:
            async with self._lock:
                await self._move({**self._watching, **await self._where(vehicles)})
            yield
        finally:
            for name in vehicles:
                self._opening[name] -= 1
                if not self._opening[name]:
                    del self._opening[name]

    async def step(self) -> None:
        """Move every watch to the shard its vehicle is in now; drop unfollowed ones."""
        async with self._lock:
            await self._step()

    async def _step(self) -> None:
        followed = set(self._followed()) | self._opening.keys()
        wanted = {name: cell for name, cell in self._watching.items() if name in followed}
        unknown = []
        for name in followed:
            vehicle = self._index.vehicle(name)
            if vehicle is not None and vehicle.cell:
                wanted[name] = vehicle.cell
            elif name not in self._watching:
                unknown.append(name)
        wanted.update(await self._where(unknown[:MAX_ASKED]))
        await self._move(wanted)

    async def _where(self, vehicles: Iterable[str]) -> dict[str, int]:
        """An index cell in the shard Redis last saw each vehicle in (unknown: left out)."""
        names = list(vehicles)
        shards = await self._bus.where(names) if names else []
        index_resolution = self._index.resolution
        return {
            name: h3i.cell_to_center_child(shard, index_resolution)
            for name, shard in zip(names, shards, strict=True)
            if shard is not None
        }

    async def _move(self, wanted: dict[str, int]) -> None:
        for name, cell in wanted.items():
            old = self._watching.get(name)
            if old is not None and self._shard(old) == self._shard(cell):
                continue
            await self._bus.watch(frozenset({cell}))
            self._watching[name] = cell
            if old is not None:
                self._bus.unwatch(frozenset({old}))
        for name in self._watching.keys() - wanted.keys():
            self._bus.unwatch(frozenset({self._watching.pop(name)}))

    def _shard(self, cell: int) -> int:
        shard: int = h3i.cell_to_parent(cell, self._resolution)
        return shard
