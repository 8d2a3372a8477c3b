"""Replays over real sockets: a tracker with a SQLite history in tmp_path, a scripted drive
ingested with past timestamps, played back through ``/feed?...&from=`` and decoded by the
reference client (:class:`tracker.client.FeedView`)."""

from __future__ import annotations

import math
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h3.api.basic_int as h3i
import httpx
import msgspec
import trio

from tests.conftest import RunningServer, StartServer, ping, post_pings
from tests.credentials import SECURE, mint_token
from tests.sse import Feed, feed_head, open_feed
from tracker.client import FeedView
from tracker.regions import parse_area

BBOX = "13.36,52.50,13.44,52.54"
AREA = parse_area({"bbox": [BBOX]}, resolution=7, max_cells=4000)
EVERY_S = 5.0
"""The drive pings every 5 s; at speed 60 a tick (0.05 s) is 3 s of history, so every
stored position is a tick of its own and the replay shows each one."""


def drive(start: float, minutes: float) -> list[dict[str, Any]]:
    """Two vans circling inside the area and one leaving it eastwards, every EVERY_S."""
    pings = []
    for step in range(int(minutes * 60 / EVERY_S)):
        ts = round(start + step * EVERY_S, 3)
        a = step / 15
        pings.append(
            ping("van-1", 52.52 + 0.004 * math.sin(a), 13.40 + 0.006 * math.cos(a), ts, speed=8.0)
        )
        pings.append(ping("van-2", 52.51, 13.39 + 0.0003 * step, ts, heading=90.0))
        pings.append(ping("van-3", 52.53, 13.42 + 0.001 * step, ts, speed=20.0, heading=90.0))
    return pings


Position = tuple[float, float, float]


def stored(pings: list[dict[str, Any]], start: float, end: float) -> dict[str, list[Position]]:
    """The area's pings in ``[start, end)`` at the wire's precision, per vehicle."""
    out: dict[str, list[Position]] = {}
    for p in pings:
        if start <= p["ts"] < end and h3i.latlng_to_cell(p["lat"], p["lon"], 7) in AREA:
            out.setdefault(p["vehicle_id"], []).append(
                (p["ts"], round(p["lat"] * 1e5) / 1e5, round(p["lon"] * 1e5) / 1e5)
            )
    return out


def same(shown: list[Position], expected: list[Position]) -> bool:
    """Equal at the wire's precision: ts to 0.1 s, coordinates to 1e-5 degree (one unit
    either way: the store keeps 1e-6 degree, which the wire rounds again)."""
    return len(shown) == len(expected) and all(
        abs(a[0] - b[0]) <= 0.051 and abs(a[1] - b[1]) < 1.01e-5 and abs(a[2] - b[2]) < 1.01e-5
        for a, b in zip(shown, expected, strict=True)
    )


def shown_in_order(shown: list[Position], expected: list[Position]) -> bool:
    """Every shown position is one of ``expected`` (as :func:`same` compares), in order."""
    remaining = iter(expected)
    return all(any(same([position], [candidate]) for candidate in remaining) for position in shown)


async def history_server(start_server: StartServer, tmp_path: Path, **config: Any) -> RunningServer:
    return await start_server(
        history=str(tmp_path / "history.sqlite3"), history_commit_s=0.05, **config
    )


async def ingest_drive(server: RunningServer, pings: list[dict[str, Any]]) -> None:
    """POST the drive in time order and wait until history has committed it."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        for at in range(0, len(pings), 500):
            reply = await post_pings(http, pings[at : at + 500])
            assert reply.status_code == 200, reply.text
    history = server.tracker.history
    assert history is not None
    with trio.fail_after(10):
        while history.queued:
            await trio.sleep(0.02)


async def read_all(feed: Feed, timeout: float = 30) -> list[str]:
    """Read events until ``end``; the kinds in order."""
    kinds = []
    with trio.fail_after(timeout):
        while True:
            event = await feed.next_event(timeout)
            kinds.append(event.event)
            if event.event == "end":
                return kinds


def published(feed: Feed) -> dict[str, list[Position]]:
    """Every position each vehicle was shown at, in order, replaying the feed's events."""
    view = FeedView()
    seen: dict[str, list[Position]] = {}
    for event in feed.events:
        view.apply(event.event, event.data)
        for vehicle in view.by_id().values():
            p = vehicle.position
            track = seen.setdefault(vehicle.vehicle_id, [])
            if not track or track[-1][0] != p.ts:
                track.append((p.ts, p.lat, p.lon))
    return seen


