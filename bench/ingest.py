"""Ingest throughput: how many pings per second one tracker process accepts.

    python -m bench.ingest --vehicles 50000 --seconds 20
    python -m bench.ingest --protocol osmand --vehicles 20000 --connections 16

With ``--protocol`` other than ``ingest``, the pings come one request (or message) per
ping the way devices send them (``bench.devices``), and the rate is read from the
tracker's own counter of accepted pings; ``tracker_cpu_us_per_ping`` says what a ping
costs the tracker, whatever else shares the machine.

A lean load generator, so the figure is the tracker's and not the client's: msgpack
bodies are built with NumPy from a fixed byte layout (a map of six fields per ping,
floats as big-endian float64, as msgspec itself encodes them), only timestamps and
positions change between rounds, and ``--connections`` keep-alive connections POST them
back to back (closed loop: each sends its next batch when the previous one is
acknowledged). Every vehicle sends one ping per round, always newer than its last, so
every ping is accepted and the tracker's ticks publish every vehicle every second.

Reports accepted pings per second (median of one-second samples), the tracker's CPU
cores, and its longest tick: a tick that took longer than the tick interval would mean
the index is not keeping up, whatever the ingest rate says.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass

import httpx
import numpy as np
import trio

from bench.common import CITY, INGEST_HEADERS, cpu_seconds, start_tracker
from bench.devices import DEVICE_PROTOCOLS, device_load, tracker_options
from bench.fleet import metric

ID_WIDTH = 8
FIELDS = ("lat", "lon", "ts", "speed", "heading")


def ping_layout() -> np.dtype:
    """One ping as msgpack bytes: fixmap(6), then key/value pairs of fixed width."""
    layout: list[tuple[str, str]] = [("map", "u1"), ("k_id", f"S{len('vehicle_id') + 1}")]
    layout += [("id_head", "u1"), ("id", f"S{ID_WIDTH}")]
    for name in FIELDS:
        layout += [(f"k_{name}", f"S{len(name) + 1}"), (f"t_{name}", "u1"), (name, ">f8")]
    return np.dtype(layout)


class BodyMaker:
    """Batches of pings for ``vehicles`` vehicles wandering about the city centre."""

    def __init__(self, vehicles: int, batch: int, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.batch = batch
        self.pings = np.zeros(vehicles, ping_layout())
        self.pings["map"] = 0x86
        self.pings["k_id"] = b"\xaa" + b"vehicle_id"
        self.pings["id_head"] = 0xA0 | ID_WIDTH
        self.pings["id"] = [f"v{n:0{ID_WIDTH - 1}d}".encode() for n in range(vehicles)]
        for name in FIELDS:
            self.pings[f"k_{name}"] = bytes([0xA0 | len(name)]) + name.encode()
            self.pings[f"t_{name}"] = 0xCB
        self.pings["lat"] = CITY[0] + rng.uniform(-0.06, 0.06, vehicles)
        self.pings["lon"] = CITY[1] + rng.uniform(-0.1, 0.1, vehicles)
        self.pings["speed"] = rng.uniform(0, 15, vehicles)
        self.pings["heading"] = rng.uniform(0, 360, vehicles)

    def round(self) -> list[bytes]:
        """Every vehicle's next ping (a little further on, newer), in batches."""
        moved = self.pings
        moved["ts"] = time.time()
        moved["lat"] += np.random.default_rng().normal(0, 2e-5, len(moved))
        bodies = []
        for start in range(0, len(moved), self.batch):
            chunk = moved[start : start + self.batch]
            head = b"\xdd" + len(chunk).to_bytes(4, "big")  # array32
            bodies.append(head + chunk.tobytes())
        return bodies


@dataclass
class Counts:
    """Pings the tracker accepted, and pings it refused with 503 (sent again later)."""

    accepted: int = 0
    refused: int = 0


async def post_all(client: httpx.AsyncClient, bodies: list[bytes], counts: Counts) -> None:
    """POST bodies one after another on one connection, counting accepted pings.

    A batch refused with 503 (history cannot keep up) is counted and sent again after
    its ``Retry-After``, as the simulator does.
    """
    for body in bodies:
        while True:
            response = await client.post("/ingest", content=body, headers=INGEST_HEADERS)
            if response.status_code != 503:
                counts.accepted += response.json()["accepted"]
                break
            counts.refused += int.from_bytes(body[1:5], "big")
            await trio.sleep(float(response.headers.get("Retry-After", "1")))


