"""History benchmarks (issue 15): one section per part, each printing its figures.

    python -m bench.history store     # the stores alone: append, compact, bytes, queries
    python -m bench.history ingest    # /ingest with history on (embedded, PostgreSQL) vs off
    python -m bench.history query     # track and area queries over HTTP under ingest load
    python -m bench.history replay    # an hour replayed through the feed
    python -m bench.history loop      # the event loop's CPU per ingested ping, in-process

Each section is a subcommand registered in :func:`main` by one ``add_<section>`` function
that adds its parser and sets ``run`` to a function from the parsed arguments to a dict
of figures; :func:`main` prints them as a table, and with ``--json FILE`` writes them.
Figures, machine and commands go to ``docs/performance.md`` and ``docs/history.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import numpy as np
import trio

from bench import ingest as bench_ingest
from bench.common import CITY, start_tracker
from bench.fleet import metric
from bench.history_store import add_store
from tracker.cli import GC_THRESHOLDS
from tracker.config import TrackerConfig
from tracker.frames import encode_tick
from tracker.geoindex import GeoIndex
from tracker.history.store import open_store
from tracker.ingest import decode_body
from tracker.pings import Ping

Figures = dict[str, Any]
Run = Callable[[argparse.Namespace], Figures]
Sections = Any
"""argparse's subparsers action (its class is private)."""