async def test_a_replay_plays_the_stored_drive_in_order_then_ends(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await history_server(start_server, tmp_path)
    start = time.time() - 3600
    pings = drive(start - 60, minutes=6)
    await ingest_drive(server, pings)
    frm, to = start, start + 240
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        query = f"bbox={BBOX}&from={frm}&to={to}&speed=60"
        async with open_feed(http, query) as feed:
            kinds = await read_all(feed)
    assert kinds[0] == "snapshot" and kinds[-1] == "end" and set(kinds[1:-1]) <= {"batch"}
    end = msgspec.json.decode(feed.events[-1].data)
    assert end == {"reason": "finished", "t": round(to * 1000)}
    # The snapshot at from=: every van where it last was before it.
    snapshot = FeedView()
    snapshot.apply("snapshot", feed.events[0].data)
    before = stored(pings, frm - 60, frm)
    assert {v: s.position[1:3] for v, s in snapshot.by_id().items()} == {
        v: track[-1][1:] for v, track in before.items()
    }
    # Then the stored positions of the window, in time order, at the wire's precision:
    # each one a tick of its own, unless a tick came late (a loaded machine) and covered
    # what it missed in one batch, showing the last position of it, as documented.
    shown = published(feed)
    for vehicle, track in stored(pings, frm, to).items():
        window = [p for p in shown[vehicle] if p[0] >= track[0][0] - 0.051]
        assert shown_in_order(window, track), vehicle
        assert same(window[-1:], track[-1:]) and len(window) >= len(track) // 2, vehicle
    # van-3 left the area during the drive: the replay dropped it, as a live feed would.
    assert "van-3" in shown and "van-3" not in final_ids(feed)
    assert all(e.id.startswith("replay.") for e in feed.events)


def final_ids(feed: Feed) -> set[str]:
    """The vehicles a client following ``feed`` holds at its end."""
    view = FeedView()
    for event in feed.events:
        view.apply(event.event, event.data)
    return set(view.by_id())


async def test_bad_replay_parameters_get_400(start_server: StartServer, tmp_path: Path) -> None:
    server = await history_server(start_server, tmp_path)
    now = time.time()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        for params in (
            "from=yesterday",
            f"from={now - 60}&speed=0",
            f"from={now - 60}&speed=5000",
            f"from={now - 60}&speed=nan",
            f"from={now - 60}&to={now - 120}",
            f"from={now - 40 * 86_400}",  # before the retention (30 days)
            f"from={now + 60}",
            "from=" + "9" * 5000,
            "from=%FF%FE",
        ):
            reply = await feed_head(http, f"/feed?bbox={BBOX}&{params}")
            assert reply.status_code == 400, params
            assert reply.json()["message"], params


async def test_a_tracker_without_history_refuses_replays(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        reply = await feed_head(http, f"/feed?bbox={BBOX}&from={time.time() - 60}")
    assert reply.status_code == 404 and reply.json()["error"] == "history_disabled"
    assert "history" in reply.json()["message"]


async def test_a_replay_beyond_the_token_area_gets_403(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await history_server(start_server, tmp_path, **SECURE)
    token = mint_token(bbox=["13.38,52.51,13.42,52.53"])
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        query = f"bbox={BBOX}&from={time.time() - 60}&token={token}"
        reply = await feed_head(http, f"/feed?{query}")
        assert reply.status_code == 403 and reply.json()["error"] == "forbidden_area"
        inside = f"bbox=13.39,52.515,13.41,52.525&from={time.time() - 60}&token={token}"
        async with open_feed(http, inside) as feed:
            assert (await feed.next_event()).event == "snapshot"


async def test_replay_ids_and_live_ids_never_mix(start_server: StartServer, tmp_path: Path) -> None:
    server = await history_server(start_server, tmp_path)
    start = time.time() - 600
    await ingest_drive(server, drive(start, minutes=2))
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        query = f"bbox={BBOX}&from={start}&to={start + 60}&speed=200"
        async with open_feed(http, query) as replay:
            await read_all(replay)
        # A live feed given a replay's id: a snapshot, never a replay of live batches.
        headers = {"Last-Event-ID": replay.events[1].id}
        async with open_feed(http, f"bbox={BBOX}", headers) as live:
            first = await live.next_event()
            assert first.event == "snapshot" and not first.id.startswith("replay.")
        # A replay given a live id starts at from=; given its own last id, 204.
        async with open_feed(http, query, {"Last-Event-ID": first.id}) as again:
            assert (await again.next_event()).id == replay.events[0].id
        finished = await feed_head(
            http, f"/feed?{query}", headers={"Last-Event-ID": replay.last_id}
        )
        assert finished.status_code == 204


async def test_a_replay_holds_a_feed_place(start_server: StartServer, tmp_path: Path) -> None:
    server = await history_server(start_server, tmp_path, max_streams_per_address=1)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        async with open_feed(http, f"bbox={BBOX}") as live:
            await live.next_event()
            refused = await feed_head(http, f"/feed?bbox={BBOX}&from={time.time() - 60}")
            assert refused.status_code == 429
        with trio.fail_after(5):
            while True:  # the live feed's place frees once its response ends
                reply = await feed_head(http, f"/feed?bbox={BBOX}&from={time.time() - 60}")
                if reply.status_code == 200:
                    break
                await trio.sleep(0.05)


async def test_a_stalled_replay_reader_slows_its_replay_and_queues_nothing(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await history_server(start_server, tmp_path, sndbuf_bytes=4096)
    start = time.time() - 3600
    fleet = [
        ping(
            f"v{i}",
            52.50 + (i % 40) * 0.001,
            13.36 + (i // 40) * 0.002,
            start + step * 5 + i / 1000,
        )
        for step in range(60)
        for i in range(400)
    ]
    await ingest_drive(server, fleet)
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((host, port))
    stalled = trio.SocketStream(sock)
    query = f"bbox={BBOX}&from={start}&to={start + 300}&speed=100&format=json"
    await stalled.send_all(f"GET /feed?{query} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    metrics = server.tracker.metrics
    with trio.fail_after(5):
        while metrics.gauges["replays"][1]() < 1:
            await trio.sleep(0.02)
    await trio.sleep(1)
    sent = metrics.bytes_sent
    await trio.sleep(2)  # 2 s at speed 100: 200 s of history a reader would have had
    # Nothing more was made while nobody read: a replay is pulled, not queued.
    assert metrics.bytes_sent - sent < 64 * 1024
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        assert (await http.get("/healthz")).status_code == 200
        async with open_feed(http, f"bbox={BBOX}&from={start}&to={start + 30}&speed=100") as other:
            await read_all(other, timeout=10)  # others are not delayed by it
    await stalled.aclose()
    with trio.fail_after(5):
        while metrics.gauges["replays"][1]() > 0:
            await trio.sleep(0.02)


async def test_shutdown_ends_a_replay_with_the_shutdown_event(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await history_server(start_server, tmp_path)
    start = time.time() - 600
    await ingest_drive(server, drive(start, minutes=2))
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
        open_feed(http, f"bbox={BBOX}&from={start}&speed=1") as feed,
    ):
        await feed.next_event()
        server.shutdown.set()
        with trio.fail_after(5):
            while (await feed.next_event()).event != "shutdown":
                pass