async def post_rounds(
    url: str, maker: BodyMaker, connections: int, until: float, counts: Counts
) -> None:
    """Post round after round, each split over ``connections`` connections, until ``until``."""
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        while trio.current_time() < until:
            bodies = maker.round()
            async with trio.open_nursery() as round_nursery:
                for number in range(connections):
                    round_nursery.start_soon(post_all, client, bodies[number::connections], counts)


async def measure(args: argparse.Namespace, *options: str) -> dict[str, float]:
    """Ingest into ``tracker serve *options`` for ``args.seconds``; the figures.

    With history on, also how fast it committed over the same seconds and how much was
    still queued at the end: sustained means committed keeps up with accepted.
    """
    maker = BodyMaker(args.vehicles, args.batch)
    async with trio.open_nursery() as bench_nursery:
        tracker, url = await start_tracker(bench_nursery, *options)
        counts = Counts()
        start = trio.current_time()
        bench_nursery.start_soon(
            post_rounds, url, maker, args.connections, start + args.warmup + args.seconds, counts
        )
        await trio.sleep(args.warmup)
        async with httpx.AsyncClient(base_url=url) as client:
            committed = await metric(client, "tracker_history_committed_pings_total")
            cpu, samples = cpu_seconds(tracker.pid), []
            for _ in range(int(args.seconds)):
                before = counts.accepted
                await trio.sleep(1.0)
                samples.append(counts.accepted - before)
            cpu = cpu_seconds(tracker.pid) - cpu
            committed = await metric(client, "tracker_history_committed_pings_total") - committed
            queued = await metric(client, "tracker_history_queued_pings")
            longest_tick = await metric(client, "tracker_tick_duration_max_seconds")
        bench_nursery.cancel_scope.cancel()
    return {
        "vehicles": args.vehicles,
        "accepted_per_s_median": statistics.median(samples),
        "accepted_per_s_min": min(samples),
        "refused_pings": counts.refused,
        "history_committed_per_s": round(committed / int(args.seconds)),
        "history_queued_at_end": int(queued),
        "tracker_cpu_cores": round(cpu / args.seconds, 2),
        "longest_tick_s": round(longest_tick, 3),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This benchmark's options (bench.history's ingest section takes them too)."""
    parser.add_argument("--vehicles", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)


async def follow_accepted(url: str, accepted: list[int]) -> None:
    """Keep ``accepted[0]`` at the tracker's count of accepted pings (5 reads a second)."""
    async with httpx.AsyncClient(base_url=url) as client:
        while True:
            accepted[0] = int(await metric(client, "tracker_pings_accepted_total"))
            await trio.sleep(0.2)


async def measure_devices(args: argparse.Namespace) -> dict[str, float]:
    """Accepted pings per second through one device protocol."""
    async with trio.open_nursery() as bench_nursery:
        options = await tracker_options(bench_nursery, args.protocol, args.vehicles)
        tracker, url = await start_tracker(bench_nursery, *options)
        accepted = [0]
        bench_nursery.start_soon(follow_accepted, url, accepted)
        load = device_load(
            args.protocol, url, options, args.vehicles, args.connections, lambda: accepted[0]
        )
        if load is not None:
            bench_nursery.start_soon(load)
        await trio.sleep(args.warmup)
        cpu, first, samples = cpu_seconds(tracker.pid), accepted[0], []
        for _ in range(int(args.seconds)):
            before = accepted[0]
            await trio.sleep(1.0)
            samples.append(accepted[0] - before)
        cpu, total = cpu_seconds(tracker.pid) - cpu, accepted[0] - first
        bench_nursery.cancel_scope.cancel()
    return {
        "vehicles": args.vehicles,
        "accepted_per_s_median": statistics.median(samples),
        "accepted_per_s_mean": round(total / args.seconds),
        "tracker_cpu_cores": round(cpu / args.seconds, 2),
        "tracker_cpu_us_per_ping": round(cpu / max(total, 1) * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--protocol", choices=("ingest", *DEVICE_PROTOCOLS), default="ingest")
    args = parser.parse_args()
    figures = trio.run(measure if args.protocol == "ingest" else measure_devices, args)
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores; protocol {args.protocol}")
    for name, value in figures.items():
        print(f"{name:<24} {value:>12}")


if __name__ == "__main__":
    main()
