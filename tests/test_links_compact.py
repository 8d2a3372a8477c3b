"""Compact events of vehicle feeds (docs/wire-format.md, "Compact vehicle events"): the
bytes are pinned, steps are shared by every feed of a vehicle, and an independent reader
(tests/compact_reader.py) applying every event lands exactly on the published position
however the vehicle moves, enters and leaves a link's area, goes stale or is removed;
odd ids travel intact; the browser's decoder (web/wire.js) agrees with the reader."""

from __future__ import annotations

import json
import random
import time

import httpx
import pytest
import trio
from playwright.sync_api import Browser

from tests.browser import demo, watched_page
from tests.compact_reader import CompactTable, polyline_ints
from tests.conftest import BERLIN, StartServer, ping, post_pings
from tests.processes import free_port
from tests.test_fleets_views import A_POINT, FAR_POINT, A, World
from tracker.compact import decode_ints, encode_ints, fix
from tracker.feed import render
from tracker.hub import Subscription
from tracker.pings import Ping
from tracker.views import View


def events(chunk: bytes) -> list[str]:
    """The data of each SSE event of a chunk (compact events have only ``data:`` lines)."""
    out = []
    for block in chunk.decode().split("\n\n"):
        if block:
            lines = block.split("\n")
            assert all(line.startswith("data:") for line in lines), block
            out.append("\n".join(line[5:] for line in lines))
    return out


def follow(world: World, *names: str, cells: frozenset[int] | None = None) -> Subscription:
    return world.hub.subscribe(View(cells, vehicles=frozenset(names)), is_json=False)


def read(world: World, sub: Subscription, table: CompactTable, first: bool = False) -> bytes:
    chunk = render(world.hub.start(sub, None) if first else sub.take(), sub, world.hub)
    for data in events(chunk):
        table.apply(data)
    return chunk


def published(world: World, name: str) -> dict[str, object]:
    vehicle = world.index.vehicle(name)
    assert vehicle is not None and vehicle.published is not None
    return dict(fix(vehicle.published)._asdict())


def held(table: CompactTable, name: str) -> dict[str, object]:
    return {k: v for k, v in table.by_id()[name].items() if k not in ("id", "stale")}


def test_polyline_digits_match_googles_example() -> None:
    # developers.google.com/maps/documentation/utilities/polylinealgorithm
    deltas = [3850000, -12020000, 220000, -75000, 255200, -550300]
    assert encode_ints(deltas) == "_p~iF~ps|U_ulLnnqC_mqNvxq`@"
    for values in ([0], [-1, 1, -16, 15, -17, 16], [2**40, -(2**40)], deltas):
        text = encode_ints(values)
        assert decode_ints(text) == polyline_ints(text) == values
        assert all(63 <= ord(c) <= 126 for c in text)
    for bad in ("_", " ", "a,b", "\x7f"):
        with pytest.raises(ValueError):
            decode_ints(bad)


def test_the_bytes_of_a_link_are_pinned() -> None:
    world = World()
    world.index.apply(Ping(vehicle_id="v1", lat=52.5, lon=13.4, ts=1000.0), 1000)
    world.tick()
    sub = follow(world, "v1")
    table = CompactTable()
    assert read(world, sub, table, first=True) == (
        b'data:*\ndata:=1,5250000,1340000,10000,255,255,"v1"\n\n'
    )
    # 1 s later, 9 units north, 12 west, 10 m/s, heading 90: speed and heading appear
    world.index.apply(
        Ping(vehicle_id="v1", lat=52.50009, lon=13.39988, ts=1001.0, speed=10, heading=90),
        1001,
    )
    world.tick()
    assert read(world, sub, table) == b"data:QV?tMbL\n\n"  # 9, -12, 0, -235, -210
    # the usual: 1 s, a small step, nothing else changed: 12 bytes on the wire
    world.index.apply(
        Ping(vehicle_id="v1", lat=52.50018, lon=13.39976, ts=1002.0, speed=10, heading=90),
        1002,
    )
    world.tick()
    chunk = read(world, sub, table)
    assert chunk == b"data:QV\n\n" and len(chunk) == 9
    assert held(table, "v1") == published(world, "v1")


