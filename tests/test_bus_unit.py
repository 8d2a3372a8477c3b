"""RedisBus against a fake Redis, without sockets, on Trio's mock clock: deadlines exact.

The fake takes every call and answers only while ``answering`` is set; otherwise a call
waits for ever, as a Redis that accepts connections but never answers would. Real Redis
is exercised by tests/test_bus_deadlines.py, test_bus_messages.py and test_bus_outage.py.
"""

from __future__ import annotations

import time
from typing import Any

import coredis.exceptions
import h3.api.basic_int as h3i
import pytest
import trio
import trio.testing

from tests.conftest import BERLIN
from tracker.bus import RedisBus
from tracker.config import TrackerConfig
from tracker.geoindex import GeoIndex
from tracker.metrics import Metrics
from tracker.pings import Ping

TIMEOUT_S = 2.0
BERLIN_CELLS = frozenset({h3i.latlng_to_cell(*BERLIN, 7)})


class FakeRedis:
    """Just the calls RedisBus makes; records their names."""

    def __init__(self) -> None:
        self.answering = False
        self.calls: list[str] = []
        self.evals: list[list[Any]] = []

    async def __aenter__(self) -> FakeRedis:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def reply(self, name: str, value: Any) -> Any:
        self.calls.append(name)
        if not self.answering:
            await trio.sleep_forever()
        return value

    def ping(self) -> Any:
        return self.reply("PING", b"PONG")

    def hmget(self, key: str, fields: list[str]) -> Any:
        return self.reply("HMGET", [None] * len(fields))

    def hgetall(self, key: str) -> Any:
        return self.reply("HGETALL", {})

    def hdel(self, key: str, fields: list[Any]) -> Any:
        return self.reply("HDEL", len(fields))

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        self.evals.append(args)
        return self.reply("EVAL", [1] * ((len(args) - 1) // 7))

    def pipeline(self, transaction: bool) -> FakePipeline:
        return FakePipeline(self)

    def pubsub(self, **options: Any) -> FakePubSub:
        return FakePubSub(self)


class FakePipeline:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.commands: list[str] = []

    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.redis.reply("PIPELINE " + " ".join(self.commands), None)

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self.commands.append(name.upper())


class FakePubSub:
    """Connects only while Redis answers (else fails after the connect deadline)."""

    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis

    async def __aenter__(self) -> FakePubSub:
        if not self.redis.answering:
            await trio.sleep(TIMEOUT_S)
            raise coredis.exceptions.ConnectionError("no answer to the handshake")
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def subscribe(self, *channels: str) -> Any:
        return self.redis.reply("SUBSCRIBE", None)

    def unsubscribe(self, *channels: str) -> Any:
        return self.redis.reply("UNSUBSCRIBE", None)

    async def get_message(self) -> None:
        await trio.sleep_forever()


def make_bus(redis: FakeRedis) -> tuple[RedisBus, Metrics]:
    config = TrackerConfig(bus="redis://fake:6379/0", bus_timeout_s=TIMEOUT_S)
    index = GeoIndex(resolution=7, stale_after_s=60, remove_after_s=300, forget_after_ticks=10)
    metrics = Metrics()

    async def next_tick() -> None:
        await trio.sleep(0.05)

    bus = RedisBus(
        config.bus,
        index=index,
        metrics=metrics,
        config=config,
        resnapshot_all=lambda: None,
        next_tick=next_tick,
        client=redis,  # type: ignore[arg-type]
    )
    return bus, metrics


def berlin_ping(vehicle: str) -> Ping:
    return Ping(vehicle_id=vehicle, lat=BERLIN[0], lon=BERLIN[1], ts=time.time() - 1)


async def wait_for_state(bus: RedisBus, state: str) -> float:
    """Mock seconds until the bus is in ``state``."""
    started = trio.current_time()
    with trio.fail_after(60):
        while bus.state != state:
            await trio.sleep(0.01)
    return trio.current_time() - started


async def test_redis_bus_starts_degraded_after_one_deadline_when_redis_never_answers(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    redis = FakeRedis()
    bus, metrics = make_bus(redis)
    started = trio.current_time()
    await nursery.start(bus.run)
    assert trio.current_time() - started == pytest.approx(TIMEOUT_S)
    assert bus.state == "degraded"
    # Feeds open at once, ingest is not queued for Redis: both are counted, nothing waits.
    opened = trio.current_time()
    await bus.watch(BERLIN_CELLS)
    assert trio.current_time() == opened
    bus.forward([berlin_ping("v1")])
    assert metrics.bus_dropped_pings == 1
    # Redis answers again: the probe notices, and v1 is published again.
    redis.answering = True
    assert await wait_for_state(bus, "connected") <= TIMEOUT_S + 5.0  # deadline + backoff
    with trio.fail_after(10):
        while not metrics.bus_republished_pings:
            await trio.sleep(0.01)
    assert redis.evals[-1][1] == "v1"  # after the ttl, the first vehicle's id
    with trio.fail_after(TIMEOUT_S + 1):  # its attempt under way fails first
        while "SUBSCRIBE" not in redis.calls:  # the session subscribes what is watched
            await trio.sleep(0.01)
    nursery.cancel_scope.cancel()


async def test_redis_bus_a_publish_that_hangs_degrades_after_exactly_the_deadline(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    redis = FakeRedis()
    redis.answering = True
    bus, metrics = make_bus(redis)
    await nursery.start(bus.run)
    await bus.watch(BERLIN_CELLS)
    assert bus.state == "connected"
    redis.answering = False
    sent = trio.current_time()
    bus.forward([berlin_ping("v1")])
    assert await wait_for_state(bus, "degraded") == pytest.approx(TIMEOUT_S, abs=0.02)
    assert trio.current_time() - sent == pytest.approx(TIMEOUT_S, abs=0.02)
    assert metrics.bus_dropped_pings == 1
    bus.forward([berlin_ping("v2")])  # while degraded: dropped at once, not queued
    assert metrics.bus_dropped_pings == 2
    nursery.cancel_scope.cancel()


async def test_redis_bus_watch_waits_at_most_one_deadline_for_a_hung_subscribe(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    redis = FakeRedis()
    redis.answering = True
    bus, _ = make_bus(redis)
    await nursery.start(bus.run)
    await trio.sleep(0.1)  # the subscriber session is up
    redis.answering = False
    started = trio.current_time()
    await bus.watch(BERLIN_CELLS)
    assert trio.current_time() - started == pytest.approx(TIMEOUT_S, abs=0.02)
    assert bus.state == "degraded"
    started = trio.current_time()
    await bus.watch(BERLIN_CELLS)  # another feed on the same area: no wait at all
    assert trio.current_time() == started
    nursery.cancel_scope.cancel()
