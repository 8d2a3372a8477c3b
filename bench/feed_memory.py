"""Where a feed's memory goes: N feeds on a tracker in this process, traced by tracemalloc.

    python -m bench.feed_memory --feeds 10000                  # idle feeds (an empty area)
    python -m bench.feed_memory --feeds 10000 --vehicles 5000  # live: city viewports, a fleet
    python -m bench.feed_memory --feeds 10000 --no-trace       # RSS only (tracemalloc costs)

The tracker runs here (``tracker.server.serve``) so that ``tracemalloc`` sees its heap; the
load clients (:mod:`bench.loadclient`, ``--bytes-only``: every byte read, nothing decoded)
and, live, the simulator (``tracker simulate``) are child processes. Once every feed is
subscribed (or ``--open-timeout`` passed: the feeds subscribed by then count) and
``--settle`` seconds have passed, it prints the Python heap per feed (the
traced difference from before the feeds), the lines that allocated most of it, and the
resident memory per feed (RSS difference; run ``--no-trace`` for a figure without the
tracer's own bookkeeping).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import random
import subprocess
import sys
import tracemalloc
from typing import Any

import trio

from bench.common import INGEST_KEY, rss_bytes, unlimited_config, viewport
from bench.fleet import EMPTY_AREA
from tracker.server import serve
from tracker.service import Tracker


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Start the tracker, the fleet (live) and the feeds; the heap and RSS per feed."""
    config = unlimited_config(tick_s=args.tick)
    tracker = Tracker(config)
    shutdown = trio.Event()
    rng = random.Random(args.seed)
    if args.vehicles:
        queries = [viewport(rng, 2.0, 3.0) for _ in range(args.feeds)]
    else:
        queries = [EMPTY_AREA] * args.feeds
    async with trio.open_nursery() as nursery:
        url = (await nursery.start(functools.partial(serve, config, shutdown, tracker=tracker)))[0]
        if args.vehicles:
            simulate = [sys.executable, "-m", "tracker", "simulate", "--url", url, "--quiet"]
            simulate += ["--ingest-key", INGEST_KEY, "--vehicles", str(args.vehicles)]
            simulate += ["--ping-interval-min-s", "1", "--ping-interval-max-s", "1"]
            simulate += ["--dropout-rate", "0", "--offline-rate", "0"]
            nursery.start_soon(
                functools.partial(
                    trio.run_process, simulate, stdout=subprocess.DEVNULL, check=False
                )
            )
            with trio.fail_after(60):
                while tracker.index.vehicle_count < args.vehicles * 0.95:
                    await trio.sleep(0.5)
        await trio.sleep(args.settle)
        gc.collect()
        before = tracemalloc.take_snapshot() if args.trace else None
        rss_before = rss_bytes_self()
        for number in range(args.clients):
            command = [sys.executable, "-m", "bench.loadclient", "--url", url]
            command += ["--warmup", "0", "--seconds", "3600", "--bytes-only"]
            command += ["--verify-every", str(10**9)]
            nursery.start_soon(
                functools.partial(
                    trio.run_process,
                    command,
                    stdin="\n".join(queries[number :: args.clients]).encode(),
                    stdout=subprocess.DEVNULL,
                    check=False,
                )
            )
        with trio.move_on_after(args.open_timeout):  # a loaded machine: not all may open
            while tracker.hub.subscriber_count < args.feeds:
                await trio.sleep(0.5)
        await trio.sleep(args.settle)
        gc.collect()
        after = tracemalloc.take_snapshot() if args.trace else None
        rss_after = rss_bytes_self()
        statistics = tracker.hub.statistics()
        feeds = statistics.subscribers
        shutdown.set()
        nursery.cancel_scope.cancel()
    figures: dict[str, Any] = {
        "feeds": feeds,
        "asked": args.feeds,
        "vehicles": args.vehicles,
        "traced": args.trace,
        "rss_before_mib": round(rss_before / 2**20, 1),
        "rss_after_mib": round(rss_after / 2**20, 1),
        "rss_kib_per_feed": round((rss_after - rss_before) / feeds / 1024, 2),
        "queued_bytes": statistics.queued_bytes,
        "deepest_outbox": statistics.deepest_outbox_batches,
    }
    if before is not None and after is not None:
        differences = after.compare_to(before, "lineno")
        growth = sum(d.size_diff for d in differences)
        figures["heap_kib_per_feed"] = round(growth / feeds / 1024, 2)
        figures["top_lines_bytes_per_feed"] = [
            (
                str(d.traceback[0]),
                round(d.size_diff / feeds),
                round(d.count_diff / feeds, 2),
            )
            for d in differences[: args.top]
        ]
    return figures


def rss_bytes_self() -> int:
    """This process's resident memory (the tracker runs here)."""
    return rss_bytes(os.getpid())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--feeds", type=int, default=2000)
    parser.add_argument("--vehicles", type=int, default=0, help="0: idle feeds on an empty area")
    parser.add_argument("--tick", type=float, default=0.1)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument(
        "--open-timeout", type=float, default=600.0, help="then measure the feeds subscribed"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-trace", dest="trace", action="store_false")
    args = parser.parse_args()
    if args.trace:
        tracemalloc.start()
    figures = trio.run(measure, args)
    top = figures.pop("top_lines_bytes_per_feed", [])
    print(json.dumps(figures, indent=1))
    for where, size, count in top:
        print(f"{size:>8} B {count:>6} blocks  {where}")


if __name__ == "__main__":
    main()
