"""Fan-out under a fleet: N vehicles at 1 Hz, M SSE subscribers on random city viewports.

    python -m bench.fleet --vehicles 50000 --subscribers 2000 --seconds 20
    python -m bench.fleet --idle 5000          # server memory per idle connection
    python -m bench.fleet --instances 2        # two trackers sharing a private Redis

Three kinds of process, so that none measures itself: the tracker (``tracker serve``), the
simulator (``tracker simulate``, every vehicle pinging once a second), and ``--clients``
load clients (:mod:`bench.loadclient`), which really parse and decode every event. After a
warm-up the clients count for ``--seconds``; the tracker's CPU time is read from ``/proc``
over the same window. Prints a table; ``--json FILE`` also writes the figures.

With ``--idle N`` it instead opens N feeds on an empty area and reports the tracker's
resident memory per connection.

Per-feed cost (issue 19): before the subscribers connect, the tracker's CPU and tick rate
are sampled for ``--base-seconds`` with the fleet running; the CPU it uses beyond that
while the feeds are served, divided by feeds and ticks delivered, is the CPU per feed
per tick. Its resident memory before and with the feeds gives the memory per live feed.
``--framework-feeds`` serves HTTP/1.1 feeds through Quart (``TRACKER_DIRECT_FEEDS=false``),
for the old path next to the new one.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import numpy as np
import trio
import trio.lowlevel

from bench.common import INGEST_KEY, cpu_seconds, rss_bytes, start_tracker, viewport
from tests.redis_server import RedisServer

EMPTY_AREA = "bbox=-30.01,-30.01,-30.0,-30.0"
"""A spot in the South Atlantic: a feed that never receives a vehicle."""


@dataclass
class FleetFigures:
    """One fan-out run, aggregated over every load client."""

    server: str
    instances: int
    vehicles: int
    subscribers: int
    seconds: float
    connected: int
    positions_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    bytes_per_position: float
    tracker_cpu_s_per_million: float
    tracker_cpu_cores: float
    tracker_rss_mib: float
    client_cpu_cores: float
    """The load clients' CPU in the measured window (opening the feeds is not in it)."""
    conflations: int
    errors: int
    path: str = "direct"
    tick_s: float = 1.0
    ticks_per_s: float = 0.0
    """Ticks delivered per second in the window (1 / tick_s if every tick arrived)."""
    base_cpu_cores: float = 0.0
    """The tracker's CPU before any feed connected (ingest and ticks only)."""
    events_per_s: float = 0.0
    """SSE events received per second over all feeds: one per feed per tick delivered."""
    feed_cpu_us_per_feed_tick: float = 0.0
    """Tracker CPU beyond the base per event received (one feed, one tick), in microseconds."""
    client_cpu_us_per_event: float = 0.0
    """The load clients' CPU per event received: the instrument's own cost."""
    rss_before_feeds_mib: float = 0.0
    kib_per_feed: float = 0.0
    """Tracker RSS with the feeds, less before them, per connected feed."""


async def metric(client: httpx.AsyncClient, name: str) -> float:
    """One value from the tracker's ``/metrics``."""
    text = (await client.get("/metrics")).text
    found = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def wait_for_metric(url: str, name: str, at_least: float) -> None:
    """Poll the tracker's ``/metrics`` (another process) until ``name`` reaches ``at_least``."""
    async with httpx.AsyncClient(base_url=url) as client:
        while await metric(client, name) < at_least:
            await trio.sleep(0.5)


async def run_clients(
    url: str,
    queries: list[str],
    clients: int,
    warmup: float,
    seconds: float,
    *,
    verify_every: int = 1,
    bytes_only: bool = False,
    module: str = "bench.loadclient",
) -> list[dict[str, Any]]:
    """Run the load clients in parallel, each with its share of the queries (``module``:
    the client, ``bench.linkclient`` for vehicle feeds)."""
    results: list[dict[str, Any]] = []
    options = ["--verify-every", str(verify_every)] * (verify_every != 1)
    options += ["--bytes-only"] * bytes_only

    async def one(share: list[str]) -> None:
        done = await trio.run_process(
            [
                *(sys.executable, "-m", module, "--url", url),
                *("--warmup", str(warmup), "--seconds", str(seconds), *options),
            ],
            stdin="\n".join(share).encode(),
            capture_stdout=True,
        )
        results.append(json.loads(done.stdout))

    async with trio.open_nursery() as clients_nursery:
        for number in range(clients):
            clients_nursery.start_soon(one, queries[number::clients])
    return results