def report(figures: Figures, json_path: str | None) -> None:
    """Print ``figures`` one per line; with ``json_path``, also write them there as JSON."""
    width = max((len(name) for name in figures), default=0)
    for name, value in figures.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        print(f"{name:<{width}}  {shown}")
    if json_path:
        with open(json_path, "w") as out:
            json.dump({"machine": platform.platform(), **figures}, out, indent=2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    sections: Sections = parser.add_subparsers(dest="section", required=True)
    for add in SECTIONS:
        add(sections)
    args = parser.parse_args(argv)
    report(args.run(args), args.json)


SECTIONS: list[Callable[[Sections], None]] = [add_store]
"""Each section's ``add_<section>(sections)``, in the order ``--help`` lists them."""


def add_ingest(sections: Sections) -> None:
    """``ingest``: pings/s through ``POST /ingest`` with history off, embedded, PostgreSQL.

    The load and the figures are :mod:`bench.ingest`'s (a tracker process, keep-alive
    connections posting prebuilt msgpack batches back to back); with history on it adds
    how fast history committed over the same seconds and what was still queued at the
    end: history keeps up when it commits what ingest accepts, with nothing refused.
    """
    parser = sections.add_parser(
        "ingest", help="ingest with history off, embedded and (optionally) PostgreSQL"
    )
    bench_ingest.add_arguments(parser)
    parser.add_argument(
        "--postgres",
        metavar="URL",
        default="",
        help="also measure --history URL (a database of yours: the benchmark writes to it)",
    )
    parser.add_argument(
        "--stores", default="off,sqlite", help="which of off, sqlite (and postgres) to run"
    )
    parser.set_defaults(run=run_ingest)


def run_ingest(args: argparse.Namespace) -> Figures:
    figures: Figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-history-") as scratch:
        path = os.path.join(scratch, "history.sqlite3")
        targets = {"off": "off", "sqlite": path, "postgres": args.postgres}
        chosen = args.stores.split(",") + (["postgres"] if args.postgres else [])
        for label in dict.fromkeys(chosen):
            measured = trio.run(bench_ingest.measure, args, "--history", targets[label])
            for name, value in measured.items():
                if label != "off" or not name.startswith("history_"):
                    figures[f"{label}_{name}"] = value
            if label == "sqlite":
                store = open_store(path)
                store.migrate()
                stats = store.stats()
                store.close()
                figures["sqlite_positions_stored"] = stats.positions
                figures["sqlite_bytes_per_position_raw"] = round(
                    stats.bytes_on_disk / max(1, stats.positions), 2
                )
    return figures


SECTIONS.append(add_ingest)


# --- query: track and area queries over HTTP under ingest load (issue 15) ------------------

DAY_S = 86_400
QUERY_TRUCK = "q-truck"
"""The vehicle whose day track is queried: one ping a second for a day (86,400)."""


def add_query(sections: Sections) -> None:
    parser = sections.add_parser(
        "query",
        help="p99 of a day's track and of an hour's area query over HTTP, under ingest load",
        description=_query_doc(),
    )
    parser.add_argument("--queries", type=int, default=200, help="track queries per format")
    parser.add_argument("--area-queries", type=int, default=20)
    parser.add_argument("--fleet", type=int, default=2000, help="vehicles in the area's hour")
    parser.add_argument("--fleet-every-s", type=float, default=10.0, help="their ping interval")
    parser.add_argument("--load-vehicles", type=int, default=50_000, help="0: no ingest load")
    parser.add_argument("--load-connections", type=int, default=4)
    parser.add_argument(
        "--load-rate",
        type=float,
        default=150_000,
        help="pings/s the load posts (the issue's sustained ingest target); 0: flat out, "
        "as fast as the tracker acknowledges (beyond saturation)",
    )
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.set_defaults(run=run_query)


def _query_doc() -> str:
    return """A store file is filled before the tracker starts: q-truck's last day (one ping a
second, 86,400 positions) and a city fleet's hour (--fleet vehicles, one ping every
--fleet-every-s seconds, ending an hour ago), compacted into track chunks as a running
tracker does after two minutes. A tracker serves that file while a separate process
posts pings as fast as it acknowledges them (bench.ingest's load: --load-vehicles
vehicles, every ping kept in history too). Meanwhile this process asks, one at a time:
GET /vehicles/q-truck/track over the whole day (limit 100,000: one page) in msgpack and
in JSON, then GET /history over the fleet's hour for the central part of the city, every
page followed. Latency is measured by the client, body read included."""


def run_query(args: argparse.Namespace) -> Figures:
    with tempfile.TemporaryDirectory(prefix="bench-history-") as directory:
        path = f"{directory}/history.sqlite3"
        now = time.time()
        figures = _fill_store(path, now, args.fleet, args.fleet_every_s)
        figures.update(_store_alone(path, now, args.queries))
        figures.update(trio.run(_query_under_load, args, path, now))
    return figures


def _fill_store(path: str, now: float, fleet: int, every_s: float) -> Figures:
    """q-truck's day and the fleet's hour, appended and compacted (what a tracker leaves)."""
    rng = np.random.default_rng(15)
    store = open_store(path)
    store.migrate()
    started = time.perf_counter()
    steps = rng.normal(0, 4e-5, (DAY_S, 2)).cumsum(axis=0)  # a wandering drive around town
    day = [
        Ping(
            vehicle_id=QUERY_TRUCK,
            lat=CITY[0] + float(lat),
            lon=CITY[1] + float(lon),
            ts=now - DAY_S + second,
            speed=8.0,
            heading=float(second % 360),
        )
        for second, (lat, lon) in enumerate(steps.tolist())
    ]
    for at in range(0, len(day), 3600):
        store.append(day[at : at + 3600])
    hour_start = now - 2 * 3600
    positions = rng.uniform([-0.06, -0.1], [0.06, 0.1], (fleet, 2)) + CITY
    for tick in np.arange(hour_start, hour_start + 3600, every_s).tolist():
        positions += rng.normal(0, 1e-4, positions.shape)
        store.append(
            [
                Ping(vehicle_id=f"f{n:05d}", lat=lat, lon=lon, ts=tick, speed=5.0, heading=0.0)
                for n, (lat, lon) in enumerate(positions.tolist())
            ]
        )
    store.compact(now)
    stats = store.stats()
    store.close()
    return {
        "stored_positions": stats.positions,
        "store_fill_s": round(time.perf_counter() - started, 1),
        "bytes_per_position": round(stats.bytes_on_disk / max(1, stats.positions), 2),
    }


def _store_alone(path: str, now: float, queries: int) -> Figures:
    """The day's track read from the store alone, no HTTP, no load: the store's share."""
    store = open_store(path)
    store.migrate()
    latencies = []
    for _ in range(queries):
        began = time.perf_counter()
        store.track(QUERY_TRUCK, now - DAY_S, now + 1, limit=100_000)
        latencies.append(time.perf_counter() - began)
    store.close()
    return _percentiles("store_track_day_alone", latencies)


async def _query_under_load(args: argparse.Namespace, path: str, now: float) -> Figures:
    figures: Figures = {}
    async with trio.open_nursery() as bench_nursery:
        _, url = await start_tracker(bench_nursery, "--history", path)
        load = None
        if args.load_vehicles:
            spawn = multiprocessing.get_context("spawn")  # its own process: not our CPU
            load = spawn.Process(
                target=_post_load,
                args=(url, args.load_vehicles, args.load_connections, args.load_rate),
            )
            load.start()
        try:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                day = {"from": f"{now - DAY_S:.3f}", "to": f"{now + 1:.3f}"}
                await trio.sleep(args.warmup)
                for _ in range(3):  # a slow first page starts the history reader processes
                    await client.get(f"/vehicles/{QUERY_TRUCK}/track", params=day)
                await trio.sleep(args.warmup)  # ... as on a tracker answering queries a while
                accepted_before = await _accepted(client)
                load_started = time.perf_counter()
                latencies: dict[str, list[float]] = {"healthz": [], "msgpack": [], "json": []}
                sizes = {}
                for _ in range(args.queries):
                    # Interleaved, so that each sees the same load: /healthz is what any
                    # request waits for the loop (the yardstick), the tracks what they add.
                    for name in latencies:
                        path = "/healthz" if name == "healthz" else f"/vehicles/{QUERY_TRUCK}/track"
                        params = {} if name == "healthz" else {**day, "format": name}
                        began = time.perf_counter()
                        response = await client.get(path, params=params)
                        latencies[name].append(time.perf_counter() - began)
                        response.raise_for_status()
                        sizes[name] = len(response.content)
                figures.update(_percentiles("healthz", latencies["healthz"]))
                for fmt in ("msgpack", "json"):
                    figures.update(_percentiles(f"track_day_{fmt}", latencies[fmt]))
                    figures[f"track_day_{fmt}_bytes"] = sizes[fmt]
                hour = {"from": f"{now - 2 * 3600:.3f}", "to": f"{now - 3600:.3f}"}
                bbox = f"{CITY[1] - 0.05},{CITY[0] - 0.03},{CITY[1] + 0.05},{CITY[0] + 0.03}"
                area_latencies, positions, pages = [], 0, 0
                for _ in range(args.area_queries):
                    began = time.perf_counter()
                    positions, pages = await _all_pages(client, {**hour, "bbox": bbox})
                    area_latencies.append(time.perf_counter() - began)
                figures.update(_percentiles("area_hour", area_latencies))
                figures["area_hour_positions"] = positions
                figures["area_hour_pages"] = pages
                elapsed = time.perf_counter() - load_started
                accepted = await _accepted(client) - accepted_before
                figures["ingest_pings_per_s_meanwhile"] = round(accepted / elapsed)
                figures["longest_tick_ms"] = round(
                    1000 * await metric(client, "tracker_tick_duration_max_seconds")
                )
                figures["longest_loop_step_ms"] = round(
                    1000 * await metric(client, "tracker_loop_step_max_seconds")
                )
                figures["longest_gc_pause_ms"] = round(
                    1000
                    * max(
                        [
                            await metric(client, f"tracker_gc_gen{generation}_pause_max_seconds")
                            for generation in range(3)
                        ]
                    ),
                    1,
                )
                figures["history_compacted_positions"] = await metric(
                    client, "tracker_history_compacted_positions_total"
                )
                figures["history_refused_pings"] = await metric(
                    client, "tracker_history_refused_pings_total"
                )
        finally:
            if load is not None:
                load.terminate()
                load.join()
            bench_nursery.cancel_scope.cancel()
    return figures


async def _all_pages(client: httpx.AsyncClient, params: dict[str, str]) -> tuple[int, int]:
    """Positions and pages of an area query, every page followed (msgpack)."""
    positions, pages, cursor = 0, 0, None
    while True:
        query = {**params, "format": "msgpack", **({"cursor": cursor} if cursor else {})}
        response = await client.get("/history", params=query)
        response.raise_for_status()
        page = msgspec.msgpack.decode(response.content)
        positions += page["count"]
        pages += 1
        cursor = page["cursor"]
        if cursor is None:
            return positions, pages


async def _accepted(client: httpx.AsyncClient) -> float:
    return float(await metric(client, "tracker_pings_accepted_total"))


def _percentiles(name: str, latencies: list[float]) -> Figures:
    ms = np.array(latencies) * 1000
    return {
        f"{name}_p50_ms": round(float(np.percentile(ms, 50)), 1),
        f"{name}_p99_ms": round(float(np.percentile(ms, 99)), 1),
        f"{name}_max_ms": round(float(ms.max()), 1),
    }


def _post_load(url: str, vehicles: int, connections: int, rate: float) -> None:
    """The ingest load, in its own process: bench.ingest's rounds (every vehicle once),
    one every ``vehicles / rate`` seconds, or back to back with ``rate`` 0."""
    maker = bench_ingest.BodyMaker(vehicles, batch=5000)
    counts = bench_ingest.Counts()
    if not rate:
        trio.run(bench_ingest.post_rounds, url, maker, connections, math.inf, counts)
    else:
        trio.run(_post_paced, url, maker, connections, vehicles / rate, counts)


async def _post_paced(
    url: str,
    maker: bench_ingest.BodyMaker,
    connections: int,
    period_s: float,
    counts: bench_ingest.Counts,
) -> None:
    """A round every ``period_s`` (a late round starts at once, without catching up)."""
    async with httpx.AsyncClient(
        base_url=url, timeout=30, limits=httpx.Limits(max_connections=connections)
    ) as client:
        next_at = trio.current_time()
        while True:
            bodies = maker.round()
            async with trio.open_nursery() as round_nursery:
                for number in range(connections):
                    round_nursery.start_soon(
                        bench_ingest.post_all, client, bodies[number::connections], counts
                    )
            next_at = max(next_at + period_s, trio.current_time() - period_s)
            await trio.sleep_until(next_at)


SECTIONS.append(add_query)


# --- replay: a stored hour played through the feed (issue 15) -------------------------------


def add_replay(sections: Sections) -> None:
    parser = sections.add_parser(
        "replay",
        help="an hour of a fleet replayed through GET /feed?...&from=&speed=",
        description="""A store is filled with a city fleet's hour (--fleet vehicles, one ping
every --fleet-every-s seconds, ending an hour ago) and compacted, then served by a
tracker (no other load). The bench follows GET /feed over the city centre with
from= and to= that hour at --speed, reading every event until `end`: time to the
snapshot, wall time of the whole replay, events, bytes and history seconds played per
wall second (the ideal is --speed).""",
    )
    parser.add_argument("--fleet", type=int, default=2000)
    parser.add_argument("--fleet-every-s", type=float, default=10.0)
    parser.add_argument("--speed", type=float, default=1000.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.set_defaults(run=run_replay)


def run_replay(args: argparse.Namespace) -> Figures:
    with tempfile.TemporaryDirectory(prefix="bench-history-") as directory:
        path = f"{directory}/history.sqlite3"
        now = time.time()
        figures = _fill_store(path, now, args.fleet, args.fleet_every_s)
        figures.update(trio.run(_replays, args, path, now))
    return figures


async def _replays(args: argparse.Namespace, path: str, now: float) -> Figures:
    start, end = now - 2 * 3600, now - 3600
    bbox = f"{CITY[1] - 0.05},{CITY[0] - 0.03},{CITY[1] + 0.05},{CITY[0] + 0.03}"
    query = {"bbox": bbox, "from": f"{start:.3f}", "to": f"{end:.3f}", "speed": f"{args.speed:g}"}
    firsts, walls, events, received = [], [], 0, 0
    async with trio.open_nursery() as bench_nursery:
        _, url = await start_tracker(bench_nursery, "--history", path)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for _ in range(args.runs):
                began = time.perf_counter()
                first, events, received = None, 0, 0
                async with client.stream("GET", "/feed", params=query) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        received += len(line) + 1
                        if line.startswith("event:"):
                            events += 1
                            first = first or time.perf_counter() - began
                            if line.split(":", 1)[1].strip() == "end":
                                break
                walls.append(time.perf_counter() - began)
                firsts.append(first or math.nan)
        bench_nursery.cancel_scope.cancel()
    wall = float(np.median(walls))
    return {
        "replay_speed": args.speed,
        "replay_snapshot_ms_median": round(float(np.median(firsts)) * 1000, 1),
        "replay_wall_s_median": round(wall, 2),
        "replay_history_s_per_wall_s": round((end - start) / wall, 1),
        "replay_events": events,
        "replay_bytes": received,
    }


SECTIONS.append(add_replay)


# --- loop: the event loop's CPU per ping for the query bench's load (issue 15) -------------


def add_loop(sections: Sections) -> None:
    parser = sections.add_parser(
        "loop",
        help="CPU per ping of what the event loop does for ingest: decode, apply, tick",
        description="""The query bench's load in-process, without HTTP: bench.ingest's
bodies (--vehicles vehicles wandering about the city, batches of 5,000) decoded, applied
to a GeoIndex, and published by ticks of --per-tick pings (150,000 pings/s at the
default 10 ticks a second): the tick's slices prepared --slice vehicles at a time, then
advanced and encoded. CPU time (process_time) per ping of each phase, median of
--rounds rounds: what the event loop spends per ping whatever else the machine runs.
The collector's thresholds are tracker serve's.""",
    )
    parser.add_argument("--vehicles", type=int, default=50_000)
    parser.add_argument("--per-tick", type=int, default=15_000)
    parser.add_argument("--slice", type=int, default=1000, help="vehicles per tick slice")
    parser.add_argument("--rounds", type=int, default=12)
    parser.set_defaults(run=run_loop)


def run_loop(args: argparse.Namespace) -> Figures:
    gc.set_threshold(*GC_THRESHOLDS)  # as in a serving process (tracker serve)
    config = TrackerConfig()
    index = GeoIndex(
        resolution=config.h3_resolution,
        stale_after_s=config.stale_after_s,
        remove_after_s=config.remove_after_s,
    )
    maker = bench_ingest.BodyMaker(args.vehicles, batch=5000)
    spent: dict[str, list[float]] = {"decode": [], "apply": [], "prepare": [], "publish": []}
    pings = 0
    for number in range(args.rounds + 1):  # the first round adds the vehicles: not counted
        round_s = dict.fromkeys(spent, 0.0)
        decoded: list[Ping] = []
        began = time.process_time()
        for body in maker.round():
            batch, _ = decode_body(body, "application/msgpack", config)
            decoded.extend(ping for ping in batch if ping is not None)
        round_s["decode"] = time.process_time() - began
        for start in range(0, len(decoded), args.per_tick):
            now = time.time()
            began = time.process_time()
            for ping in decoded[start : start + args.per_tick]:
                index.apply(ping, now)
            round_s["apply"] += time.process_time() - began
            began = time.process_time()
            publication = index.take_pending()
            while publication.prepare(args.slice):
                pass
            round_s["prepare"] += time.process_time() - began
            began = time.process_time()
            encode_tick(index.advance(now, publication))
            round_s["publish"] += time.process_time() - began
        if number:
            for phase, seconds in round_s.items():
                spent[phase].append(seconds / len(decoded))
        pings = len(decoded)
    figures: Figures = {"pings_per_round": pings, "pings_per_tick": args.per_tick}
    for phase, per_ping in spent.items():
        figures[f"{phase}_us_per_ping"] = round(float(np.median(per_ping)) * 1e6, 3)
    total = sum(figures[f"{phase}_us_per_ping"] for phase in spent)
    figures["total_us_per_ping"] = round(total, 3)
    figures["loop_share_at_150000_per_s"] = round(total * 150_000 / 1e6, 3)
    return figures


SECTIONS.append(add_loop)


if __name__ == "__main__":
    sys.exit(main())
