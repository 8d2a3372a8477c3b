"""Zones: ingest with 10,000 zones on and off, the engine's cost per tick, its memory.

    python -m bench.zones [core] --zones 10000 --vehicles 50000 --ticks 10
    python -m bench.zones http --runs 3   (over HTTP against tracker serve: bench.zones_http)
    python -m bench.zones alerts ...      (the delivery side alone: bench.alerts)

``core`` builds two :class:`tracker.service.Tracker` in this process, one holding
``--zones`` zones of mixed sizes and one none, and drives both as ``bench.core`` does:
each round every vehicle sends its next position (vehicles drive straight on at 5-30
m/s, turning now and then: one round is one second of a 1 Hz fleet) through
:meth:`Tracker.ingest` as msgpack batches, then one tick. It prints the ingest rate with
zones on and off (measured alternately in the same rounds, so the ratio is fair on a
noisy machine), the zone engine's cost per tick, the events per second after the first
round, how long compiling the zones took, and the index's memory. Costs are CPU time of
this process (``time.process_time``), so other processes on a shared machine slow them
less than wall-clock times; the rates are pings per CPU second.

The zones lie over a 220 x 200 km region, like the fleet: 80 % small (circles and
squares of 20-300 m: depots, customer sites), 19.5 % medium (polygons of 0.5-3 km),
0.5 % large (districts of 3-15 km, some with a hole).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from typing import Any

import msgspec
import numpy as np
import trio
import trio.lowlevel

from bench.common import CITY, rss_bytes
from tracker.config import TrackerConfig
from tracker.service import Tracker
from tracker.zones.cover import compile_zone
from tracker.zones.model import Zone, parse_zone

MSGPACK = "application/msgpack"
SPAN_DEG = (1.0, 1.5)
"""Half the region's height and width, in degrees (about 220 x 200 km)."""
M_PER_DEG = 111_320.0


