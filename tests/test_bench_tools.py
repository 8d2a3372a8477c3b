"""The benchmarks' own instruments: a wrong load generator or parser would make wrong figures."""

from __future__ import annotations

import argparse
import base64
import time

import msgspec
import numpy as np
import pytest
import trio

import bench.core
from bench.ingest import BodyMaker
from bench.loadclient import (
    ClientStats,
    Dechunker,
    FrameCache,
    record_cached_event,
    record_event,
)
from tracker.pings import Ping
from tracker.wire import MOVE, Position, encode_frame

CELL = 0x871F1D489FFFFFF


def test_ingest_bodies_are_valid_msgpack_ping_batches_that_move_forward() -> None:
    maker = BodyMaker(vehicles=25, batch=10)
    first, second = maker.round(), maker.round()
    assert len(first) == 3
    pings = [p for body in first for p in msgspec.msgpack.decode(body, type=list[Ping])]
    later = [p for body in second for p in msgspec.msgpack.decode(body, type=list[Ping])]
    assert [p.vehicle_id for p in pings] == [f"v{n:07d}" for n in range(25)]
    assert all(abs(p.lat - 52.52) < 0.1 and abs(p.lon - 13.405) < 0.15 for p in pings)
    assert all(b.ts >= a.ts for a, b in zip(pings, later, strict=True))


def test_dechunker_reassembles_a_body_split_anywhere() -> None:
    body = b"event: batch\ndata: abc\n\n" * 3
    wire = b"".join(
        b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:40], body[40:])
    )
    dechunker = Dechunker()
    assert b"".join(dechunker.feed(wire[i : i + 5]) for i in range(0, len(wire), 5)) == body


def test_load_client_counts_positions_and_their_latency() -> None:
    now = time.time()
    t_ms = round(now * 1000)
    positions = [Position(n, 52.52, 13.405, now - 0.5, 10.0, 90.0) for n in range(1, 4)]
    step = MOVE.pack(4, 0, 1, -1, 5, 20, 45)  # a fourth vehicle, 0.5 s old, as a move
    frame = base64.b64encode(encode_frame(CELL, t_ms, positions=positions, moves=step))
    stats = ClientStats()
    event = b"event: batch\nid: 1.2.3\ndata: " + frame
    assert record_event(event, stats, received=now + 0.25, measuring=True) is False
    assert (stats.frames, stats.positions) == (1, 4)
    assert int(np.flatnonzero(stats.latency_ms)[0]) in range(700, 800)  # 0.5 s old + 0.25 s
    assert record_event(b"event: snapshot\ndata: " + frame, stats, now, measuring=True) is True
    baseline = b"event: ping\ndata: " + msgspec.json.encode(
        Ping(vehicle_id="v", lat=1, lon=2, ts=now)
    )
    record_event(baseline, stats, received=now + 0.1, measuring=True)
    assert stats.positions == 9


@pytest.mark.parametrize("region", ["city", "zones"])
async def test_core_bench_drives_the_core_without_http(region: str) -> None:
    args = argparse.Namespace(vehicles=300, feeds=3, ticks=2, batch=100, region=region)
    with trio.fail_after(10):
        figures = await bench.core.measure(args)
    assert figures["tick_ms_median"] > 0 and figures["feed_bytes_per_tick"] > 0
    assert figures["ingest_pings_per_s_median"] > 0


def test_the_frame_cache_counts_what_decoding_every_frame_counts() -> None:
    now = time.time()
    t_ms = round(now * 1000)
    positions = [Position(n, 52.52, 13.405, now - 0.5, 10.0, 90.0) for n in range(1, 4)]
    step = MOVE.pack(4, 0, 1, -1, 5, 20, 45)
    frame = base64.b64encode(encode_frame(CELL, t_ms, positions=positions, moves=step))
    event = b"event: batch\nid: 1.2.3\ndata: " + frame + b"\ndata: " + frame
    decoded, cached = ClientStats(), ClientStats()
    cache = FrameCache(cached)
    record_event(event, decoded, received=now + 0.25, measuring=True)
    for _ in range(3):  # the same frame on three feeds: decoded once
        record_cached_event(event, cached, now + 0.25, True, cache)
    cache.flush()  # reads are counted in bulk
    assert cached.distinct_frames == 1
    assert (cached.frames, cached.positions) == (3 * decoded.frames, 3 * decoded.positions)
    assert cached.latency_ms.sum() == 3 * decoded.latency_ms.sum()
    first = [int(np.flatnonzero(s.latency_ms)[0]) for s in (cached, decoded)]
    assert abs(first[0] - first[1]) <= 1  # the same latency, rounded to the millisecond
