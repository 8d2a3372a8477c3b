"""A lean SSE load client: many feeds over raw sockets, every batch really decoded.

    python -m bench.loadclient --url http://127.0.0.1:8000 --seconds 20 < queries.txt

Reads one feed query per line from stdin (``bbox=...``), opens one HTTP/1.1 connection per
query with a raw Trio socket (no HTTP library on the hot path), de-chunks the body, splits
SSE events, base64- and msgpack-decodes every frame and unpacks its records with NumPy.
For every position received in the measured window it takes the latency from the
ping's timestamp to the moment its event was read (0.1 s resolution: the wire's age
step) into a fixed histogram. Prints one JSON object with its counts and its own CPU
time, so that the harness can show the client was not the bottleneck.

Thousands of feeds (``--verify-every K``): the tracker sends the same frame, byte for
byte, to every feed of a cell, so only every K-th feed decodes every frame itself; the
others look each ``data:`` line up in a :class:`FrameCache` and decode only frames not
seen before (each distinct frame once), which gives the same counts and latencies for
a fraction of the CPU. ``--bytes-only`` goes further for memory runs: those feeds only
count bytes and events, reading every byte all the same.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

import msgspec
import numpy as np
import trio
import trio.lowlevel

from tracker.pings import Ping
from tracker.wire import MOVE_DTYPE, RECORD_DTYPE, decode_frame

_ping_json = msgspec.json.Decoder(Ping)

OPENING_AT_ONCE = 200
"""Feeds being opened at once (connect, request, response head) per client process."""
HISTOGRAM_MS = 30_000
"""Latency histogram: one bin per millisecond up to 30 s; later ones land in the last bin."""


@dataclass
class ClientStats:
    """What all feeds of this client received in the measured window."""

    feeds: int = 0
    connected: int = 0
    bytes: int = 0
    events: int = 0
    frames: int = 0
    positions: int = 0
    snapshots_after_first: int = 0
    """Snapshots a feed received after its first: conflations (the client fell behind)."""
    verified_feeds: int = 0
    """Feeds that decoded every frame themselves (the rest used the frame cache)."""
    distinct_frames: int = 0
    """Frames decoded for the cache: each distinct frame once."""
    raw_bytes: int = 0
    """Every byte read in the window, HTTP framing included, on every feed."""
    ticks_seen: set[int] = field(default_factory=set)
    """Ticks whose batch a verified feed received in the window (any verified feed)."""
    errors: list[str] = field(default_factory=list)
    latency_ms: np.ndarray = field(default_factory=lambda: np.zeros(HISTOGRAM_MS + 1, np.int64))


class Dechunker:
    """Turns an HTTP/1.1 chunked body, fed in arbitrary pieces, back into its bytes."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> bytes:
        """The body bytes completed by ``data``."""
        self._buffer += data
        out = []
        while True:
            line_end = self._buffer.find(b"\r\n")
            if line_end < 0:
                break
            size = int(self._buffer[:line_end].split(b";")[0], 16)
            start, end = line_end + 2, line_end + 2 + size
            if len(self._buffer) < end + 2:
                break
            out.append(self._buffer[start:end])
            self._buffer = self._buffer[end + 2 :]
        return b"".join(out)


class CachedFrame(NamedTuple):
    """What one distinct frame holds, decoded once: its time and its positions' ages."""

    t_ms: int
    positions: int
    age_offsets_ms: list[tuple[int, int]]  # (age in ms, positions of that age)


class FrameCache:
    """Decoded frames by their base64 bytes (bounded: cleared when full)."""

    def __init__(self, stats: ClientStats, limit: int = 50_000) -> None:
        self._frames: dict[bytes, CachedFrame] = {}
        self._stats = stats
        self._limit = limit

    def get(self, b64: bytes) -> CachedFrame:
        cached = self._frames.get(b64)
        if cached is None:
            if len(self._frames) >= self._limit:
                self._frames.clear()
            frame = decode_frame(base64.b64decode(b64))
            ages = np.concatenate(
                (
                    np.frombuffer(frame.positions, RECORD_DTYPE)["age"],
                    np.frombuffer(frame.moves, MOVE_DTYPE)["age"],
                )
            ).astype(np.int64)
            counts = np.bincount(ages)
            offsets = [(int(age) * 100, int(counts[age])) for age in np.flatnonzero(counts)]
            cached = CachedFrame(frame.t_ms, len(ages), offsets)
            self._frames[b64] = cached
            self._stats.distinct_frames += 1
        return cached


