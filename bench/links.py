"""Tracking links at scale: N open links (one vehicle each) plus M area feeds over a fleet.

    python -m bench.links                      # 10,000 links + 1,000 area feeds, 50,000 vehicles
    python -m bench.links --links 2000 --areas 500 --vehicles 20000 --seconds 15
    python -m bench.links --core               # the core alone: no HTTP, no sockets
    python -m bench.links --memory --links 2000 --vehicles 10000 [--trace]  # bytes per link

Runs the fleet twice on fresh trackers, in one invocation so that the two compare on the
same machine state: first the area feeds alone, then the same area feeds plus the links.
Each link is a real link token (``Keyring.mint(vehicles=[id])``, the tracker started with
the same secret) read as ``/feed?token=...`` by :mod:`bench.linkclient`, which applies
every compact event (a broken chain is an error); area feeds are random city viewports as
in :mod:`bench.fleet`, read by :mod:`bench.loadclient`. Links and
area feeds are read by separate client processes, so each kind gets its own figures:
positions delivered, bytes per position on the wire (SSE framing included), latency from
the ping's timestamp to the event read. Over the measured window the tracker's CPU time
(its worker process, from ``/proc``) gives CPU per second and per delivered position; its
resident memory at the end, minus the area-only run's, divided by the links connected, gives memory
per link (open connection, subscription, outbox, per-vehicle frames included).

``--memory`` says where a link's memory goes: the tracker runs in this process
(``tracker.server.serve``, replay log at two ticks so that it does not grow meanwhile),
the fleet moves (``tracker simulate``), ``--links`` links are opened by one
:mod:`bench.linkclient`; once they are all open and ``--settle`` seconds have passed, it
prints the resident memory per link (the difference from before the links) and, with
``--trace``, the Python heap per link by the tracker line that allocated it (tracemalloc:
its own bookkeeping then inflates the RSS figure). The token cache (``Keyring``, 1,024
grants) holds part of the links' grants, a share that shrinks as links grow.

``--core`` measures what links cost the core itself, without HTTP: a
:class:`~tracker.service.Tracker` in this process, the fleet moving by random steps, the
area views and the links subscribed to its hub, every tick published and every
subscription's events rendered as a feed renders them. It reports CPU per tick with and
without the links (process time, median of the ticks), the bytes of each link's events
per position, and the memory the links' subscriptions hold (tracemalloc), per link.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
import tracemalloc
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import numpy as np
import trio
import trio.lowlevel

from bench.common import (
    CITY,
    INGEST_KEY,
    cpu_seconds,
    rss_bytes,
    start_tracker,
    unlimited_config,
    viewport,
)
from bench.fleet import metric, percentile_ms, run_clients, wait_for_metric
from simulator.fleet import Fleet, FleetConfig
from tracker.auth import Keyring
from tracker.config import TrackerConfig
from tracker.feed import render
from tracker.hub import Subscription
from tracker.pings import Ping
from tracker.regions import parse_area
from tracker.server import serve
from tracker.service import Tracker
from tracker.views import View

SECRET = "bench-links-secret-" + "x" * 32


@dataclass
class Group:
    """What one kind of feed received in the measured window."""

    feeds: int
    connected: int
    positions_per_s: float
    bytes_per_position: float
    latency_p50_ms: float
    latency_p99_ms: float
    errors: int
    conflations: int
    """Snapshots after a feed's first: the feed fell behind (client or server)."""
    client_cpu_cores: float
    """The load clients' CPU over the window (near their count: they were the bottleneck)."""


@dataclass
class Run:
    """One run: the tracker's cost and what each kind of feed received."""

    links: int
    areas: int
    vehicles: int
    tracker_cpu_cores: float
    tracker_cpu_us_per_position: float
    tracker_rss_mib: float
    view_frames_per_s: float
    """Frames encoded per second for vehicle feeds: one per watched vehicle and tick, shared
    by every feed of that vehicle (encode once)."""
    link_feeds: Group | None
    area_feeds: Group


def _group(results: list[dict[str, Any]], seconds: float) -> Group:
    histogram = np.sum([np.array(r["latency_ms"]) for r in results], axis=0)
    positions = sum(r["positions"] for r in results)
    return Group(
        feeds=sum(r["feeds"] for r in results),
        connected=sum(r["connected"] for r in results),
        positions_per_s=round(positions / seconds),
        bytes_per_position=round(sum(r["bytes"] for r in results) / max(1, positions), 1),
        latency_p50_ms=percentile_ms(histogram, 50),
        latency_p99_ms=percentile_ms(histogram, 99),
        errors=sum(r["error_count"] for r in results),
        conflations=sum(r["snapshots_after_first"] for r in results),
        client_cpu_cores=round(sum(r["cpu_seconds"] for r in results) / seconds, 2),
    )


