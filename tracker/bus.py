"""The bus between tracker instances: in-process by default, Redis Pub/Sub to scale out.

One tracker process needs no bus: every ping it ingests is in its own index, and its
ticker publishes frames to its own feeds (:class:`LocalBus` does nothing). Several
instances behind a load balancer share pings through Redis (:class:`RedisBus`, turned on
by ``--bus redis://host:port/db``), and each builds frames from its own index exactly as
one instance does, so feeds are the same events and bytes on any instance:

* **Sharding.** The world is cut into coarse H3 cells, *shards* (``bus_shard_resolution``,
  5 by default: about 250 km²). Pings travel on one channel per shard,
  ``trk:pings:<shard>``; a ping's shard is the parent of its index cell, as for feeds.
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
* **Deadlines.** Every Redis call runs under ``bus_timeout_s``; a call that fails or
  takes longer raises :class:`BusUnavailable` inside this module, and the bus is then
  ``degraded`` (:attr:`RedisBus.state`) until a call succeeds again.
* **Outages.** While degraded, instances keep serving what they have and keep accepting
  pings; pings are not forwarded (counted in ``tracker_bus_dropped_pings_total``), and a
  probe retries with backoff (0.1 s doubling to 5 s). Once Redis answers again, every
  instance publishes the latest position of every vehicle it holds once more, in steps of
  :data:`REPUBLISH_CHUNK` vehicles, through a compare-and-set script that never replaces a
  newer state (so a Redis that restarted empty is refilled, and vehicles heard only during
  the outage reach every instance), and the subscriber resubscribes, reloads every watched
  shard and gives every feed a fresh snapshot. The outage is logged once when it starts
  and once when it ends.
* **Validation.** Everything read from Redis (messages and state entries) passes the
  checks of ``/ingest`` input before it reaches the index; what fails is counted and
  skipped, never raised into the tick.

Task tree: ``RedisBus.run`` (started by ``Tracker.run`` into its nursery) owns the Redis
client and ``bus_nursery``: the publisher (live batches), the republisher (after an
outage), the probe (is Redis answering?), and the subscriber session (which owns the
Pub/Sub connection and a task applying unsubscriptions). Each runs until cancelled.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Final, Protocol, TypeVar

import anyio
import coredis
import coredis.exceptions
import msgspec
import trio
from coredis.retry import NoRetryPolicy

from tracker.busplan import (
    CONNECTED,
    DEGRADED,
    Backoff,
    LatestPings,
    Link,
    Watchers,
    accept_bus_ping,
    plan_publish,
    republish_args,
    shard_of,
    shards_of,
    to_bus_ping,
)
from tracker.config import TrackerConfig, without_password
from tracker.geoindex import GeoIndex
from tracker.logs import Episode
from tracker.metrics import Metrics
from tracker.pings import Ping
from tracker.wire import (
    BUS_VERSION,
    BusPing,
    decode_bus_message,
    decode_bus_ping,
    encode_bus_message,
    encode_bus_ping,
)

__all__ = ["REPUBLISH_CHUNK", "Bus", "BusUnavailable", "LocalBus", "RedisBus"]

logger = logging.getLogger(__name__)

_coredis_logger = logging.getLogger("coredis")
if _coredis_logger.level == logging.NOTSET:
    # coredis logs a traceback for every failed connection attempt (every retry of an
    # outage); the bus reports an outage itself, once when it starts (with the reason) and
    # once when it ends. An operator who sets coredis's level explicitly keeps theirs.
    _coredis_logger.setLevel(logging.CRITICAL)

WHERE_KEY: Final = "trk:where"
STATE_PREFIX: Final = "trk:state:"
REPUBLISH_CHUNK: Final = 500
"""Vehicles published again per step after an outage (one script call and one pipeline)."""
REPUBLISH_ATTEMPTS: Final = 3
"""Rounds for vehicles whose ``trk:where`` changed between reading it and writing."""
PROBE_INTERVAL_S: Final = 1.0
"""How often a connected bus checks that Redis still answers (PING)."""
PRUNE_INTERVAL_S: Final = 60.0
"""How often vehicles silent past ``remove_after_s`` are forgotten by the republisher."""

_DOWN = (
    coredis.exceptions.RedisError,
    TimeoutError,
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)
"""What a failing Redis (or a connection to it) raises; mapped to :class:`BusUnavailable`."""

_T = TypeVar("_T")

_REPUBLISH_SCRIPT: Final = (
    """