def test_every_feed_of_a_vehicle_gets_the_same_bytes() -> None:
    world = World()
    world.ping("v1", A_POINT)
    world.tick()
    subs = [follow(world, "v1") for _ in range(3)]
    for sub in subs:
        world.hub.start(sub, None)
    world.ping("v1", A_POINT, 0.0001)
    world.tick()
    frames = [sub.take().batches[0].frames for sub in subs]
    steps = {id(f.step) for batch in frames for f in batch}
    assert len(steps) == 1  # one step a vehicle a tick
    step = frames[0][0].step
    assert step is not None
    view = subs[0].view
    assert step.line_for(view, False) is step.line_for(subs[1].view, False)  # built once


@pytest.mark.parametrize("seed", range(4))
def test_the_chain_never_breaks(seed: int) -> None:
    """A random walk with cell changes, a link bound to one cell, stale and removed
    vehicles, late and conflated feeds: every reader holds exactly the published state."""
    rng = random.Random(seed)
    world = World()
    names = ["v1", 'odd, "id"\n\u2028é', "x" * 64]
    lat, lon = A_POINT
    for name in names:
        world.index.apply(Ping(vehicle_id=name, lat=lat, lon=lon, ts=world.now), world.now)
    world.tick()
    feeds: list[tuple[Subscription, CompactTable, frozenset[int] | None, tuple[str, ...]]] = []

    def open_feed(cells: frozenset[int] | None, *which: str) -> None:
        sub = follow(world, *which, cells=cells)
        table = CompactTable()
        read(world, sub, table, first=True)
        feeds.append((sub, table, cells, which))

    open_feed(None, names[0])
    open_feed(frozenset({A}), names[0])  # a link bound to an area
    open_feed(None, *names)
    where = {name: [lat, lon] for name in names}
    for tick in range(120):
        for name in names:
            if name == names[2] and 40 <= tick < 60:
                continue  # silent long enough to go stale
            point = where[name]
            if rng.random() < 0.05:  # a jump: to the far city and back, or a huge step
                point[:] = list(FAR_POINT) if point[0] < 50 else list(A_POINT)
            point[0] += rng.gauss(0, 0.0002)
            point[1] += rng.gauss(0, 0.0003)
            speed = rng.choice([None, rng.uniform(0, 30)])
            heading = rng.choice([None, rng.uniform(0, 360)])
            ts = world.now + rng.choice([0, -0.5, 0.3, -3])
            world.index.apply(
                Ping(
                    vehicle_id=name,
                    lat=point[0],
                    lon=point[1],
                    ts=ts,
                    speed=speed,
                    heading=heading,
                ),
                world.now,
            )
        if tick == 59:
            world.now += 61  # names[2] goes stale
        world.tick()
        if tick in (10, 70):
            open_feed(None, *names)  # late feeds
        if tick == 30:
            feeds[0][0].owe_snapshot()  # conflated
        for sub, table, cells, which in feeds:
            if tick % 7 == 3:
                continue  # a slow reader: its batches queue up
            read(world, sub, table)
            for name in which:
                vehicle = world.index.vehicle(name)
                assert vehicle is not None
                inside = cells is None or vehicle.cell in cells
                if inside:
                    assert held(table, name) == published(world, name), (tick, name)
                    assert table.by_id()[name]["stale"] == vehicle.stale
                else:
                    assert name not in table.by_id()
    assert all(t.steps > 50 for _, t, _, _ in feeds[:1])


def test_a_removed_vehicle_goes_and_a_new_one_comes_with_a_keyframe() -> None:
    world = World()
    world.ping("v1", A_POINT)
    world.tick()
    sub = follow(world, "v1", "v2")  # v2: not seen yet
    table = CompactTable()
    read(world, sub, table, first=True)
    world.ping("v2", FAR_POINT)
    world.tick()
    assert events(read(world, sub, table)) == [
        f'=2,{",".join(str(v) for v in list(published(world, "v2").values()))},"v2"'
    ]
    world.now += 200  # past remove_after_s
    world.tick()
    assert events(read(world, sub, table)) == ["1:-\n2:-"]
    assert table.vehicles == {}
    world.ping("v1", A_POINT)  # back: a new vehicle number, a keyframe
    world.tick()
    read(world, sub, table)
    assert set(table.by_id()) == {"v1"} and 3 in table.vehicles


