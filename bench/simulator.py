"""Can one simulator process drive N vehicles at 1 ping/s into a real tracker?

    python -m bench.simulator --vehicles 100000 --seconds 30

Starts ``tracker serve`` as its own process on a free loopback port (as in production:
two processes, sharing this machine's cores), then runs the fleet simulator in this
process with every vehicle pinging once a second (no dropouts or offline devices, so N
vehicles make N pings per second; duplicates and late pings as by default). After a
warm-up it samples, once a second, how many pings were generated and delivered
(acknowledged by the tracker) and how long the queue is, and reads both processes' CPU
time from ``/proc``. Prints a table; ``--json`` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
from dataclasses import asdict, dataclass

import trio

from bench.common import INGEST_KEY, cpu_seconds, start_tracker
from simulator.fleet import FleetConfig
from simulator.sender import SendConfig, Sender

WARM_UP_S = 5.0


@dataclass
class Figures:
    """What one run measured (rates are medians of one-second samples)."""

    vehicles: int
    speedup: float
    seconds: float
    generated_per_s: float
    delivered_per_s: float
    delivered_share: float
    max_queued: int
    dropped: int
    simulator_cpu_per_s: float
    tracker_cpu_per_s: float
    simulator_rss_mib: float


async def measure(vehicles: int, seconds: float, connections: int, speedup: float) -> Figures:
    """Run the simulator against a tracker process and sample it once a second."""
    async with trio.open_nursery() as bench_nursery:
        tracker, url = await start_tracker(bench_nursery)
        fleet = FleetConfig(
            vehicles=vehicles,
            ping_interval_min_s=1,
            ping_interval_max_s=1,
            dropout_rate=0,  # every vehicle pings every second: N pings/s, not fewer
            offline_rate=0,
        )
        send = SendConfig(
            url=url, ingest_key=INGEST_KEY, connections=connections, speedup=speedup, quiet=True
        )
        sender = Sender(fleet, send, out=io.StringIO())
        bench_nursery.start_soon(sender.run)
        await trio.sleep(WARM_UP_S)
        stats = sender.stats
        generated, delivered, queued = [], [], []
        cpu_start = (cpu_seconds(os.getpid()), cpu_seconds(tracker.pid))
        wall_start = trio.current_time()
        last = (stats.generated, stats.sent)
        while trio.current_time() - wall_start < seconds:
            await trio.sleep(1.0)
            generated.append(stats.generated - last[0])
            delivered.append(stats.sent - last[1])
            queued.append(stats.pending)
            last = (stats.generated, stats.sent)
        wall = trio.current_time() - wall_start
        cpu_end = (cpu_seconds(os.getpid()), cpu_seconds(tracker.pid))
        bench_nursery.cancel_scope.cancel()
    return Figures(
        vehicles=vehicles,
        speedup=speedup,
        seconds=round(wall, 1),
        generated_per_s=statistics.median(generated),
        delivered_per_s=statistics.median(delivered),
        delivered_share=round(sum(delivered) / max(1, sum(generated)), 3),
        max_queued=max(queued),
        dropped=stats.dropped,
        simulator_cpu_per_s=round((cpu_end[0] - cpu_start[0]) / wall, 2),
        tracker_cpu_per_s=round((cpu_end[1] - cpu_start[1]) / wall, 2),
        simulator_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vehicles", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument(
        "--speedup", type=float, default=1.0, help="offer vehicles x speedup pings/s (ingest load)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    figures = trio.run(measure, args.vehicles, args.seconds, args.connections, args.speedup)
    if args.json:
        print(json.dumps({"machine": platform.platform(), **asdict(figures)}))
        return
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores")
    for name, value in asdict(figures).items():
        print(f"{name:<22} {value:>12}")


if __name__ == "__main__":
    main()