def percentile_ms(histogram: np.ndarray, q: float) -> float:
    """The ``q``-th percentile of a one-bin-per-millisecond histogram."""
    total = histogram.sum()
    if not total:
        return float("nan")
    return float(np.searchsorted(np.cumsum(histogram), total * q / 100))


async def fan_out(args: argparse.Namespace) -> FleetFigures:
    """Fleet, tracker(s) and subscribers together; figures over the measured window.

    With ``--instances N`` (or ``--redis``) the trackers share a private redis-server
    (``--bus``); the simulator posts to the first, subscribers are spread over all.
    """
    redis = RedisServer() if args.instances > 1 or args.redis else None
    if redis is not None:
        redis.start()
    try:
        return await _fan_out(args, redis)
    finally:
        if redis is not None:
            redis.stop()


async def _fan_out(args: argparse.Namespace, redis: RedisServer | None) -> FleetFigures:
    rng = random.Random(args.seed)
    smallest, largest = (float(km) for km in args.viewport_km.split(","))
    queries = [viewport(rng, smallest, largest) for _ in range(args.subscribers)]
    async with trio.open_nursery() as bench_nursery:
        options: tuple[str, ...] = (
            ()
            if args.baseline
            else ("--tick", str(args.tick), "--h3-resolution", str(args.h3_resolution))
        )
        if redis is not None:
            options += ("--bus", redis.url)
        env = {"TRACKER_DIRECT_FEEDS": "false"} if args.framework_feeds else None
        trackers = [
            await start_tracker(bench_nursery, *options, baseline=args.baseline, env=env)
            for _ in range(args.instances)
        ]
        urls = [url for _, url in trackers]
        simulate = [sys.executable, "-m", "tracker", "simulate", "--url", urls[0], "--quiet"]
        simulate += ["--ingest-key", INGEST_KEY]
        simulate += ["--vehicles", str(args.vehicles), "--seed", str(args.seed)]
        simulate += ["--ping-interval-min-s", "1", "--ping-interval-max-s", "1"]
        simulate += ["--dropout-rate", "0", "--offline-rate", "0"]
        bench_nursery.start_soon(
            functools.partial(trio.run_process, simulate, stdout=subprocess.DEVNULL, check=False)
        )
        with trio.fail_after(60):
            await wait_for_metric(urls[0], "tracker_vehicles", args.vehicles * 0.95)
        clients_done, sampled = trio.Event(), trio.Event()
        window: dict[str, float] = {}
        pids = [process.pid for process, _ in trackers]
        base = await sample_base(urls[0], pids, args.base_seconds)

        async def sample_trackers() -> None:
            await trio.sleep(args.warmup)
            window["cpu"] = sum(map(cpu_seconds, pids))
            window["start"] = trio.current_time()
            await clients_done.wait()
            window["cpu"] = sum(map(cpu_seconds, pids)) - window["cpu"]
            window["wall"] = trio.current_time() - window["start"]
            window["rss"] = sum(map(rss_bytes, pids))
            sampled.set()

        bench_nursery.start_soon(sample_trackers)
        results: list[dict[str, Any]] = []

        async def clients_of(number: int) -> None:
            share = queries[number :: args.instances]
            results.extend(
                await run_clients(
                    urls[number],
                    share,
                    args.clients,
                    args.warmup,
                    args.seconds,
                    verify_every=args.verify_every,
                    bytes_only=args.bytes_only,
                )
            )

        async with trio.open_nursery() as clients_nursery:
            for number in range(args.instances):
                clients_nursery.start_soon(clients_of, number)
        clients_done.set()
        await sampled.wait()
        bench_nursery.cancel_scope.cancel()
    histogram = np.sum([np.array(r["latency_ms"]) for r in results], axis=0)
    positions = sum(r["positions"] for r in results)
    connected = sum(r["connected"] for r in results)
    # Ticks delivered: batches of distinct ticks read by the verified feeds in the window
    # (every tick changes some cell of a busy viewport), not the tracker's own count.
    ticks_per_s = max(r["ticks_seen"] for r in results) / args.seconds
    events_per_s = sum(r["events"] for r in results) / args.seconds
    feed_cores = window["cpu"] / window["wall"] - base["cores"]
    return FleetFigures(
        server="baseline" if args.baseline else ("tracker+redis" if redis else "tracker"),
        instances=args.instances,
        vehicles=args.vehicles,
        subscribers=args.subscribers,
        seconds=args.seconds,
        connected=sum(r["connected"] for r in results),
        positions_per_s=round(positions / args.seconds),
        latency_p50_ms=percentile_ms(histogram, 50),
        latency_p99_ms=percentile_ms(histogram, 99),
        latency_max_ms=float(np.flatnonzero(histogram)[-1]) if histogram.any() else float("nan"),
        bytes_per_position=round(sum(r["bytes"] for r in results) / max(1, positions), 2),
        tracker_cpu_s_per_million=round(window["cpu"] / max(1, positions) * 1e6, 2),
        tracker_cpu_cores=round(window["cpu"] / window["wall"], 2),
        tracker_rss_mib=round(window["rss"] / 2**20, 1),
        client_cpu_cores=round(sum(r["cpu_seconds"] for r in results) / args.seconds, 2),
        conflations=sum(r["snapshots_after_first"] for r in results),
        errors=sum(r.get("error_count", len(r["errors"])) for r in results),
        path="framework" if args.framework_feeds else "direct",
        tick_s=args.tick,
        ticks_per_s=round(ticks_per_s, 2),
        base_cpu_cores=round(base["cores"], 3),
        events_per_s=round(events_per_s),
        feed_cpu_us_per_feed_tick=round(feed_cores / max(1, events_per_s) * 1e6, 2),
        client_cpu_us_per_event=round(
            sum(r["cpu_seconds"] for r in results) / max(1, events_per_s * args.seconds) * 1e6, 2
        ),
        rss_before_feeds_mib=round(base["rss"] / 2**20, 1),
        kib_per_feed=round((window["rss"] - base["rss"]) / max(1, connected) / 1024, 1),
    )


