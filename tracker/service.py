"""The tracker's core, wired: geo-index, feed hub, bus, metrics, and the ticker task.

``Tracker`` owns one long-running task, :meth:`Tracker.run`, started by the app's lifespan
into its nursery (see ``docs/architecture.md``). Inside its own ``tracker_nursery`` it runs
the bus's tasks (none for the in-process bus) and the ticker, which publishes one tick
every ``tick_s`` on an absolute schedule (no drift) until :meth:`Tracker.stop` cancels it.
"""

from __future__ import annotations

import time

import trio

from tracker.bus import Bus, LocalBus, RedisBus
from tracker.config import TrackerConfig
from tracker.geoindex import GeoIndex
from tracker.hub import FeedHub
from tracker.metrics import Metrics

__all__ = ["Tracker"]


class Tracker:
    """Everything one tracker process holds, and the ticker that moves it forward."""

    def __init__(self, config: TrackerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.index = GeoIndex(
            resolution=config.h3_resolution,
            stale_after_s=config.stale_after_s,
            remove_after_s=config.remove_after_s,
            forget_after_ticks=config.replay_ticks,
        )
        self.hub = FeedHub(config, self.index, self.metrics)
        self.bus: Bus = LocalBus()
        if config.bus:
            self.bus = RedisBus(
                config.bus,
                index=self.index,
                metrics=self.metrics,
                config=config,
                resnapshot_all=self.hub.resnapshot_all,
                next_tick=self.next_tick,
            )
        self._ticked = trio.Event()
        self._cancel_scope = trio.CancelScope()
        self.metrics.gauges.update(
            vehicles=("Vehicles tracked, stale ones included.", lambda: self.index.vehicle_count),
            vehicles_stale=("Vehicles marked stale.", lambda: self.index.stale_count),
            subscribers=("Open feed subscriptions.", lambda: self.hub.subscriber_count),
            watched_cells=("Index cells with a subscriber.", lambda: self.hub.watched_cells),
            tick=("Number of the last published tick.", lambda: self.index.tick),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the bus and publish a tick every ``tick_s`` until stopped."""
        with self._cancel_scope:
            async with trio.open_nursery() as tracker_nursery:
                await tracker_nursery.start(self.bus.run)
                task_status.started()
                await self._tick_forever()

    async def _tick_forever(self) -> None:
        """One tick every ``tick_s``; a late tick is not made up twice."""
        next_at = trio.current_time()
        while True:
            next_at += self.config.tick_s
            await trio.sleep_until(next_at)
            self.tick()
            next_at = max(next_at, trio.current_time() - self.config.tick_s)

    def tick(self) -> None:
        """Publish everything ingested since the last tick to the feeds."""
        started = time.perf_counter()
        self.hub.publish(self.index.advance(time.time()))
        self.metrics.observe_tick(time.perf_counter() - started)
        self._ticked.set()
        self._ticked = trio.Event()

    async def next_tick(self) -> None:
        """Wait until the next tick has been published."""
        await self._ticked.wait()

    def stop(self) -> None:
        """End every feed and the ticker (server shutdown)."""
        self.hub.close_all()
        self._cancel_scope.cancel()
