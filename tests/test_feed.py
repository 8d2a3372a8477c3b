"""Feeds end to end: real server, real sockets, events decoded by the reference client."""

from __future__ import annotations

import json
import time

import h3.api.basic_int as h3i
import httpx
import pytest
import trio
from quart_trio import QuartTrio
from werkzeug.datastructures import ImmutableDict

from tests.conftest import BERLIN, BERLIN_BBOX, MUNICH, RunningServer, StartServer, ping, post_pings
from tests.sse import open_feed


async def test_feed_receives_exactly_the_vehicles_in_its_area(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    now = time.time()
    await post_pings(
        client,
        [
            ping("in-1", 52.52, 13.40, now),
            ping("in-2", 52.50, 13.35, now),
            ping("far-1", *MUNICH, now),
        ],
    )
    await server.wait_for_ticks()
    async with open_feed(client, f"bbox={BERLIN_BBOX}") as feed:
        first = await feed.next_event()
        assert first.event == "snapshot"
        assert feed.ids() == {"in-1", "in-2"}
        await post_pings(client, [ping("in-3", 52.53, 13.45, now + 1), ping("far-2", *MUNICH, now)])
        event = await feed.until(lambda v: "in-3" in {s.vehicle_id for s in v.vehicles.values()})
        assert event.event == "batch"
        assert feed.ids() == {"in-1", "in-2", "in-3"}


async def test_feed_positions_round_trip_within_fixed_point_precision(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    now = time.time()
    await post_pings(client, [ping("v", 52.512345, 13.398765, now, speed=13.4, heading=91.0)])
    await server.wait_for_ticks()
    async with open_feed(client, f"bbox={BERLIN_BBOX}") as feed:
        await feed.next_event()
        seen = feed.view.by_id()["v"].position
        assert abs(seen.lat - 52.512345) <= 0.51e-5 and abs(seen.lon - 13.398765) <= 0.51e-5
        assert seen.speed == 13.5 and seen.heading == 92.0
        assert abs(seen.ts - now) <= 0.15


async def test_feed_vehicle_leaving_the_area_disappears_within_a_tick(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    now = time.time()
    await post_pings(client, [ping("mover", *BERLIN, now)])
    await server.wait_for_ticks()
    async with open_feed(client, f"bbox={BERLIN_BBOX}") as feed:
        await feed.next_event()
        assert feed.ids() == {"mover"}
        await post_pings(client, [ping("mover", *MUNICH, now + 1)])
        tick_before = server.tracker.index.tick
        await feed.until(lambda v: not v.vehicles)
        assert server.tracker.index.tick <= tick_before + 2


async def test_feed_covering_both_cells_never_loses_a_vehicle_moving_between_them(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    res = server.tracker.config.h3_resolution
    a = h3i.latlng_to_cell(*BERLIN, res)
    b = h3i.grid_disk(a, 1)[1] if h3i.grid_disk(a, 1)[0] == a else h3i.grid_disk(a, 1)[0]
    points = [h3i.cell_to_latlng(a), h3i.cell_to_latlng(b)]
    cells = ",".join(h3i.int_to_str(c) for c in (a, b))
    now = time.time()
    await post_pings(client, [ping("hopper", *points[0], now)])
    await server.wait_for_ticks()
    async with open_feed(client, f"cells={cells}") as feed:
        await feed.next_event()
        for step in range(1, 8):
            await post_pings(client, [ping("hopper", *points[step % 2], now + step)])
            expected_cell = (a, b)[step % 2]
            with trio.fail_after(5):
                while True:
                    await feed.next_event()
                    seen = feed.view.by_id()
                    assert "hopper" in seen, "a view covering both cells lost the vehicle"
                    if seen["hopper"].cell == expected_cell:
                        break


async def test_feed_cells_at_any_resolution_cover_the_same_vehicles(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    now = time.time()
    await post_pings(client, [ping("v", *BERLIN, now)])
    await server.wait_for_ticks()
    coarse = h3i.int_to_str(h3i.latlng_to_cell(*BERLIN, 5))
    fine = h3i.int_to_str(h3i.latlng_to_cell(*BERLIN, 12))
    for cells in (coarse, fine):
        async with open_feed(client, f"cells={cells}") as feed:
            await feed.next_event()
            assert feed.ids() == {"v"}


async def test_feed_resume_replays_exactly_the_missed_batches(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    now = time.time()
    parked = [ping(f"p{i}", 52.50 + i * 1e-3, 13.40, now) for i in range(20)]
    await post_pings(client, [ping("a", *BERLIN, now), *parked])
    await server.wait_for_ticks()
    async with open_feed(client, f"bbox={BERLIN_BBOX}") as feed:
        await feed.next_event()
        last_id = feed.last_id
        kept_view = feed.view
    # While disconnected: one vehicle moves, one arrives, one far away changes too.
    await post_pings(client, [ping("a", 52.51, 13.41, now + 1), ping("b", 52.53, 13.39, now + 1)])
    await post_pings(client, [ping("far", *MUNICH, now + 1)])
    await server.wait_for_ticks()
    async with open_feed(client, f"bbox={BERLIN_BBOX}", {"Last-Event-ID": last_id}) as feed:
        feed.view = kept_view
        event = await feed.next_event()
        assert event.event == "batch", "a resumable id must replay, not snapshot"
        assert feed.ids() == {"a", "b"} | {p["vehicle_id"] for p in parked}
        assert abs(feed.view.by_id()["a"].position.lat - 52.51) < 1e-4
        assert server.tracker.metrics.replays == 1


async def test_feed_resume_with_foreign_or_garbage_id_gets_a_snapshot(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    await post_pings(client, [ping("a", *BERLIN, time.time())])
    await server.wait_for_ticks()
    hub = server.tracker.hub
    for bad in (
        "garbage",
        "0.1.2",
        f"other.{hub.index.tick}.00000000",
        f"{hub.epoch}.999999999.x",
        "",
    ):
        async with open_feed(client, f"bbox={BERLIN_BBOX}", {"Last-Event-ID": bad}) as feed:
            event = await feed.next_event()
            assert event.event == "snapshot", bad
            assert feed.ids() == {"a"}


async def _first_event_after_missing_moves(
    server: RunningServer, client: httpx.AsyncClient, moves: int
) -> str:
    """Connect, drop, let one vehicle move ``moves`` ticks in a row, resume: which event?"""
    now = time.time()
    await post_pings(client, [ping("a", *BERLIN, now)])
    await server.wait_for_ticks()
    async with open_feed(client, f"bbox={BERLIN_BBOX}") as feed:
        await feed.next_event()
        last_id = feed.last_id
    for step in range(1, moves + 1):
        await post_pings(client, [ping("a", 52.52 + step * 1e-3, 13.405, now + step)])
        await server.wait_for_ticks(1)
    async with open_feed(client, f"bbox={BERLIN_BBOX}", {"Last-Event-ID": last_id}) as feed:
        return (await feed.next_event()).event


async def test_feed_resume_too_old_for_the_replay_log_gets_a_snapshot(
    start_server: StartServer,
) -> None:
    server = await start_server(replay_ticks=3)
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert await _first_event_after_missing_moves(server, client, 5) == "snapshot"


async def test_feed_resume_larger_than_a_snapshot_gets_a_snapshot(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    # Five batches about one vehicle outweigh its one-record snapshot.
    assert await _first_event_after_missing_moves(server, client, 5) == "snapshot"
    assert server.tracker.metrics.replays == 0


async def test_feed_json_format_carries_the_same_events(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    now = time.time()
    await post_pings(client, [ping("j", *BERLIN, now, speed=5.0)])
    await server.wait_for_ticks()
    async with client.stream("GET", f"/feed?bbox={BERLIN_BBOX}&format=json") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.aiter_lines()
        with trio.fail_after(5):
            while not (line := await lines.__anext__()).startswith("data:"):
                pass
        frames = json.loads(line[5:])
        (vehicle,) = frames[0]["vehicles"]
        assert vehicle["id"] == "j" and vehicle["speed"] == 5.0
        assert abs(vehicle["lat"] - BERLIN[0]) < 1e-4
        # A step inside the cell travels as a move in msgpack; JSON spells it out.
        await post_pings(client, [ping("j", BERLIN[0] + 2e-4, BERLIN[1], now + 1)])
        with trio.fail_after(5):
            while not (line := await lines.__anext__()).startswith("data:"):
                pass
        (vehicle,) = json.loads(line[5:])[0]["vehicles"]
        assert vehicle["id"] == "j" and vehicle["lat"] == round(BERLIN[0] + 2e-4, 5)


async def test_feed_sends_heartbeats_and_headers(start_server: StartServer) -> None:
    server = await start_server(heartbeat_s=0.2, retry_ms=1500)
    async with (
        httpx.AsyncClient(base_url=server.url) as client,
        client.stream("GET", f"/feed?bbox={BERLIN_BBOX}") as response,
    ):
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        seen: list[str] = []
        with trio.fail_after(3):
            async for line in response.aiter_lines():
                seen.append(line)
                if seen.count(": keep-alive") >= 2:
                    break
        assert "retry: 1500" in seen
        assert any(line.startswith("event: snapshot") for line in seen)


async def test_feed_outlives_the_response_timeout(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quart cuts responses after RESPONSE_TIMEOUT (60 s) unless feeds disable it.

    Quart's default is made 0.2 s here, so a feed that did not disable it would end
    within the 0.6 s of heartbeats this test reads.
    """
    short = ImmutableDict({**QuartTrio.default_config, "RESPONSE_TIMEOUT": 0.2})
    monkeypatch.setattr(QuartTrio, "default_config", short)
    server = await start_server(heartbeat_s=0.05)
    async with (
        httpx.AsyncClient(base_url=server.url) as client,
        client.stream("GET", f"/feed?bbox={BERLIN_BBOX}") as response,
    ):
        started = trio.current_time()
        with trio.fail_after(5):
            async for _ in response.aiter_lines():
                if trio.current_time() - started > 0.6:
                    break
            else:
                raise AssertionError("the feed ended early: cut by the response timeout")


async def test_feed_stale_then_removed_vehicles_are_announced(start_server: StartServer) -> None:
    server = await start_server(stale_after_s=0.3, remove_after_s=0.8)
    async with httpx.AsyncClient(base_url=server.url) as client:
        await post_pings(client, [ping("quiet", *BERLIN, time.time())])
        await server.wait_for_ticks()
        async with open_feed(client, f"bbox={BERLIN_BBOX}") as feed:
            await feed.next_event()
            await feed.until(lambda v: all(s.stale for s in v.vehicles.values()))
            assert feed.ids() == {"quiet"}
            await feed.until(lambda v: not v.vehicles)
            assert server.tracker.index.vehicle_count == 0


async def test_feed_ends_with_a_shutdown_event_when_the_server_stops(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    async with open_feed(client, f"bbox={BERLIN_BBOX}") as feed:
        await feed.next_event()
        server.shutdown.set()
        event = await feed.next_event()
        assert event.event == "shutdown"
    with trio.fail_after(10):
        await server.stopped.wait()


async def test_feed_bad_requests_get_json_400s(client: httpx.AsyncClient) -> None:
    for query, code in [
        ("", "bad_area"),
        ("bbox=13.5,52.4,13.3,52.6", "bad_area"),
        ("bbox=-180,-85,180,85", "bad_area"),
        ("cells=nonsense", "bad_area"),
        (f"bbox={BERLIN_BBOX}&format=xml", "bad_request"),
    ]:
        response = await client.get(f"/feed?{query}")
        assert response.status_code == 400, query
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert body["error"] == code and body["message"], query
