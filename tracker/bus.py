"""The bus between tracker instances: in-process by default, Redis Pub/Sub to scale out.

One tracker process needs no bus: every ping it ingests is in its own index, and its
ticker publishes frames to its own feeds (:class:`LocalBus` does nothing). Several
instances behind a load balancer share pings through Redis (:class:`RedisBus`, turned on
by ``--bus redis://host:port/db``), and each builds frames from its own index exactly as
one instance does, so feeds are the same events and bytes on any instance:

* **Sharding.** The world is cut into coarse H3 cells, *shards* (``bus_shard_resolution``,
  5 by default: about 250 km²). Pings travel on one channel per shard,
  ``trk:pings:<shard>``.
* **Forwarding.** After an ingest is applied locally, its accepted pings are queued (never
  awaited by the request) and a publisher task sends them, pipelined, one message per
  shard per batch. A vehicle that changed shard is also sent to its old shard, so that
  instances watching only the old one see it leave.
* **Only what is watched.** An instance subscribes to a shard's channel when its first
  feed covering the shard opens, and unsubscribes when the last one closes.
* **Complete snapshots.** The latest ping of every vehicle lives in a Redis hash per shard
  (``trk:state:<shard>``, expiring with ``remove_after_s`` of silence; ``trk:where`` maps
  vehicles to shards). An instance that starts watching a shard loads it, lets one tick
  publish it, and only then lets the feed take its snapshot.
* **Outages.** If Redis goes away, instances keep serving what they have, retry with
  backoff (0.1 s doubling to 5 s), and once back resubscribe, reload every watched shard
  and give every feed a fresh snapshot. Pings that could not be forwarded meanwhile are
  counted (``tracker_bus_dropped_pings_total``), never queued without bound.

Task tree: ``RedisBus.run`` (started by ``Tracker.run`` into its nursery) owns the Redis
client and ``bus_nursery``: the publisher, and the subscriber session (which owns the
Pub/Sub connection and a task applying unsubscriptions).
"""

from __future__ import annotations

import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

import coredis
import coredis.exceptions
import h3.api.basic_int as h3i
import msgspec
import trio
from coredis.retry import NoRetryPolicy

from tracker.geoindex import GeoIndex
from tracker.metrics import Metrics
from tracker.pings import Ping

__all__ = ["Bus", "LocalBus", "RedisBus"]

WHERE_KEY = "trk:where"
MAX_QUEUED_BATCHES = 256
"""Ingest batches waiting for the publisher; beyond, the oldest is dropped and counted."""

_WirePing = tuple[str, float, float, float, float | None, float | None]
_message_decoder = msgspec.msgpack.Decoder(tuple[bytes, list[_WirePing]])
_state_decoder = msgspec.msgpack.Decoder(_WirePing)
_encoder = msgspec.msgpack.Encoder()
_DOWN = (coredis.exceptions.ConnectionError, TimeoutError, OSError)


class Bus(Protocol):
    """What the tracker asks of a bus; the in-process one does nothing."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the bus's tasks until cancelled."""

    def forward(self, pings: Sequence[Ping]) -> None:
        """Hand on pings accepted here; never blocks."""

    async def watch(self, cells: frozenset[int]) -> None:
        """A feed is about to watch ``cells``: make sure their vehicles are here."""

    def unwatch(self, cells: frozenset[int]) -> None:
        """A feed watching ``cells`` ended."""

    @property
    def forwards(self) -> bool:
        """Whether :meth:`forward` wants the accepted pings at all."""