async def one_run(args: argparse.Namespace, links: int) -> Run:
    """A fresh tracker, the simulated fleet, ``args.areas`` area feeds and ``links`` links."""
    rng = random.Random(args.seed)
    areas = [viewport(rng, 0.5, 5.0) for _ in range(args.areas)]
    ids = Fleet(FleetConfig(vehicles=args.vehicles, seed=args.seed), start_time=0).vehicle_ids
    keyring = Keyring([SECRET], resolution=7, max_cells=4000)
    followed = rng.sample(ids, links)
    tokens = [f"token={keyring.mint(ttl_s=3600, vehicles=[v])}" for v in followed]
    async with trio.open_nursery() as bench_nursery:
        options = ("--tick", str(args.tick), "--token-secrets", SECRET, "--max-connections", "0")
        tracker, url = await start_tracker(bench_nursery, *options)
        simulate = [sys.executable, "-m", "tracker", "simulate", "--url", url, "--quiet"]
        simulate += ["--ingest-key", INGEST_KEY]
        simulate += ["--vehicles", str(args.vehicles), "--seed", str(args.seed)]
        simulate += ["--ping-interval-min-s", "1", "--ping-interval-max-s", "1"]
        simulate += ["--dropout-rate", "0", "--offline-rate", "0"]
        bench_nursery.start_soon(
            functools.partial(trio.run_process, simulate, stdout=subprocess.DEVNULL, check=False)
        )
        with trio.fail_after(90):
            await wait_for_metric(url, "tracker_vehicles", args.vehicles * 0.95)
        window: dict[str, float] = {}
        done = trio.Event()

        async def frames_encoded(http: httpx.AsyncClient) -> float:
            try:  # an overloaded tracker may not answer /metrics in time: say so, go on
                return await metric(http, "tracker_view_frames_total")
            except httpx.HTTPError:
                return math.nan

        async def sample() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                await trio.sleep(args.warmup)
                window["cpu"] = cpu_seconds(tracker.pid)
                window["start"] = trio.current_time()
                window["frames"] = await frames_encoded(http)
                await done.wait()
                window["cpu"] = cpu_seconds(tracker.pid) - window["cpu"]
                window["wall"] = trio.current_time() - window["start"]
                window["rss"] = rss_bytes(tracker.pid)
                window["frames"] = await frames_encoded(http) - window["frames"]

        bench_nursery.start_soon(sample)
        results: dict[str, list[dict[str, Any]]] = {}

        async def read(kind: str, queries: list[str], clients: int, **how: Any) -> None:
            results[kind] = await run_clients(
                url, queries, clients, args.warmup, args.seconds, **how
            )

        async with trio.open_nursery() as clients_nursery:
            clients_nursery.start_soon(
                functools.partial(
                    read, "areas", areas, args.area_clients, verify_every=args.verify_every
                )
            )
            if links:
                clients_nursery.start_soon(
                    functools.partial(
                        read, "links", tokens, args.link_clients, module="bench.linkclient"
                    )
                )
        done.set()
        await trio.lowlevel.checkpoint()
        bench_nursery.cancel_scope.cancel()
    everything = results["areas"] + results.get("links", [])
    positions = sum(r["positions"] for r in everything)
    return Run(
        links=links,
        areas=args.areas,
        vehicles=args.vehicles,
        tracker_cpu_cores=round(window["cpu"] / window["wall"], 2),
        tracker_cpu_us_per_position=round(window["cpu"] / max(1, positions) * 1e6, 2),
        tracker_rss_mib=round(window["rss"] / 2**20, 1),
        view_frames_per_s=round(window["frames"] / window["wall"], 1),
        link_feeds=_group(results["links"], args.seconds) if links else None,
        area_feeds=_group(results["areas"], args.seconds),
    )


async def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Area feeds alone, then with the links; the links' share of the cost."""
    alone = await one_run(args, 0)
    both = await one_run(args, args.links)
    extra_rss = (both.tracker_rss_mib - alone.tracker_rss_mib) * 2**20
    connected = both.link_feeds.connected if both.link_feeds else 0
    return {
        "areas_alone": asdict(alone),
        "areas_and_links": asdict(both),
        "kib_per_link": round(extra_rss / max(1, connected) / 1024, 2),  # open ones
        "extra_cpu_cores_for_links": round(both.tracker_cpu_cores - alone.tracker_cpu_cores, 2),
    }