-- Publish vehicles again after an outage, never over a newer state (compare ts).
-- KEYS[1]: trk:where. ARGV[1]: ttl, then 7 per vehicle (see busplan.republish_args).
-- Per vehicle: 1 written, 0 Redis has a newer or equal ts, -1 trk:where changed: retry.
local ttl = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV, 7 do
  local vid, here, here_hex = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local was, was_hex, ts, packed = ARGV[i + 3], ARGV[i + 4], tonumber(ARGV[i + 5]), ARGV[i + 6]
  local result = 1
  if (redis.call('HGET', KEYS[1], vid) or '') ~= was then
    result = -1
  elseif was ~= '' then
    local known = redis.call('HGET', 'PREFIX' .. was_hex, vid)
    if known then
      local ok, state = pcall(cmsgpack.unpack, known)
      if ok and type(state) == 'table' and tonumber(state[4]) and tonumber(state[4]) >= ts then
        result = 0
      end
    end
  end
  if result == 1 then
    if was ~= '' and was ~= here then redis.call('HDEL', 'PREFIX' .. was_hex, vid) end
    redis.call('HSET', 'PREFIX' .. here_hex, vid, packed)
    redis.call('EXPIRE', 'PREFIX' .. here_hex, ttl)
    redis.call('HSET', KEYS[1], vid, here)
  end
  out[#out + 1] = result
end
redis.call('EXPIRE', KEYS[1], ttl)
return out
"""
).replace("PREFIX", STATE_PREFIX)


class BusUnavailable(Exception):
    """Redis refused, broke the connection, or did not answer within ``bus_timeout_s``.

    The one error every Redis call is mapped to; it never leaves this module: the bus
    turns ``degraded`` and the caller goes on with what this instance has.
    """


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

    async def where(self, vehicles: Sequence[str]) -> list[int | None]:
        """The shard each vehicle was last published to by any instance (None: unknown)."""

    @property
    def forwards(self) -> bool:
        """Whether :meth:`forward` wants the accepted pings at all."""

    @property
    def state(self) -> str:
        """``local`` (in-process), ``connected`` or ``degraded`` (Redis not answering)."""


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

    async def where(self, vehicles: Sequence[str]) -> list[int | None]:
        return [None] * len(vehicles)

    @property
    def forwards(self) -> bool:
        return False

    @property
    def state(self) -> str:
        return "local"


class RedisBus:
    """Pings shared between instances through Redis Pub/Sub, per shard (see module doc)."""

    def __init__(
        self,
        url: str,
        *,
        index: GeoIndex,
        metrics: Metrics,
        config: TrackerConfig,
        resnapshot_all: Callable[[], None],
        next_tick: Callable[[], Awaitable[None]],
        client: coredis.Redis[bytes] | None = None,
    ) -> None:
        """``client`` replaces the one made from ``url`` (tests: a fake Redis, no socket)."""
        self._timeout = config.bus_timeout_s
        self._client: coredis.Redis[bytes] = client or coredis.Redis.from_url(
            url,
            stream_timeout=self._timeout,
            connect_timeout=self._timeout,
            retry_policy=NoRetryPolicy(),  # we retry, with backoff and a log line
        )
        self._url = without_password(url)
        self._index = index
        self._metrics = metrics
        self._config = config
        self._resnapshot_all = resnapshot_all
        self._next_tick = next_tick
        self._origin = secrets.token_bytes(8)  # our own pings come back: skip them
        self._link = Link()
        self._startup_outage = Episode(
            logger,
            "Redis bus unreachable at startup: serving this instance's own pings until it answers",
            "Redis bus reachable",
            unit="pings not forwarded",
        )
        self._outage = Episode(
            logger,
            "Redis bus unavailable: serving what this instance has; pings are not forwarded "
            "until it answers",
            "Redis bus back",
            unit="pings not forwarded",
        )
        self._latest = LatestPings()
        self._outgoing: deque[Sequence[Ping]] = deque()
        self._queued_pings = 0
        self._has_outgoing = trio.Event()
        self._republish_wanted = trio.Event()
        self._watchers = Watchers()
        self._ready: dict[int, trio.Event] = {}  # shard -> loaded
        self._has_leaving = trio.Event()
        self._pubsub: coredis.patterns.pubsub.PubSub[bytes] | None = None
        self._session_scope: trio.CancelScope | None = None
        self._session_outages = 0  # outages that had started when the session began

    @property
    def forwards(self) -> bool:
        return True

    @property
    def state(self) -> str:
        """``connected``, or ``degraded`` since a Redis call failed, until one succeeds."""
        return self._link.state

    # --- lifetime --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the Redis client and the bus's tasks until cancelled.

        Probes Redis once first (at most ``bus_timeout_s``): an unreachable ``--bus`` is
        logged and the instance starts anyway, degraded, serving its own pings.
        """
        async with self._client, trio.open_nursery() as bus_nursery:
            try:
                await self._redis("PING", self._client.ping)
            except BusUnavailable as exc:
                self._link.down()
                self._startup_outage.happened(0, url=self._url, error=str(exc))
            bus_nursery.start_soon(self._publish_forever, name="bus publisher")
            bus_nursery.start_soon(self._republish_forever, name="bus republisher")
            bus_nursery.start_soon(self._probe_forever, name="bus probe")
            bus_nursery.start_soon(self._subscribe_forever, name="bus subscriber")
            task_status.started()

    async def _redis(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """``await call()`` under the bus deadline; any failure becomes BusUnavailable."""
        try:
            with trio.fail_after(self._timeout):
                return await call()
        except trio.TooSlowError as exc:
            raise BusUnavailable(f"{what}: no answer within {self._timeout:g} s") from exc
        except _DOWN as exc:
            raise BusUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc

    async def _pipeline(self, what: str, fill: Callable[[Any], None]) -> None:
        """Send the commands ``fill`` queues as one pipeline, under the bus deadline."""

        async def send() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                fill(pipe)

        await self._redis(what, send)

    def _episode(self) -> Episode:
        """The outage going on: the one since startup, or a later one."""
        return self._startup_outage if self._startup_outage.active else self._outage

    def _down(self, exc: BaseException) -> None:
        if self._link.down():
            self._outage.happened(0, url=self._url, error=str(exc))

    def _up(self) -> None:
        if not self._link.up():
            return
        self._episode().over(url=self._url, republishing=len(self._latest))
        self._republish_wanted.set()
        if self._session_scope is not None and self._session_outages < self._link.outages:
            self._session_scope.cancel()  # it predates the outage: resubscribe and reload

    async def _probe_forever(self) -> None:
        """PING every second while connected, with backoff while degraded."""
        backoff = Backoff()
        pruned_at = trio.current_time()
        while True:
            connected = self._link.state == CONNECTED
            await trio.sleep(PROBE_INTERVAL_S if connected else backoff.next())
            try:
                await self._redis("PING", self._client.ping)
            except BusUnavailable as exc:
                self._down(exc)
            else:
                backoff.reset()
                self._up()
            if trio.current_time() - pruned_at > PRUNE_INTERVAL_S:
                self._latest.prune(time.time() - self._config.remove_after_s)
                pruned_at = trio.current_time()

    # --- forwarding ------------------------------------------------------------------------

    def forward(self, pings: Sequence[Ping]) -> None:
        if not pings:
            return
        self._latest.taken(pings)
        if self._link.state != CONNECTED:
            self._drop(len(pings))  # their latest positions are republished on recovery
            return
        self._outgoing.append(pings)
        self._queued_pings += len(pings)
        while self._queued_pings > self._config.bus_queue_max_pings and len(self._outgoing) > 1:
            oldest = self._outgoing.popleft()
            self._queued_pings -= len(oldest)
            self._drop(len(oldest))
        self._has_outgoing.set()

    def _drop(self, pings: int) -> None:
        self._metrics.bus_dropped_pings += pings
        if self._link.state == DEGRADED:
            self._episode().happened(pings)

    async def _publish_forever(self) -> None:
        while True:
            await self._has_outgoing.wait()
            self._has_outgoing = trio.Event()
            while self._outgoing:
                batch = self._outgoing.popleft()
                self._queued_pings -= len(batch)
                try:
                    await self._publish(batch)
                except BusUnavailable as exc:
                    self._down(exc)
                    self._drop(len(batch) + self._queued_pings)
                    self._outgoing.clear()
                    self._queued_pings = 0
                else:
                    self._up()

    def _shard(self, ping: BusPing) -> int:
        return shard_of(
            ping.lat,
            ping.lon,
            index_resolution=self._config.h3_resolution,
            resolution=self._config.bus_shard_resolution,
        )

    async def where(self, vehicles: Sequence[str]) -> list[int | None]:
        """The shard Redis last saw each vehicle in; None for an unknown one, and for all
        while Redis does not answer (a followed vehicle is then found on a later tick)."""
        if not vehicles or self._link.state != CONNECTED:
            return [None] * len(vehicles)
        try:
            return await self._where(list(vehicles))
        except BusUnavailable as exc:
            self._down(exc)
            return [None] * len(vehicles)

    async def _where(self, vehicles: list[str]) -> list[int | None]:
        """The shard Redis last saw each vehicle in (None: unknown)."""
        values = await self._redis(
            "HMGET trk:where", partial(self._client.hmget, WHERE_KEY, vehicles)
        )
        return [_parse_shard(value) for value in values]

    async def _publish(self, batch: Sequence[Ping]) -> None:
        """One round trip to learn where the vehicles were, one pipeline to say where now."""
        pings = [to_bus_ping(ping) for ping in batch]
        plan = plan_publish(pings, await self._where([p.vehicle_id for p in pings]), self._shard)
        ttl = math.ceil(self._config.remove_after_s)

        def fill(pipe: Any) -> None:
            for shard, on_channel in plan.channels.items():
                pipe.publish(_channel(shard), encode_bus_message(self._origin, on_channel))
            for shard, vehicles in plan.left.items():
                pipe.hdel(_state_key(shard), vehicles)
            for shard, state in plan.states.items():
                pipe.hset(_state_key(shard), {v: encode_bus_ping(p) for v, p in state.items()})
                pipe.expire(_state_key(shard), ttl)
            pipe.hset(WHERE_KEY, plan.now_at)
            pipe.expire(WHERE_KEY, ttl)

        await self._pipeline("publish", fill)
        self._metrics.bus_forwarded_pings += len(batch)

    # --- republishing after an outage ---------------------------------------------------------

    async def _republish_forever(self) -> None:
        while True:
            await self._republish_wanted.wait()
            self._republish_wanted = trio.Event()
            self._latest.prune(time.time() - self._config.remove_after_s)
            try:
                for chunk in self._latest.chunks(REPUBLISH_CHUNK):
                    await self._republish([to_bus_ping(ping) for ping in chunk])
            except BusUnavailable as exc:
                self._down(exc)  # the next recovery asks again

    async def _republish(self, pings: list[BusPing]) -> None:
        """Write the vehicles Redis has nothing newer of, and publish those on their shards."""
        ttl = math.ceil(self._config.remove_after_s)
        for _ in range(REPUBLISH_ATTEMPTS):
            was = await self._where([p.vehicle_id for p in pings])
            args = [ttl, *republish_args(pings, was, self._shard, encode_bus_ping)]
            results = await self._redis(
                "EVAL republish",
                partial(self._client.eval, _REPUBLISH_SCRIPT, keys=[WHERE_KEY], args=args),
            )
            outcome = [int(r) for r in results] if isinstance(results, list) else []
            if len(outcome) != len(pings):
                raise BusUnavailable(f"EVAL republish: unexpected reply {results!r:.80}")
            written = [i for i, r in enumerate(outcome) if r == 1]
            if written:
                plan = plan_publish(
                    [pings[i] for i in written], [was[i] for i in written], self._shard
                )

                def fill(pipe: Any, plan: Any = plan) -> None:
                    for shard, on_channel in plan.channels.items():
                        pipe.publish(_channel(shard), encode_bus_message(self._origin, on_channel))

                await self._pipeline("republish", fill)
                self._metrics.bus_republished_pings += len(written)
            pings = [pings[i] for i, r in enumerate(outcome) if r == -1]
            if not pings:
                return

    # --- watching ----------------------------------------------------------------------------

    async def watch(self, cells: frozenset[int]) -> None:
        """Subscribe to the shards of ``cells`` not yet watched here, and load them.

        Returns once a tick has published what was loaded (so the feed's first snapshot is
        complete), or within ``bus_timeout_s`` if Redis does not answer (at once while the
        bus is degraded): the feed then starts with what this instance has, and gets a
        fresh snapshot when Redis is back.
        """
        shards = shards_of(cells, self._config.bus_shard_resolution)
        new = self._watchers.watch(shards)
        for shard in new:
            self._ready[shard] = trio.Event()
        pubsub = self._pubsub
        try:
            if new and pubsub is not None and self._link.state == CONNECTED:
                channels = [_channel(shard) for shard in new]
                await self._redis("SUBSCRIBE", partial(pubsub.subscribe, *channels))
                await self._load(new)
                with trio.move_on_after(self._timeout):  # a stuck ticker is the core's matter
                    await self._next_tick()
        except BusUnavailable as exc:
            self._down(exc)  # recovery resubscribes, reloads and resnapshots
        finally:
            for shard in new:
                self._ready[shard].set()
        with trio.move_on_after(self._timeout * 3):  # another feed is loading these
            for shard in shards:
                if (ready := self._ready.get(shard)) is not None:
                    await ready.wait()

    def unwatch(self, cells: frozenset[int]) -> None:
        gone = self._watchers.unwatch(shards_of(cells, self._config.bus_shard_resolution))
        for shard in gone:
            self._ready.pop(shard, None)
        if gone:
            self._has_leaving.set()

    async def _load(self, shards: Sequence[int]) -> None:
        """Apply the latest state of ``shards`` to the index; prune what has expired."""
        now = time.time()
        horizon = now - self._config.remove_after_s
        for shard in shards:
            key = _state_key(shard)
            state = await self._redis("HGETALL", partial(self._client.hgetall, key))
            dead: list[bytes] = []
            for vehicle_id, packed in state.items():
                try:
                    wire = decode_bus_ping(packed)
                except msgspec.DecodeError:
                    self._metrics.bus_bad_pings += 1
                    dead.append(vehicle_id)
                    continue
                if wire.ts < horizon:
                    dead.append(vehicle_id)
                elif self._apply(wire, now):
                    self._metrics.bus_loaded_pings += 1
            if dead:
                await self._redis("HDEL", partial(self._client.hdel, key, dead))

    # --- the subscriber session --------------------------------------------------------------

    async def _subscribe_forever(self) -> None:
        """Keep one Pub/Sub session; a new one after a failure (backoff) or an outage."""
        backoff = Backoff()
        while True:
            self._session_scope = scope = trio.CancelScope()
            self._session_outages = self._link.outages
            failed = False
            with scope:
                try:
                    await self._session(backoff)
                except* (BusUnavailable, *_DOWN) as group:
                    self._down(_first_leaf(group))
                    failed = True
            self._pubsub = None
            self._metrics.bus_reconnects += 1
            if failed:
                await trio.sleep(backoff.next())

    async def _session(self, backoff: Backoff) -> None:
        """One Pub/Sub connection: subscribe and load what is watched, then listen."""
        pubsub = self._client.pubsub(retry_policy=NoRetryPolicy(), ignore_subscribe_messages=True)
        async with pubsub, trio.open_nursery() as session_nursery:
            watched = self._watchers.watched
            if watched:
                channels = [_channel(shard) for shard in watched]
                await self._redis("SUBSCRIBE", partial(pubsub.subscribe, *channels))
                await self._load(watched)
                self._resnapshot_all()  # feeds may have missed batches: start them afresh
            self._pubsub = pubsub
            backoff.reset()
            self._up()
            session_nursery.start_soon(self._unsubscribe_forever, pubsub)
            while True:
                message = await pubsub.get_message()
                if message is not None and message["type"] == "message":
                    self._receive(message["data"])

    async def _unsubscribe_forever(self, pubsub: coredis.patterns.pubsub.PubSub[bytes]) -> None:
        while True:
            await self._has_leaving.wait()
            self._has_leaving = trio.Event()
            leaving = self._watchers.take_leaving()
            if leaving:
                channels = [_channel(shard) for shard in leaving]
                await self._redis("UNSUBSCRIBE", partial(pubsub.unsubscribe, *channels))

    def _receive(self, data: object) -> None:
        """Apply another instance's pings; whatever is malformed is counted and skipped."""
        if not isinstance(data, bytes):
            self._metrics.bus_bad_messages += 1
            return
        try:
            message = decode_bus_message(data)
        except msgspec.DecodeError:
            self._metrics.bus_bad_messages += 1
            return
        if message.origin == self._origin:
            return
        if message.version > BUS_VERSION:
            self._metrics.bus_newer_messages += 1
        now = time.time()
        for wire in message.pings:
            if self._apply(wire, now):
                self._metrics.bus_received_pings += 1

    def _apply(self, wire: BusPing, now: float) -> bool:
        """Apply a ping that came through Redis, if ``/ingest`` would take it (else counted)."""
        ping = accept_bus_ping(wire, now, self._config)
        if ping is None:
            self._metrics.bus_bad_pings += 1
            return False
        if self._index.apply(ping, now):
            self._latest.taken((ping,))
        return True


def _channel(shard: int) -> str:
    return f"trk:pings:{shard:x}"


def _state_key(shard: int) -> str:
    return f"{STATE_PREFIX}{shard:x}"


def _parse_shard(value: object) -> int | None:
    """A ``trk:where`` value (a decimal shard); None if absent or not a number."""
    if not isinstance(value, bytes | str):
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first: BaseException = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