def record_cached_event(
    event: bytes, stats: ClientStats, received: float, measuring: bool, cache: FrameCache
) -> bool:
    """:func:`record_event` through the frame cache; True if it was a snapshot."""
    is_snapshot = event.startswith(b"event: snapshot")
    if not (is_snapshot or event.startswith(b"event: batch")) or not measuring:
        return is_snapshot
    latency = stats.latency_ms
    for line in event.split(b"\n"):
        if not line.startswith(b"data: ") or len(line) <= 6:
            continue
        frame = cache.get(line[6:])
        stats.frames += 1
        stats.positions += frame.positions
        if not is_snapshot:
            base = int((received - frame.t_ms / 1000) * 1000)
            for offset, count in frame.age_offsets_ms:
                latency[min(HISTOGRAM_MS, max(0, base + offset))] += count
    return is_snapshot


def record_event(event: bytes, stats: ClientStats, received: float, measuring: bool) -> bool:
    """Decode one SSE event; True if it was a snapshot."""
    if event.startswith(b"event: ping"):  # the naive baseline: one JSON ping per event
        if measuring:
            ping = _ping_json.decode(event.split(b"data: ", 1)[1])
            stats.positions += 1
            stats.latency_ms[min(HISTOGRAM_MS, max(0, int((received - ping.ts) * 1000)))] += 1
        return False
    is_snapshot = event.startswith(b"event: snapshot")
    if not (is_snapshot or event.startswith(b"event: batch")):
        return False
    ages, t_ms = [], 0
    for line in event.split(b"\n"):
        if not line.startswith(b"data: ") or len(line) <= 6:
            continue
        frame = decode_frame(base64.b64decode(line[6:]))
        ages.append(np.frombuffer(frame.positions, RECORD_DTYPE)["age"])
        ages.append(np.frombuffer(frame.moves, MOVE_DTYPE)["age"])
        t_ms = frame.t_ms  # every frame of an event belongs to the same tick
    if measuring and ages:
        stats.frames += len(ages) // 2
        all_ages = np.concatenate(ages)
        stats.positions += len(all_ages)
        if not is_snapshot:  # a snapshot's positions are not news
            _count_latencies(stats, received - (t_ms / 1000 - all_ages * 0.1))
    return is_snapshot


def _count_latencies(stats: ClientStats, seconds: np.ndarray) -> None:
    """Histogram once per event: a bincount per frame cost more than decoding the frame."""
    bins = np.clip((seconds * 1000).astype(np.int64), 0, HISTOGRAM_MS)
    counts = np.bincount(bins)
    stats.latency_ms[: len(counts)] += counts


