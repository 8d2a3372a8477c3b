"""The core alone, without HTTP: ingest, the tick and feed fan-out through ``Tracker``'s API.

    python -m bench.core --vehicles 50000 --feeds 100 --ticks 10
    python -m bench.core --region zones    # the fleet spread as bench.zones spreads it

Builds a :class:`tracker.service.Tracker` in this process and drives it as a front end
does, with no server and no sockets: each round posts every vehicle's next position
through :meth:`Tracker.ingest` (msgpack batches of ``--batch``), publishes one tick
(:meth:`Tracker.tick`: index, frame step, hub), and lets ``--feeds`` feeds opened with
:meth:`Tracker.open_feed` over random city viewports render their events. Ticks are
driven by hand, so the figures are the CPU cost of each step, not wall-clock pacing.
Prints a table; ``--json`` prints the figures as JSON, ``--versions`` adds the versions
of Python and the libraries on the hot path. The vehicles drive about the city (30 x 20
km), or with ``--region zones`` over ``bench.zones``' 220 x 200 km region, where nearly
every vehicle has an index cell of its own and the feeds (city viewports) watch few of
the cells a tick changes: what costs per changed cell shows there.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from importlib.metadata import version

import msgspec
import numpy as np
import trio
import trio.testing

from bench.common import CITY, viewport
from bench.zones import SPAN_DEG
from tracker.config import TrackerConfig
from tracker.regions import parse_area
from tracker.service import Tracker

MSGPACK = "application/msgpack"
STEP_DEG = 2e-4
"""How far a vehicle moves per round (about 20 m): most travel as 8-byte moves."""
REGIONS = {"city": (0.1, 0.16), "zones": SPAN_DEG}
"""Half the height and width, in degrees, of where the vehicles are."""


def _bodies(lat: np.ndarray, lon: np.ndarray, batch: int, ts: float) -> list[bytes]:
    """Every vehicle's ping at ``ts``, as msgpack ingest bodies of ``batch`` pings."""
    pings = [
        {"vehicle_id": f"v{n}", "lat": float(a), "lon": float(o), "ts": ts}
        for n, (a, o) in enumerate(zip(lat.tolist(), lon.tolist(), strict=True))
    ]
    return [msgspec.msgpack.encode(pings[i : i + batch]) for i in range(0, len(pings), batch)]


async def _read(tracker: Tracker, cells: frozenset[int], received: list[int]) -> None:
    """One feed, drained as fast as the core renders it; counts the bytes."""
    async with tracker.open_feed(cells, is_json=False, last_event_id=None) as feed:
        async for chunk in feed:
            received[0] += len(chunk)


async def measure(args: argparse.Namespace) -> dict[str, float | str]:
    rng = random.Random(1)
    generator = np.random.default_rng(1)
    config = TrackerConfig(heartbeat_s=3600, ingest_max_pings=max(args.batch, 1))
    tracker = Tracker(config)
    half_lat, half_lon = REGIONS[args.region]
    lat = CITY[0] + generator.uniform(-half_lat, half_lat, args.vehicles)
    lon = CITY[1] + generator.uniform(-half_lon, half_lon, args.vehicles)
    areas = [
        parse_area(
            {"bbox": [viewport(rng).removeprefix("bbox=")]},
            resolution=config.h3_resolution,
            max_cells=config.max_feed_cells,
        )
        for _ in range(args.feeds)
    ]
    ingest_s, tick_s, fanout_s = [], [], []
    received = [0]
    async with trio.open_nursery() as bench_nursery:
        for area in areas:
            bench_nursery.start_soon(_read, tracker, area, received)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(args.ticks + 1):  # the first round enters every vehicle: warm-up
            lat += generator.uniform(-STEP_DEG, STEP_DEG, args.vehicles)
            lon += generator.uniform(-STEP_DEG, STEP_DEG, args.vehicles)
            bodies = _bodies(lat, lon, args.batch, time.time() - 0.5)
            started = time.perf_counter()
            accepted = sum(tracker.ingest(body, MSGPACK).accepted for body in bodies)
            ingested = time.perf_counter()
            tracker.tick()
            ticked = time.perf_counter()
            await trio.testing.wait_all_tasks_blocked()  # every feed has rendered its batch
            done = time.perf_counter()
            assert accepted == args.vehicles, accepted
            ingest_s.append(ingested - started)
            tick_s.append(ticked - ingested)
            fanout_s.append(done - ticked)
            await trio.sleep(0.001)  # the next round's pings are newer
        bench_nursery.cancel_scope.cancel()
    ingest_s, tick_s, fanout_s = ingest_s[1:], tick_s[1:], fanout_s[1:]
    return {
        "vehicles": args.vehicles,
        "region": args.region,
        "feeds": args.feeds,
        "ticks": args.ticks,
        "ingest_pings_per_s_median": round(args.vehicles / statistics.median(ingest_s)),
        "tick_ms_median": round(statistics.median(tick_s) * 1000, 1),
        "tick_ms_max": round(max(tick_s) * 1000, 1),
        "feed_render_ms_median": round(statistics.median(fanout_s) * 1000, 1),
        "feed_bytes_per_tick": round(received[0] / (args.ticks + 1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vehicles", type=int, default=50_000)
    parser.add_argument("--feeds", type=int, default=100)
    parser.add_argument("--ticks", type=int, default=10)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--region", choices=sorted(REGIONS), default="city")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--versions", action="store_true", help="add library versions")
    args = parser.parse_args()
    figures: dict[str, object] = dict(trio.run(measure, args))
    if args.versions:
        figures["python"] = platform.python_version()
        for package in ("trio", "msgspec", "numpy", "h3"):
            figures[package] = version(package)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"machine: {platform.platform()}")
    for name, value in figures.items():
        print(f"{name:<28} {value:>12}")


if __name__ == "__main__":
    main()