def test_a_json_vehicle_feed_keeps_its_frames() -> None:
    world = World()
    world.ping("v1", A_POINT)
    world.tick()
    sub = world.hub.subscribe(View(None, vehicles=frozenset({"v1"})), is_json=True)
    chunk = render(world.hub.start(sub, None), sub, world.hub)
    assert chunk.startswith(b"event: snapshot\nid: ")


async def test_a_link_costs_about_a_dozen_bytes_a_position(start_server: StartServer) -> None:
    """On a real socket, everything counted: heartbeats, blank lines, the snapshot."""
    server = await start_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        now = time.time() - 60
        await post_pings(http, [ping("van-1", *BERLIN, now)])
        await server.wait_for_ticks(2)
        table = CompactTable()
        received = b""
        async with http.stream("GET", "/feed?vehicles=van-1") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            chunks = response.aiter_bytes()
            for step in range(1, 41):
                lat = BERLIN[0] + 0.00009 * step + random.gauss(0, 0.00002)
                await post_pings(http, [ping("van-1", lat, BERLIN[1], now + step)])
                with trio.fail_after(5):
                    while received.count(b"\n\n") <= step:
                        received += await chunks.__anext__()
        body = received.decode().split("\n", 1)[1]  # after retry:
        for data in events(body.encode()):
            table.apply(data)
        assert held(table, "van-1") == published_of(server, "van-1")
        per_position = len(received) / 40
        assert per_position < 13, received


def published_of(server: object, name: str) -> dict[str, object]:
    vehicle = server.tracker.index.vehicle(name)  # type: ignore[attr-defined]
    assert vehicle is not None and vehicle.published is not None
    return dict(fix(vehicle.published)._asdict())


def test_the_browser_decoder_agrees(browser: Browser) -> None:
    """web/wire.js applies the same events as the independent reader, to the same table."""
    world = World()
    rng = random.Random(7)
    names = ["v1", 'odd, "id"\n\u2028é']
    for name in names:
        world.index.apply(Ping(vehicle_id=name, lat=52.5, lon=179.9999, ts=world.now), world.now)
    world.tick()
    subs = [follow(world, names[0]), follow(world, *names)]
    streams: list[list[str]] = [[], []]
    for sub, stream in zip(subs, streams, strict=True):
        stream += events(render(world.hub.start(sub, None), sub, world.hub))
    for _ in range(30):
        for name in names:
            vehicle = world.index.vehicle(name)
            assert vehicle is not None and vehicle.published is not None
            world.index.apply(
                Ping(
                    vehicle_id=name,
                    lat=vehicle.published.lat + rng.gauss(0, 0.01),
                    lon=vehicle.published.lon + rng.gauss(0, 0.001),  # across the antimeridian
                    ts=world.now + rng.uniform(-1, 1),
                    speed=rng.choice([None, rng.uniform(0, 60)]),
                    heading=rng.choice([None, rng.uniform(0, 360)]),
                ),
                world.now,
            )
        world.tick()
        for sub, stream in zip(subs, streams, strict=True):
            stream += events(render(sub.take(), sub, world.hub))
    expected = []
    for stream in streams:
        table = CompactTable()
        for data in stream:
            table.apply(data)
        expected.append(
            {
                v["id"]: [v["lat"], v["lon"], v["ts"] / 10, v["speed"], v["heading"]]  # type: ignore[operator]
                for v in table.vehicles.values()
            }
        )
    port = free_port()
    with demo(port, "--vehicles", "1") as url, watched_page(browser) as page:
        page.goto(f"{url}/web/index.html")
        got = page.evaluate(
            """async (streams) => {
              const { VehicleTable } = await import('/web/wire.js');
              return streams.map((stream) => {
                const table = new VehicleTable();
                for (const data of stream) table.applyEvent('message', data);
                return Object.fromEntries([...table.vehicles.values()].map((v) => [v.id,
                  [v.latQ, v.lonQ, v.ts, v.speed === null ? 255 : v.speed * 2,
                   v.heading === null ? 255 : v.heading / 2]]));
              });
            }""",
            streams,
        )
    assert got == json.loads(json.dumps(expected))