async def core(args: argparse.Namespace) -> dict[str, Any]:
    """The core alone: area views, then area views and links, over a moving fleet."""
    config = TrackerConfig(tick_s=1.0, history="", replay_ticks=2)  # the log at its size
    tracker = Tracker(config)
    rng = np.random.default_rng(args.seed)
    n = args.vehicles
    ids = [f"v{number:05d}" for number in range(n)]
    lat = CITY[0] + rng.uniform(-0.1, 0.1, n)
    lon = CITY[1] + rng.uniform(-0.16, 0.16, n)
    now = time.time() - 60
    area_rng = random.Random(args.seed)
    areas = [
        parse_area(
            urllib.parse.parse_qs(viewport(area_rng, 0.5, 5.0)),
            resolution=config.h3_resolution,
            max_cells=config.max_feed_cells,
        )
        for _ in range(args.areas)
    ]

    def step() -> None:
        nonlocal now
        lat[:] += rng.normal(0, 0.0001, n)
        lon[:] += rng.normal(0, 0.00015, n)
        now += 1
        pings = [
            Ping(vehicle_id=v, lat=a, lon=o, ts=now, speed=8.0, heading=90.0)
            for v, a, o in zip(ids, lat.tolist(), lon.tolist(), strict=True)
        ]
        tracker.ingest_pings(pings, now=now + 0.5)

    def measure(subs: list[Subscription], ticks: int) -> tuple[float, float, int, int]:
        """Median process time of a tick (publish, then render every owed event); bytes
        and events sent to ``subs`` (for links: positions, one vehicle each)."""
        times, sent, positions = [], 0, 0
        for _ in range(ticks):
            step()
            started = time.process_time()
            tracker.tick()
            rendered = [(sub, render(sub.take(), sub, tracker.hub)) for sub in subs]
            times.append(time.process_time() - started)
            sent += sum(len(chunk) for _, chunk in rendered)
            positions += sum(1 for _, chunk in rendered if chunk)  # a link: one vehicle
        return float(np.median(times)), times[-1], sent, positions

    step()
    tracker.tick()
    area_subs = [tracker.hub.subscribe(View(cells), is_json=False) for cells in areas]
    for sub in area_subs:
        tracker.hub.start(sub, None)
    alone, _, _, _ = measure(area_subs, args.ticks)
    measure([], 3)  # every structure at its steady size before memory is compared
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    links = [
        tracker.hub.subscribe(
            View(None, vehicles=frozenset({v})), is_json=False, expires=now + 3600, jti=f"j{v}"
        )
        for v in random.Random(args.seed).sample(ids, args.links)
    ]
    for sub in links:
        tracker.hub.start(sub, None)
    held = tracemalloc.take_snapshot().compare_to(before, "filename")  # at rest, no tick
    if os.environ.get("LINKS_MEMORY_TOP"):
        for line in tracemalloc.take_snapshot().compare_to(before, "lineno")[:12]:
            print(line, file=sys.stderr)
    tracemalloc.stop()
    measure(links, 2)  # the links' frames in steady state
    with_links, _, _, _ = measure(area_subs + links, args.ticks)
    _, _, link_bytes, link_positions = measure(links, args.ticks)
    frames = tracker.metrics.view_frames
    return {
        "vehicles": n,
        "areas": args.areas,
        "links": args.links,
        "tick_cpu_ms_areas_alone": round(alone * 1000, 1),
        "tick_cpu_ms_with_links": round(with_links * 1000, 1),
        "cpu_us_per_link_position": round((with_links - alone) / max(1, args.links) * 1e6, 2),
        "link_bytes_per_position": round(link_bytes / max(1, link_positions), 1),
        "core_bytes_per_link": round(sum(d.size_diff for d in held) / max(1, args.links)),
        "view_frames_encoded": frames,
    }