class LocalBus:
    """One instance: everything is already in the index."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def forward(self, pings: Sequence[Ping]) -> None:
        pass

    async def watch(self, cells: frozenset[int]) -> None:
        pass

    def unwatch(self, cells: frozenset[int]) -> None:
        pass

    @property
    def forwards(self) -> bool:
        return False


class RedisBus:
    """Pings shared between instances through Redis Pub/Sub, per shard (see module doc)."""

    def __init__(
        self,
        url: str,
        *,
        index: GeoIndex,
        metrics: Metrics,
        shard_resolution: int,
        remove_after_s: float,
        resnapshot_all: Callable[[], None],
        next_tick: Callable[[], Awaitable[None]],
    ) -> None:
        self._client: coredis.Redis[bytes] = coredis.Redis.from_url(url)
        self._index = index
        self._metrics = metrics
        self._shard_resolution = shard_resolution
        self._remove_after_s = remove_after_s
        self._resnapshot_all = resnapshot_all
        self._next_tick = next_tick
        self._origin = secrets.token_bytes(8)  # our own pings come back: skip them
        self._outgoing: deque[Sequence[Ping]] = deque()
        self._has_outgoing = trio.Event()
        self._watchers: dict[int, int] = {}  # shard -> feeds watching it here
        self._ready: dict[int, trio.Event] = {}  # shard -> loaded
        self._leaving: set[int] = set()  # shards to unsubscribe from
        self._has_leaving = trio.Event()
        self._pubsub: coredis.patterns.pubsub.PubSub[bytes] | None = None

    @property
    def forwards(self) -> bool:
        return True

    # --- lifetime --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the Redis client, the publisher and the subscriber until cancelled."""
        async with self._client, trio.open_nursery() as bus_nursery:
            bus_nursery.start_soon(self._publish_forever, name="bus publisher")
            bus_nursery.start_soon(self._subscribe_forever, name="bus subscriber")
            task_status.started()

    # --- forwarding ------------------------------------------------------------------------

    def forward(self, pings: Sequence[Ping]) -> None:
        if not pings:
            return
        if len(self._outgoing) >= MAX_QUEUED_BATCHES:
            self._metrics.bus_dropped_pings += len(self._outgoing.popleft())
        self._outgoing.append(pings)
        self._has_outgoing.set()

    async def _publish_forever(self) -> None:
        backoff = _Backoff()
        while True:
            await self._has_outgoing.wait()
            self._has_outgoing = trio.Event()
            while self._outgoing:
                batch = self._outgoing.popleft()
                try:
                    await self._publish(batch)
                    backoff.reset()
                except _DOWN:
                    self._metrics.bus_dropped_pings += len(batch)
                    await backoff.sleep()

    async def _publish(self, batch: Sequence[Ping]) -> None:
        """One round trip to learn where the vehicles were, one pipeline to say where now."""
        ids = [ping.vehicle_id for ping in batch]
        before = await self._client.hmget(WHERE_KEY, ids)
        channels: dict[int, list[_WirePing]] = {}
        states: dict[int, dict[str, bytes]] = {}
        left: dict[int, list[str]] = {}
        now_at: dict[str, int] = {}
        for ping, was in zip(batch, before, strict=True):
            shard = self._shard_of(ping.lat, ping.lon)
            wire = _to_wire(ping)
            channels.setdefault(shard, []).append(wire)
            states.setdefault(shard, {})[ping.vehicle_id] = _encoder.encode(wire)
            now_at[ping.vehicle_id] = shard
            if was is not None and int(was) != shard:
                channels.setdefault(int(was), []).append(wire)  # it left: tell the old shard
                left.setdefault(int(was), []).append(ping.vehicle_id)
        ttl = math.ceil(self._remove_after_s)
        async with self._client.pipeline(transaction=False) as pipe:
            for shard, pings in channels.items():
                pipe.publish(_channel(shard), _encoder.encode((self._origin, pings)))
            for shard, vehicles in left.items():
                pipe.hdel(_state_key(shard), vehicles)
            for shard, state in states.items():
                pipe.hset(_state_key(shard), state)
                pipe.expire(_state_key(shard), ttl)
            pipe.hset(WHERE_KEY, now_at)
            pipe.expire(WHERE_KEY, ttl)
        self._metrics.bus_forwarded_pings += len(batch)

    # --- watching ----------------------------------------------------------------------------

    def _shard_of(self, lat: float, lon: float) -> int:
        cell: int = h3i.latlng_to_cell(lat, lon, self._shard_resolution)
        return cell

    def _shards(self, cells: Iterable[int]) -> set[int]:
        return {h3i.cell_to_parent(cell, self._shard_resolution) for cell in cells}

    async def watch(self, cells: frozenset[int]) -> None:
        """Subscribe to the shards of ``cells`` not yet watched here, and load them.

        Returns once a tick has published what was loaded (so the feed's first snapshot is
        complete), or at once if Redis is unreachable: a feed then starts with what this
        instance has, and gets a fresh snapshot when Redis is back.
        """
        shards = self._shards(cells)
        new = [shard for shard in shards if not self._watchers.get(shard)]
        for shard in shards:
            self._watchers[shard] = self._watchers.get(shard, 0) + 1
            self._leaving.discard(shard)
        for shard in new:
            self._ready[shard] = trio.Event()
        pubsub = self._pubsub
        if new and pubsub is not None:
            try:
                await pubsub.subscribe(*map(_channel, new))
                await self._load(new)
                await self._next_tick()
            except _DOWN:
                pass  # the subscriber session reconnects and resubscribes
            finally:
                for shard in new:
                    self._ready[shard].set()
        if pubsub is not None:
            with trio.move_on_after(5):
                for shard in shards:
                    await self._ready[shard].wait()

    def unwatch(self, cells: frozenset[int]) -> None:
        for shard in self._shards(cells):
            self._watchers[shard] -= 1
            if not self._watchers[shard]:
                del self._watchers[shard]
                self._ready.pop(shard, None)
                self._leaving.add(shard)
                self._has_leaving.set()

    async def _load(self, shards: Iterable[int]) -> None:
        """Apply the latest state of ``shards`` to the index; prune what has expired."""
        now = time.time()
        horizon = now - self._remove_after_s
        for shard in shards:
            state = await self._client.hgetall(_state_key(shard))
            expired = []
            for vehicle_id, packed in state.items():
                wire = _state_decoder.decode(packed)
                if wire[3] < horizon:
                    expired.append(vehicle_id)
                else:
                    self._index.apply(_from_wire(wire), now)
            if expired:
                await self._client.hdel(_state_key(shard), expired)
            self._metrics.bus_loaded_pings += len(state) - len(expired)

    # --- the subscriber session --------------------------------------------------------------

    async def _subscribe_forever(self) -> None:
        backoff = _Backoff()
        first = True
        while True:
            try:
                await self._session(resync=not first)
            except* _DOWN:
                self._metrics.bus_reconnects += 1
            self._pubsub = None
            first = False
            await backoff.sleep()

    async def _session(self, *, resync: bool) -> None:
        """One Pub/Sub connection: (re)subscribe, (re)load if it is a reconnection, listen."""
        pubsub = self._client.pubsub(retry_policy=NoRetryPolicy(), ignore_subscribe_messages=True)
        async with pubsub, trio.open_nursery() as session_nursery:
            watched = list(self._watchers)
            if watched:
                await pubsub.subscribe(*map(_channel, watched))
            if resync:
                await self._load(watched)
                self._resnapshot_all()
            self._pubsub = pubsub
            session_nursery.start_soon(self._unsubscribe_forever, pubsub)
            while True:
                message = await pubsub.get_message()
                if message is not None and message["type"] == "message":
                    self._receive(message["data"])

    async def _unsubscribe_forever(self, pubsub: coredis.patterns.pubsub.PubSub[bytes]) -> None:
        while True:
            await self._has_leaving.wait()
            self._has_leaving = trio.Event()
            leaving = [shard for shard in self._leaving if shard not in self._watchers]
            self._leaving.clear()
            if leaving:
                await pubsub.unsubscribe(*map(_channel, leaving))

    def _receive(self, data: object) -> None:
        if not isinstance(data, bytes):
            return
        try:
            origin, pings = _message_decoder.decode(data)
        except msgspec.DecodeError:
            self._metrics.bus_bad_messages += 1
            return
        if origin == self._origin:
            return
        now = time.time()
        for wire in pings:
            self._index.apply(_from_wire(wire), now)
        self._metrics.bus_received_pings += len(pings)


def _channel(shard: int) -> str:
    return f"trk:pings:{shard:x}"


def _state_key(shard: int) -> str:
    return f"trk:state:{shard:x}"


def _to_wire(ping: Ping) -> _WirePing:
    return (ping.vehicle_id, ping.lat, ping.lon, ping.ts, ping.speed, ping.heading)


def _from_wire(wire: _WirePing) -> Ping:
    vehicle_id, lat, lon, ts, speed, heading = wire
    return Ping(vehicle_id=vehicle_id, lat=lat, lon=lon, ts=ts, speed=speed, heading=heading)


class _Backoff:
    """Sleeps of 0.1 s doubling to 5 s; back to 0.1 s after a success."""

    def __init__(self) -> None:
        self._delay = 0.1

    def reset(self) -> None:
        self._delay = 0.1

    async def sleep(self) -> None:
        await trio.sleep(self._delay)
        self._delay = min(5.0, self._delay * 2)
