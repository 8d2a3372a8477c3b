"""``GET /alerts`` over real sockets: live events, filters, token areas, resume from the
log, bad resume ids, slow and stalled readers, shutdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.alerts_tools import open_alerts, zone_event
from tests.conftest import BERLIN_BBOX, MUNICH, StartServer
from tests.credentials import SECRET, SECURE, mint_token
from tracker.auth import Keyring


@pytest.fixture
def state(tmp_path: Path) -> dict[str, Any]:
    """Server settings with a private database (history in the test's directory)."""
    return {"history": str(tmp_path / "tracker.sqlite3")}


async def test_events_stream_live_with_their_ids(
    start_server: StartServer, state: dict[str, Any]
) -> None:
    server = await start_server(**state)
    log = server.tracker.alerts
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
        open_alerts(http) as reader,
    ):
        log.emit([zone_event(1), zone_event(2, type="exit", inside_s=3.5, reason="left")])
        first, second = await reader.alerts(2)
        assert first["vehicle"] == "v1" and first["type"] == "enter"
        assert second == {**second, "type": "exit", "inside_s": 3.5, "reason": "left"}
        assert second["id"] == first["id"] + 1


async def test_filters_by_zone_kind_and_area(
    start_server: StartServer, state: dict[str, Any]
) -> None:
    server = await start_server(**state)
    log = server.tracker.alerts
    events = [
        zone_event(1, zone="a", kind="depot"),
        zone_event(2, zone="b", kind="customer"),
        zone_event(3, zone="c", kind="depot", lat=MUNICH[0], lon=MUNICH[1]),
        zone_event(4, zone="b", kind="depot"),
    ]
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        queries = {
            "zones=a,b": ["v1", "v2", "v4"],
            "zones=a&zones=c": ["v1", "v3"],
            "kind=depot": ["v1", "v3", "v4"],
            "kind=depot&zones=b": ["v4"],
            f"bbox={BERLIN_BBOX}": ["v1", "v2", "v4"],
            f"bbox={BERLIN_BBOX}&kind=customer": ["v2"],
        }
        log.emit(events)
        with trio.fail_after(5):
            while log.last_id < 4:
                await trio.sleep(0.01)
        for query, vehicles in queries.items():
            async with open_alerts(http, query + "&last_event_id=0") as reader:
                seen = [a["vehicle"] for a in await reader.until_quiet()]
            assert seen == vehicles, query


async def test_resume_from_the_log_with_no_gap_and_no_repeat(
    start_server: StartServer, state: dict[str, Any]
) -> None:
    server = await start_server(**state, alerts_memory_events=3)
    log = server.tracker.alerts
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        async with open_alerts(http) as reader:
            log.emit([zone_event(i) for i in range(5)])
            seen = await reader.alerts(5)
        last = seen[-1]["id"]
        log.emit([zone_event(i) for i in range(5, 10)])  # while nobody listens
        async with open_alerts(http, headers={"Last-Event-ID": str(last)}) as reader:
            resumed = await reader.alerts(5)
            log.emit([zone_event(10)])
            resumed += await reader.alerts(1)
        assert [a["id"] for a in resumed] == list(range(last + 1, last + 7))
        assert [a["vehicle"] for a in resumed] == [f"v{i}" for i in range(5, 11)]
        async with open_alerts(http, "last_event_id=0") as reader:  # the whole log
            everything = await reader.alerts(11)
        assert [a["id"] for a in everything] == list(range(1, 12))


async def test_bad_resume_ids_are_400_and_unknown_ones_say_gap(
    start_server: StartServer, state: dict[str, Any]
) -> None:
    server = await start_server(**state)
    server.tracker.alerts.emit([zone_event(1)])
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        bad_ids: list[str | bytes] = ["abc", "-1", "1.5", "9" * 40, "9223372036854775808"]
        bad_ids += ["x" * 5000, "\u0663".encode(), b"\xff\xfe1"]  # Arabic-Indic 3, not UTF-8
        for bad in bad_ids:
            response = await http.get("/alerts", headers={"Last-Event-ID": bad})
            assert response.status_code == 400, bad
            assert response.json()["error"] == "bad_last_event_id"
        for query in ["last_event_id=%FF%FE", "last_event_id=%D9%A3"]:
            response = await http.get(f"/alerts?{query}")
            assert response.status_code == 400, query
        for query in ["nope=1", "zones=" + "z" * 200, "zones=" + ",".join(["a"] * 300) + ",b"]:
            response = await http.get(f"/alerts?{query}")
            assert response.status_code == 400, query
            assert response.json()["error"] == "bad_request"
        assert (await http.get("/alerts?bbox=1,2,3")).json()["error"] == "bad_area"
        async with open_alerts(http, headers={"Last-Event-ID": "9223372036854775807"}) as reader:
            gap = await reader.next()
            assert gap.event == "gap" and gap.id is None
            assert gap.json() == {
                "after": 9223372036854775807,
                "resumed_after": server.tracker.alerts.last_id,
                "reason": "unknown_id",
            }
            server.tracker.alerts.emit([zone_event(2)])
            assert (await reader.alerts(1))[0]["vehicle"] == "v2"


