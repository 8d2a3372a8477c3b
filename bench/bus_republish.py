"""After a Redis outage: the cost of publishing every vehicle again, and of forwarding.

    python -m bench.bus_republish --n 50000

Starts a private redis-server (loopback, free port, no persistence), runs a
:class:`tracker.bus.RedisBus` in this process holding ``--n`` vehicles (forwarded once),
restarts Redis empty and measures how long the bus takes to publish every vehicle again
(compare-and-set script plus PUBLISH, ``REPUBLISH_CHUNK`` vehicles per step) and the
longest the event loop was held meanwhile (a 1 ms watchdog). Also reports what
``forward()`` of the whole batch costs on the ingest path. ``--json`` prints the figures
as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import trio

from tests.redis_server import RedisServer
from tracker.bus import REPUBLISH_CHUNK, RedisBus
from tracker.config import TrackerConfig
from tracker.geoindex import GeoIndex
from tracker.metrics import Metrics
from tracker.pings import Ping


async def _measure(n: int) -> dict[str, float]:
    redis = RedisServer()
    redis.start()
    try:
        config = TrackerConfig(bus=redis.url)
        index = GeoIndex(resolution=7, stale_after_s=60, remove_after_s=300, forget_after_ticks=10)
        metrics = Metrics()

        async def next_tick() -> None:
            await trio.sleep(0.01)

        bus = RedisBus(
            redis.url,
            index=index,
            metrics=metrics,
            config=config,
            resnapshot_all=lambda: None,
            next_tick=next_tick,
        )
        now = time.time() - 1
        pings = [
            Ping(
                vehicle_id=f"v{k}",
                lat=52.3 + (k % 300) * 1e-3,
                lon=13.1 + (k // 300) * 4e-3,
                ts=now,
            )
            for k in range(n)
        ]
        worst = 0.0

        async def watchdog() -> None:
            nonlocal worst
            last = time.perf_counter()
            while True:
                await trio.sleep(0.001)
                at = time.perf_counter()
                worst = max(worst, at - last - 0.001)
                last = at

        async with trio.open_nursery() as bench_nursery:
            await bench_nursery.start(bus.run)
            started = time.perf_counter()
            bus.forward(pings)
            forward_s = time.perf_counter() - started
            with trio.fail_after(60):
                while metrics.bus_forwarded_pings < n:
                    await trio.sleep(0.01)
            redis.stop()
            redis.start()  # empty
            restarted = time.perf_counter()
            bench_nursery.start_soon(watchdog)
            with trio.fail_after(60):
                while metrics.bus_republished_pings < n:
                    await trio.sleep(0.005)
            republish_s = time.perf_counter() - restarted
            bench_nursery.cancel_scope.cancel()
        return {
            "vehicles": n,
            "forward_ms": round(forward_s * 1e3, 1),
            "republish_s": round(republish_s, 2),
            "chunk": REPUBLISH_CHUNK,
            "longest_stall_ms": round(worst * 1e3, 1),
        }
    finally:
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="vehicles held")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    figures = trio.run(_measure, args.n)
    if args.json:
        print(json.dumps(figures))
        return
    print(
        f"forward() of {figures['vehicles']:,} pings: {figures['forward_ms']} ms; "
        f"republished into an empty Redis {figures['republish_s']} s after its restart "
        f"({figures['chunk']} vehicles per step), longest event-loop stall "
        f"{figures['longest_stall_ms']} ms"
    )


if __name__ == "__main__":
    main()