async def memory(args: argparse.Namespace) -> dict[str, Any]:
    """Open ``args.links`` links on a tracker in this process: memory per link."""
    config = unlimited_config(
        tick_s=args.tick, max_connections=0, token_secrets=SECRET, replay_ticks=2
    )
    tracker = Tracker(config)
    ids = Fleet(FleetConfig(vehicles=args.vehicles, seed=args.seed), start_time=0).vehicle_ids
    keyring = Keyring([SECRET], resolution=7, max_cells=4000)
    followed = random.Random(args.seed).sample(ids, args.links)
    # Encoded before the first snapshot: what the client is given is not the tracker's.
    tokens = "\n".join(f"token={keyring.mint(ttl_s=3600, vehicles=[v])}" for v in followed)
    stdin = tokens.encode()
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        url = (await nursery.start(functools.partial(serve, config, shutdown, tracker=tracker)))[0]
        simulate = [sys.executable, "-m", "tracker", "simulate", "--url", url, "--quiet"]
        simulate += ["--ingest-key", INGEST_KEY, "--vehicles", str(args.vehicles)]
        simulate += ["--seed", str(args.seed), "--dropout-rate", "0", "--offline-rate", "0"]
        simulate += ["--ping-interval-min-s", "1", "--ping-interval-max-s", "1"]
        nursery.start_soon(
            functools.partial(trio.run_process, simulate, stdout=subprocess.DEVNULL, check=False)
        )
        with trio.fail_after(90):
            while tracker.index.vehicle_count < args.vehicles * 0.95:
                await trio.sleep(0.5)
        await trio.sleep(args.settle)
        before = _heap(args.trace)
        rss_before = rss_bytes(os.getpid())
        read = [sys.executable, "-m", "bench.linkclient", "--url", url]
        read += ["--warmup", "0", "--seconds", "3600"]
        nursery.start_soon(
            functools.partial(
                trio.run_process,
                read,
                stdin=stdin,
                stdout=subprocess.DEVNULL,
                check=False,
            )
        )
        with trio.move_on_after(300):
            while tracker.hub.subscriber_count < args.links:
                await trio.sleep(0.5)
        await trio.sleep(args.settle)
        after = _heap(args.trace)
        rss_after = rss_bytes(os.getpid())
        links = tracker.hub.subscriber_count
        shutdown.set()
        nursery.cancel_scope.cancel()
    figures: dict[str, Any] = {
        "links": links,
        "vehicles": args.vehicles,
        "traced": args.trace,
        "rss_kib_per_link": round((rss_after - rss_before) / max(1, links) / 1024, 2),
    }
    if before is not None and after is not None:
        figures.update(_heap_per_link(before, after, links, args.top))
    return figures


def _heap(trace: bool) -> tracemalloc.Snapshot | None:
    gc.collect()
    return tracemalloc.take_snapshot() if trace else None


def _heap_per_link(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, links: int, top: int
) -> dict[str, Any]:
    """The heap grown per link, and by site: the innermost line of ``tracker/`` on the
    allocation's stack (a line of a library otherwise), which names what holds it."""
    by_site: collections.Counter[str] = collections.Counter()
    for difference in after.compare_to(before, "traceback"):
        frames = list(difference.traceback)  # oldest first
        ours = [f for f in frames if "/tracker/" in f.filename]
        where = (ours or frames)[-1]
        site = f"{where.filename.rpartition('/site-packages/')[2]}:{where.lineno}"
        by_site[site.rpartition("/tracker/")[2] if "/tracker/" in site else site] += (
            difference.size_diff
        )
    return {
        "heap_bytes_per_link": round(sum(by_site.values()) / max(1, links)),
        "heap_bytes_per_link_by_site": {
            site: round(size / max(1, links)) for site, size in by_site.most_common(top)
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--links", type=int, default=10_000)
    parser.add_argument("--areas", type=int, default=1000)
    parser.add_argument("--vehicles", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--link-clients", type=int, default=2, help="load client processes")
    parser.add_argument("--area-clients", type=int, default=1, help="load client processes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tick", type=float, default=1.0, help="the tracker's tick (s)")
    parser.add_argument(
        "--verify-every", type=int, default=10, help="area clients: every K-th feed decodes all"
    )
    parser.add_argument("--core", action="store_true", help="the core alone, in this process")
    parser.add_argument("--memory", action="store_true", help="memory per link, in this process")
    parser.add_argument("--trace", action="store_true", help="--memory: the heap by site")
    parser.add_argument("--settle", type=float, default=5.0, help="--memory: seconds")
    parser.add_argument("--top", type=int, default=30, help="--memory --trace: sites shown")
    parser.add_argument("--ticks", type=int, default=10, help="--core: ticks measured")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.trace:
        tracemalloc.start(16)
    figures = trio.run(memory if args.memory else core if args.core else compare, args)
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores")
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": platform.platform(), **figures}, out, indent=2)


if __name__ == "__main__":
    main()