async def test_an_area_token_sees_only_its_area(
    start_server: StartServer, state: dict[str, Any]
) -> None:
    server = await start_server(**SECURE, **state)
    token = mint_token(bbox=[BERLIN_BBOX])
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        assert (await http.get("/alerts")).status_code == 401
        response = await http.get(
            f"/alerts?token={token}&lat={MUNICH[0]}&lon={MUNICH[1]}&radius_m=500"
        )
        assert response.status_code == 403 and response.json()["error"] == "forbidden_area"
        async with open_alerts(http, f"token={token}") as reader:
            server.tracker.alerts.emit(
                [
                    zone_event(1, lat=MUNICH[0], lon=MUNICH[1]),
                    zone_event(2),
                    zone_event(3, lat=MUNICH[0], lon=MUNICH[1]),
                    zone_event(4),
                ]
            )
            assert [a["vehicle"] for a in await reader.alerts(2)] == ["v2", "v4"]


async def test_a_stalled_reader_neither_stalls_others_nor_loses_events(
    start_server: StartServer, state: dict[str, Any]
) -> None:
    """One client opens a stream and never reads (4 KiB socket buffers at both ends); a
    thousand events later (250 KB), a reading client has every one of them, and the
    stalled one, once it reads, too."""
    server = await start_server(**state, sndbuf_bytes=4096)
    log = server.tracker.alerts
    host, port = server.url.removeprefix("http://").split(":")
    stalled = await trio.open_tcp_stream(host, int(port))
    stalled.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await stalled.send_all(b"GET /alerts?last_event_id=0 HTTP/1.1\r\nHost: x\r\n\r\n")
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
        open_alerts(http) as reader,
    ):
        for batch in range(10):
            log.emit([zone_event(batch * 100 + i) for i in range(100)])
        alerts = await reader.alerts(1000, timeout=20)
        assert [a["id"] for a in alerts] == list(range(1, 1001))
    # The stalled stream held one page at most; reading now, it gets everything in order.
    received = bytearray()
    alerts_read = 0
    marker = b"event: alert"
    with trio.fail_after(20):
        while alerts_read < 1000:
            chunk = await stalled.receive_some(1 << 20)
            assert chunk, "the stalled stream was closed"
            start = max(0, len(received) - len(marker) + 1)  # a marker split across chunks
            received += chunk
            alerts_read += received.count(marker, start)
    await stalled.aclose()
    ids = [int(line[4:]) for line in received.split(b"\n") if line.startswith(b"id: ")]
    assert ids == list(range(1, 1001))


async def test_streams_end_with_a_shutdown_event(
    start_server: StartServer, state: dict[str, Any]
) -> None:
    server = await start_server(**state)
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
        open_alerts(http) as reader,
    ):
        server.tracker.shutdown()
        event = await reader.next()
        assert event.event == "shutdown"


async def test_backlog_starts_with_the_newest_matching_events(
    start_server: StartServer, state: dict[str, Any]
) -> None:
    server = await start_server(**state)
    log = server.tracker.alerts
    log.emit([zone_event(i, zone="a" if i % 2 else "b") for i in range(10)])
    with trio.fail_after(5):
        while log.last_id < 10:
            await trio.sleep(0.01)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        async with open_alerts(http, "backlog=3&zones=a") as reader:
            assert [a["vehicle"] for a in await reader.alerts(3)] == ["v5", "v7", "v9"]
        async with open_alerts(http, "backlog=100") as reader:
            assert len(await reader.until_quiet()) == 10
        for bad in ["101", "-1", "x", "1e2", "0" * 10]:
            assert (await http.get(f"/alerts?backlog={bad}")).status_code == 400, bad


async def test_a_token_bound_to_vehicles_sees_only_their_events(
    start_server: StartServer, state: dict[str, Any]
) -> None:
    """A tracking link (a token bound to one van) must not read the fleet's alerts."""
    server = await start_server(**SECURE, **state)
    keyring = Keyring([SECRET], resolution=7, max_cells=4000)
    van = keyring.mint(ttl_s=60, vehicles=["v2"])
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
        open_alerts(http, f"token={van}") as reader,
    ):
        server.tracker.alerts.emit([zone_event(i) for i in range(1, 5)])
        server.tracker.alerts.emit([zone_event(2, type="exit")])
        seen = await reader.alerts(2)
    assert [(a["vehicle"], a["type"]) for a in seen] == [("v2", "enter"), ("v2", "exit")]
