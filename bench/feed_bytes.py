"""Bytes per position on the wire, end to end: real server, HTTP ingest, SSE readers.

    python -m bench.feed_bytes --vehicles 5000 --subscribers 4 --seconds 10
    python -m bench.feed_bytes --url http://127.0.0.1:8000 \
        --query 'lat=52.52&lon=13.405&radius_m=8000' --subscribers 1

Starts a tracker in this process on a loopback port, moves ``--vehicles`` vehicles
around a city every tick (posted as msgpack batches over HTTP), and reads
``--subscribers`` feeds over HTTP/1.1, each covering a random viewport. Every byte the
readers receive is counted (SSE framing, ids, heartbeats included) against every
position they decode. With ``--url`` it only reads feeds (of ``--query``, else random
viewports) of a tracker already running, such as ``tracker demo`` and its simulated
fleet. Prints a table; ``--json`` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass

import httpx
import msgspec
import trio

from bench.common import INGEST_HEADERS, INGEST_KEY, viewport
from tracker.config import TrackerConfig
from tracker.server import serve
from tracker.wire import MOVE, RECORD, decode_frame

CENTRE = (52.52, 13.405)
CITY_RADIUS_DEG = 0.12


@dataclass
class ReaderStats:
    """What one feed reader received."""

    bytes: int = 0
    positions: int = 0
    events: int = 0
    frames: int = 0
    data_bytes: int = 0
    names: int = 0


async def drive_fleet(
    url: str, vehicles: int, tick_s: float, until: float, verify: str | bool = True
) -> None:
    """Move every vehicle a few metres each tick and post the whole fleet.

    ``verify``: a CA file for an HTTPS tracker with its own certificate (``bench.h3``)."""
    rng = random.Random(7)
    state = [
        [
            CENTRE[0] + rng.uniform(-CITY_RADIUS_DEG, CITY_RADIUS_DEG) * 0.6,
            CENTRE[1] + rng.uniform(-CITY_RADIUS_DEG, CITY_RADIUS_DEG),
            rng.uniform(0, 360),
        ]
        for _ in range(vehicles)
    ]
    encoder = msgspec.msgpack.Encoder()
    async with httpx.AsyncClient(base_url=url, timeout=30, verify=verify) as client:
        while trio.current_time() < until:
            now = time.time()
            pings = []
            for number, vehicle in enumerate(state):
                vehicle[2] = (vehicle[2] + rng.uniform(-20, 20)) % 360
                step = 10e-5  # about 10 m per tick
                vehicle[0] += step * math.cos(math.radians(vehicle[2]))
                vehicle[1] += step * math.sin(math.radians(vehicle[2]))
                pings.append(
                    {
                        "vehicle_id": f"van-{number:05d}",
                        "lat": vehicle[0],
                        "lon": vehicle[1],
                        "ts": now,
                        "speed": 10.0,
                        "heading": vehicle[2],
                    }
                )
            for start in range(0, len(pings), 10_000):
                body = encoder.encode(pings[start : start + 10_000])
                await client.post("/ingest", content=body, headers=INGEST_HEADERS)
            await trio.sleep(tick_s)


async def read_feed(
    url: str, query: str, stats: ReaderStats, measure_from: float, until: float
) -> None:
    """Read one feed, counting raw bytes and decoded positions in the measured window."""
    async with (
        httpx.AsyncClient(base_url=url, timeout=None) as client,
        client.stream("GET", f"/feed?{query}") as response,
    ):
        buffer = b""
        async for chunk in response.aiter_raw():
            if trio.current_time() > until:
                return
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if trio.current_time() < measure_from:  # warm-up: every vehicle is new
                    continue
                stats.bytes += len(event) + 2
                if not event.startswith(b"event: batch"):
                    continue
                stats.events += 1
                for line in event.split(b"\n"):
                    if line.startswith(b"data: "):
                        data = line[6:]
                        stats.frames += 1
                        stats.data_bytes += len(data)
                        frame = decode_frame(base64.b64decode(data))
                        stats.positions += len(frame.positions) // RECORD.size
                        stats.positions += len(frame.moves) // MOVE.size
                        stats.names += len(frame.names)


async def run(args: argparse.Namespace) -> dict[str, object]:
    config = TrackerConfig(
        port=0, tick_s=args.tick, heartbeat_s=15, open_feeds=True, ingest_keys=INGEST_KEY
    )
    shutdown = trio.Event()
    rng = random.Random(3)
    readers = [ReaderStats() for _ in range(args.subscribers)]
    async with trio.open_nursery() as bench_nursery:
        if args.url:
            url = args.url.rstrip("/")
        else:
            (url,) = await bench_nursery.start(serve, config, shutdown)
        measure_from = trio.current_time() + args.warmup
        until = measure_from + args.seconds
        async with trio.open_nursery() as load_nursery:
            if not args.url:
                load_nursery.start_soon(drive_fleet, url, args.vehicles, args.tick, until)
            for stats in readers:
                query = args.query or viewport(rng)
                load_nursery.start_soon(read_feed, url, query, stats, measure_from, until)
        shutdown.set()
    total_bytes = sum(r.bytes for r in readers)
    positions = sum(r.positions for r in readers)
    per_position = [r.bytes / r.positions for r in readers if r.positions]
    return {
        "vehicles": "(the running tracker's)" if args.url else args.vehicles,
        "subscribers": args.subscribers,
        "tick_s": args.tick,
        "positions_received": positions,
        "bytes_received": total_bytes,
        "bytes_per_position_all_in": total_bytes / max(1, positions),
        "bytes_per_position_median_reader": statistics.median(per_position) if per_position else 0,
        "data_bytes_per_position": sum(r.data_bytes for r in readers) / max(1, positions),
        "positions_per_frame": positions / max(1, sum(r.frames for r in readers)),
        "names_per_position": sum(r.names for r in readers) / max(1, positions),
        "readers": [asdict(r) for r in readers],
        "machine": f"{platform.machine()} {platform.python_version()}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vehicles", type=int, default=5000)
    parser.add_argument("--subscribers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds not measured")
    parser.add_argument("--tick", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--url", help="read a running tracker's feeds (no fleet of our own)")
    parser.add_argument("--query", help="the feeds' area query (default: random viewports)")
    args = parser.parse_args()
    result = trio.run(run, args)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        if key != "readers":
            shown = f"{value:.2f}" if isinstance(value, float) else value
            print(f"{key:36} {shown}")


if __name__ == "__main__":
    main()
