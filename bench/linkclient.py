"""The load client for vehicle feeds and tracking links: compact events, every one decoded.

    python -m bench.linkclient --url http://127.0.0.1:8000 --seconds 20 < tokens.txt

:class:`bench.loadclient.LoadClient` (one ``epoll``, raw sockets, every byte read and
counted) with each event read as a compact vehicle event (``docs/wire-format.md``):
every feed keeps the vehicles it holds in fixed point and applies every keyframe and step
(:mod:`tracker.compact`), so a broken chain (a step for a vehicle the feed does not hold)
is counted as an error, and the latency of each position is the time from its ping's
timestamp to the moment its event was read. Prints the same JSON as the load client.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from dataclasses import asdict

from bench.loadclient import HISTOGRAM_MS, ClientStats, LoadClient, _Feed
from tracker.compact import TIME_STEP_S, Fix, apply_step, decode_ints


class LinkClient(LoadClient):
    """A :class:`LoadClient` whose feeds are vehicle feeds (compact events)."""

    def __init__(self, url: str, queries: list[str], warmup: float, seconds: float) -> None:
        super().__init__(url, queries, warmup, seconds)
        self._held: dict[int, dict[int, Fix]] = {}  # id(feed) -> vid -> position held
        self.broken = 0
        """Steps for a vehicle the feed did not hold: a broken chain (should stay 0)."""

    def _consume(self, sock: socket.socket, feed: _Feed, data: bytes, measuring: bool) -> None:
        stats = self.stats
        if measuring:
            stats.raw_bytes += len(data)
        body = feed.body(data)
        events = feed.complete(body)
        if not events:
            return
        held = self._held.setdefault(id(feed), {})
        received = time.time()
        if measuring:
            stats.bytes += len(body)
            stats.events += events.count(b"\n\n")
        for event in events.split(b"\n\n")[:-1]:
            snapshot = self._apply(event, held, stats, received, measuring)
            self._snapshot(feed, snapshot, measuring)

    def _apply(
        self, event: bytes, held: dict[int, Fix], stats: ClientStats, now: float, measuring: bool
    ) -> int:
        """Apply one event to a feed's vehicles; 1 if it was a snapshot."""
        snapshot = 0
        last = next(iter(held), None)
        latency = stats.latency_ms
        for raw in event.split(b"\n"):
            if not raw.startswith(b"data:"):
                continue  # retry:, a heartbeat, event: of a final event
            line = raw[5:].decode()
            if line == "*":
                held.clear()
                snapshot = 1
                continue
            if line.startswith("="):
                vid, lat, lon, ts, speed, heading, _ = line[1:].split(",", 6)
                last = int(vid)
                held[last] = Fix(int(lat), int(lon), int(ts), int(speed), int(heading))
                if measuring:
                    stats.positions += 1
                continue
            tag, colon, body = line.rpartition(":")
            vid = int(tag) if colon else last
            if body == "-" and vid is not None:
                held.pop(vid, None)
                continue
            if vid not in held:
                self.broken += 1
                continue
            if body == "!":
                continue
            after = held[vid] = apply_step(held[vid], decode_ints(body))
            if measuring:
                stats.positions += 1
                age_ms = int((now - after.ts * TIME_STEP_S) * 1000)
                latency[min(HISTOGRAM_MS, max(0, age_ms))] += 1
        return snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    queries = [line.strip() for line in sys.stdin if line.strip()]
    client = LinkClient(args.url, queries, args.warmup, args.seconds)
    stats = client.run()
    result = asdict(stats)
    result["latency_ms"] = stats.latency_ms.tolist()
    result["ticks_seen"] = len(stats.ticks_seen)
    broken = [f"broken chains: {client.broken}"] if client.broken else []
    result["errors"] = stats.errors[:20] + broken
    result["error_count"] = len(stats.errors) + client.broken
    result["cpu_seconds_total"] = time.process_time()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