def zone_features(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """``count`` zones of mixed sizes over the region, as GeoJSON Features."""
    features = []
    for n in range(count):
        lat = CITY[0] + rng.uniform(-SPAN_DEG[0], SPAN_DEG[0])
        lon = CITY[1] + rng.uniform(-SPAN_DEG[1], SPAN_DEG[1])
        draw = rng.random()
        props: dict[str, Any] = {"name": f"zone {n}", "kind": "customer", "dwell_s": 60}
        if draw < 0.4:
            props["radius_m"] = rng.uniform(20, 300)
            props["kind"] = "depot"
            geometry: dict[str, Any] = {"type": "Point", "coordinates": [lon, lat]}
        elif draw < 0.8:
            geometry = _polygon(lat, lon, rng.uniform(20, 300), 4, rng)
        elif draw < 0.995:
            geometry = _polygon(lat, lon, rng.uniform(500, 3000), rng.randint(5, 40), rng)
            props["kind"] = "restricted"
        else:
            geometry = _polygon(lat, lon, rng.uniform(3000, 15000), rng.randint(8, 200), rng)
            props["kind"] = "district"
            if rng.random() < 0.5:
                hole = _polygon(lat, lon, 1000, 6, rng)["coordinates"][0]
                geometry["coordinates"].append(hole)
        props["margin_m"] = 10
        feature = {"type": "Feature", "id": f"z{n}", "geometry": geometry, "properties": props}
        features.append(feature)
    return features


def _polygon(
    lat: float, lon: float, radius_m: float, sides: int, rng: random.Random
) -> dict[str, Any]:
    """A convex polygon of ``sides`` around (lat, lon), its vertices at about ``radius_m``."""
    turn = rng.uniform(0, 2 * math.pi)
    ring = []
    for k in range(sides):
        angle = turn + 2 * math.pi * k / sides
        r = radius_m * (0.85 if sides > 6 and k % 2 else 1.0)
        ring.append(
            [
                lon + r * math.cos(angle) / (M_PER_DEG * math.cos(math.radians(lat))),
                lat + r * math.sin(angle) / M_PER_DEG,
            ]
        )
    ring.append(ring[0])
    return {"type": "Polygon", "coordinates": [ring]}


class Fleet:
    """Vehicles driving straight on at 5-30 m/s, turning now and then."""

    def __init__(self, count: int, generator: np.random.Generator) -> None:
        self.rng = generator
        self.lat = CITY[0] + generator.uniform(-SPAN_DEG[0], SPAN_DEG[0], count)
        self.lon = CITY[1] + generator.uniform(-SPAN_DEG[1], SPAN_DEG[1], count)
        self.heading = generator.uniform(0, 2 * math.pi, count)
        self.speed = generator.uniform(5, 30, count)

    def step(self, seconds: float = 1.0) -> None:
        turning = self.rng.random(len(self.lat)) < 0.05
        self.heading[turning] += self.rng.normal(0, 1.0, int(turning.sum()))
        metres = self.speed * seconds
        self.lat += metres * np.sin(self.heading) / M_PER_DEG
        self.lon += metres * np.cos(self.heading) / (M_PER_DEG * np.cos(np.radians(self.lat)))

    def bodies(self, batch: int, ts: float) -> list[bytes]:
        pings = [
            {"vehicle_id": f"v{n}", "lat": a, "lon": o, "ts": ts}
            for n, (a, o) in enumerate(zip(self.lat.tolist(), self.lon.tolist(), strict=True))
        ]
        return [msgspec.msgpack.encode(pings[i : i + batch]) for i in range(0, len(pings), batch)]


class _Counter:
    """An event sink that counts."""

    def __init__(self) -> None:
        self.events = 0
        self.by_type: dict[str, int] = {}

    def emit(self, events: Any) -> None:
        self.events += len(events)
        for event in events:
            self.by_type[event.type] = self.by_type.get(event.type, 0) + 1


def load_zones(tracker: Tracker, features: list[dict[str, Any]]) -> dict[str, float]:
    """Compile and hold the zones; how long it took and what the index holds."""
    started = time.perf_counter()
    zones: list[Zone] = [parse_zone(feature) for feature in features]
    parsed = time.perf_counter()
    rss = rss_bytes(os.getpid())
    compiled = [compile_zone(zone, tracker.config.h3_resolution) for zone in zones]
    covers_mib = (rss_bytes(os.getpid()) - rss) / 2**20
    compiled_at = time.perf_counter()
    worker = tracker.zones.worker
    for one in compiled:
        worker.put(one, time.time(), new=True)
    worker.decide_here()
    index = worker.engine.zones
    table_started = time.perf_counter()
    cells = index.indexed_cells
    built = time.perf_counter()
    return {
        "zones": len(zones),
        "zone_parse_s": round(parsed - started, 2),
        "zone_compile_s": round(compiled_at - parsed, 2),
        "zone_table_build_s": round(built - table_started, 3),
        "index_cells": cells,
        "index_cross_cells": index.cross_cells,
        "index_arrays_mib": round(index.nbytes / 2**20, 1),
        "zones_compiled_rss_mib": round(covers_mib, 1),
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(1)
    config = TrackerConfig(heartbeat_s=3600, ingest_max_pings=max(args.batch, 1))
    sink = _Counter()
    with_zones = Tracker(config, zone_sink=sink)
    without = Tracker(config)
    figures: dict[str, Any] = load_zones(with_zones, zone_features(args.zones, rng))
    fleet = Fleet(args.vehicles, np.random.default_rng(1))
    on_s: list[float] = []
    off_s: list[float] = []
    engine_s: list[float] = []
    tick_s: list[float] = []
    worker = with_zones.zones.worker
    t0 = time.time() - args.ticks - 5
    events_before = 0
    for round_ in range(args.ticks + 1):  # round 0 enters every vehicle: warm-up
        if round_ == 1:
            events_before = sink.events
        fleet.step()
        bodies = fleet.bodies(args.batch, t0 + round_)
        pairs = [(with_zones, on_s), (without, off_s)]
        if round_ % 2:
            pairs.reverse()
        for tracker, times in pairs:
            started = time.process_time()
            accepted = sum(tracker.ingest(body, MSGPACK).accepted for body in bodies)
            times.append(time.process_time() - started)
            assert accepted == args.vehicles, accepted
        started = time.process_time()
        with_zones.tick()
        tick_s.append(time.process_time() - started)
        started = time.process_time()
        worker.decide_here()  # what the engine's thread does, timed here
        engine_s.append(time.process_time() - started)
        without.tick()
        await trio.lowlevel.checkpoint()
    on, off = statistics.median(on_s[1:]), statistics.median(off_s[1:])
    decided = statistics.median(engine_s[1:])
    figures.update(
        vehicles=args.vehicles,
        ticks=args.ticks,
        ingest_pings_per_s_zones_on=round(args.vehicles / on),
        ingest_pings_per_s_zones_off=round(args.vehicles / off),
        ingest_on_off_ratio=round(off / on, 3),
        zone_engine_ms_per_tick_median=round(decided * 1000, 1),
        zone_engine_ms_per_tick_max=round(max(engine_s[1:]) * 1000, 1),
        tick_ms_median_zones_on=round(statistics.median(tick_s[1:]) * 1000, 1),
        pings_per_s_ingest_and_engine=round(args.vehicles / (on + decided)),
        events_per_s=round((sink.events - events_before) / args.ticks),
        events_by_type=sink.by_type,
        vehicles_inside_a_zone=worker.figures.vehicles_inside,
    )
    return figures


def core(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.zones core", description=__doc__)
    parser.add_argument("--zones", type=int, default=10_000)
    parser.add_argument("--vehicles", type=int, default=50_000)
    parser.add_argument("--ticks", type=int, default=10)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    figures = trio.run(measure, args)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"machine: {platform.platform()}, python {platform.python_version()}")
    for name, value in figures.items():
        print(f"{name:<34} {value}")


SUBCOMMANDS = {"http": "zones_http"}
"""Subcommands whose module is not ``bench.<name>``."""


def main(argv: list[str] | None = None) -> None:
    """``core`` (the default) here; ``http`` is ``bench.zones_http``'s main, any other
    subcommand ``bench.<name>``'s."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith("-") and argv[0] != "core":
        module = importlib.import_module(f"bench.{SUBCOMMANDS.get(argv[0], argv[0])}")
        sys.argv = [f"python -m bench.zones {argv[0]}", *argv[1:]]
        module.main()
        return
    core(argv[1:] if argv and argv[0] == "core" else argv)


if __name__ == "__main__":
    main()