async def read_feed(
    host: str,
    port: int,
    query: str,
    stats: ClientStats,
    measure_from: float,
    until: float,
    *,
    cache: FrameCache | None = None,
    bytes_only: bool = False,
    opening: trio.CapacityLimiter | None = None,
) -> None:
    """Hold one feed open until ``until``, decoding and counting what it receives.

    With ``cache``, frames are looked up there rather than decoded; with ``bytes_only``
    the body is only counted (events by their ``event:`` lines), every byte still read.
    ``opening`` bounds the feeds being opened at once (thousands at once overflow the
    server's accept queue, and the kernel resets them).
    """
    async with opening or contextlib.nullcontext():
        stream = await trio.open_tcp_stream(host, port)
        request = f"GET /feed?{query} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
        await stream.send_all(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("closed before the response head")
            head += chunk
    async with stream:
        head, _, rest = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(head.split(b"\r\n")[0].decode())
        stats.connected += 1
        if bytes_only:
            await _count_bytes(stream, rest, stats, measure_from, until)
            return
        dechunker, pending, snapshots = Dechunker(), b"", 0
        data = rest
        while trio.current_time() < until:
            received = time.time()
            measuring = trio.current_time() >= measure_from
            if measuring:
                stats.raw_bytes += len(data)
            body = dechunker.feed(data)
            if measuring:
                stats.bytes += len(body)
            *events, pending = (pending + body).split(b"\n\n")
            for event in events:
                stats.events += measuring
                if measuring and cache is None and event.startswith(b"event: batch\nid: "):
                    stats.ticks_seen.add(int(event.split(b"\n", 2)[1].split(b".")[1]))
                if (
                    record_event(event, stats, received, measuring)
                    if cache is None
                    else record_cached_event(event, stats, received, measuring, cache)
                ):
                    snapshots += 1
                    stats.snapshots_after_first += measuring and snapshots > 1
            data = await stream.receive_some(1 << 20)
            if not data:
                raise ConnectionError("server closed the feed")


async def _count_bytes(
    stream: trio.SocketStream, data: bytes, stats: ClientStats, measure_from: float, until: float
) -> None:
    """Read a feed to the end of the window, counting bytes and events only."""
    snapshots = 0
    while trio.current_time() < until:
        snapshots += data.count(b"event: snapshot")
        if trio.current_time() >= measure_from:
            stats.raw_bytes += len(data)
            stats.events += data.count(b"event: ")
        data = await stream.receive_some(1 << 20)
        if not data:
            raise ConnectionError("server closed the feed")
    stats.snapshots_after_first += max(0, snapshots - 1)


async def run(
    url: str,
    queries: list[str],
    warmup: float,
    seconds: float,
    *,
    verify_every: int = 1,
    bytes_only: bool = False,
) -> ClientStats:
    """Read every feed for ``warmup + seconds``; counts cover the last ``seconds``.

    Every ``verify_every``-th feed decodes each frame itself; the others use a shared
    :class:`FrameCache` (or, ``bytes_only``, count bytes and events only).
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    stats = ClientStats(feeds=len(queries))
    cache = FrameCache(stats)
    opening = trio.CapacityLimiter(OPENING_AT_ONCE)
    measure_from = trio.current_time() + warmup
    until = measure_from + seconds

    async def one(number: int, query: str) -> None:
        verified = number % verify_every == 0
        stats.verified_feeds += verified
        try:
            await read_feed(
                host,
                port,
                query,
                stats,
                measure_from,
                until,
                cache=None if verified else cache,
                bytes_only=bytes_only and not verified,
                opening=opening,
            )
        except (OSError, ConnectionError, ValueError, trio.BrokenResourceError) as exc:
            stats.errors.append(f"{type(exc).__name__}: {exc}")

    async with trio.open_nursery() as client_nursery:
        for number, query in enumerate(queries):
            client_nursery.start_soon(one, number, query)
            await trio.lowlevel.checkpoint()  # connect gradually, as real clients arrive
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--verify-every",
        type=int,
        default=1,
        help="every K-th feed decodes each frame; the rest decode each distinct frame once",
    )
    parser.add_argument(
        "--bytes-only", action="store_true", help="unverified feeds count bytes and events only"
    )
    args = parser.parse_args()
    queries = [line.strip() for line in sys.stdin if line.strip()]
    cpu_start = time.process_time()
    stats = trio.run(
        functools.partial(
            run,
            args.url,
            queries,
            args.warmup,
            args.seconds,
            verify_every=max(1, args.verify_every),
            bytes_only=args.bytes_only,
        )
    )
    result = asdict(stats)
    result["latency_ms"] = stats.latency_ms.tolist()
    result["ticks_seen"] = len(stats.ticks_seen)
    result["errors"] = stats.errors[:20]
    result["cpu_seconds"] = time.process_time() - cpu_start
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