async def sample_base(url: str, pids: list[int], seconds: float) -> dict[str, float]:
    """The trackers' CPU (cores) and RSS with the fleet running and no feed yet."""
    await trio.sleep(2.0)  # the fleet settles
    cpu, start = sum(map(cpu_seconds, pids)), trio.current_time()
    await trio.sleep(seconds)
    cores = (sum(map(cpu_seconds, pids)) - cpu) / (trio.current_time() - start)
    return {"cores": cores, "rss": float(sum(map(rss_bytes, pids)))}


async def idle_memory(args: argparse.Namespace) -> dict[str, float]:
    """Tracker memory per idle feed: RSS with N quiet feeds open, minus RSS before."""
    async with trio.open_nursery() as bench_nursery:
        env = {"TRACKER_DIRECT_FEEDS": "false"} if args.framework_feeds else None
        tracker, url = await start_tracker(bench_nursery, baseline=args.baseline, env=env)
        await trio.sleep(1.0)
        before = rss_bytes(tracker.pid)
        queries = [EMPTY_AREA] * args.idle
        bench_nursery.start_soon(
            functools.partial(run_clients, url, queries, args.clients, 0.0, 3600.0, bytes_only=True)
        )
        with trio.fail_after(120):
            await wait_for_metric(url, "tracker_subscribers", args.idle)
        await trio.sleep(2.0)
        after = rss_bytes(tracker.pid)
        bench_nursery.cancel_scope.cancel()
    return {
        "idle_connections": args.idle,
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "kib_per_idle_connection": round((after - before) / args.idle / 1024, 1),
        "path": "framework" if args.framework_feeds else "direct",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vehicles", type=int, default=50_000)
    parser.add_argument("--subscribers", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=2, help="load client processes")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--tick", type=float, default=1.0)
    parser.add_argument("--h3-resolution", type=int, default=7, help="the tracker's index")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--viewport-km", default="0.5,5", help="smallest,largest viewport height in km"
    )
    parser.add_argument("--idle", type=int, default=0, help="measure N idle feeds instead")
    parser.add_argument(
        "--instances", type=int, default=1, help="trackers sharing a private Redis (--bus)"
    )
    parser.add_argument(
        "--redis", action="store_true", help="use the Redis bus with one instance too"
    )
    parser.add_argument(
        "--baseline", action="store_true", help="serve with the naive JSON-per-ping baseline"
    )
    parser.add_argument(
        "--framework-feeds",
        action="store_true",
        help="serve HTTP/1.1 feeds through Quart (the old path), not tracker.direct",
    )
    parser.add_argument(
        "--base-seconds", type=float, default=5.0, help="CPU sampled before feeds connect"
    )
    parser.add_argument(
        "--verify-every", type=int, default=1, help="every K-th feed decodes every frame itself"
    )
    parser.add_argument(
        "--bytes-only", action="store_true", help="other feeds count bytes only (memory runs)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    figures = trio.run(idle_memory if args.idle else fan_out, args)
    table = figures if isinstance(figures, dict) else asdict(figures)
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores")
    for name, value in table.items():
        print(f"{name:<28} {value:>12}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": platform.platform(), **table}, out, indent=2)


if __name__ == "__main__":
    main()
