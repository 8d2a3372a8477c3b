"""POST /ingest over real HTTP: acceptance, partial rejection, and every documented error."""

from __future__ import annotations

import json
import math
import time

import httpx
import msgspec

from tests.conftest import (
    BERLIN,
    BERLIN_BBOX,
    INGEST_KEY,
    MUNICH,
    RunningServer,
    StartServer,
    ping,
    post_pings,
)
from tests.sse import open_feed


async def test_ingest_accepts_msgpack_and_json(client: httpx.AsyncClient) -> None:
    now = time.time()
    response = await post_pings(client, [ping("m", *BERLIN, now)])
    assert response.status_code == 200
    assert response.json() == {"accepted": 1, "ignored": 0, "rejected": []}
    response = await client.post("/ingest", json=[ping("j", *BERLIN, now, speed=3, heading=10)])
    assert response.status_code == 200
    assert response.json()["accepted"] == 1


async def test_ingest_keeps_valid_pings_and_explains_each_rejection(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    now = time.time()
    batch = [
        ping("ok-1", *BERLIN, now),
        ping("", *BERLIN, now),  # empty id
        ping("nan", math.nan, 13.4, now),
        ping("far-north", 89.0, 13.4, now),
        ping("lon", 52.5, 181.0, now),
        ping("future", *BERLIN, now + 3600),
        {"vehicle_id": "typed", "lat": "north", "lon": 13.4, "ts": now},
        ping("x" * 65, *BERLIN, now),
        ping("ok-2", *BERLIN, now, speed=-1),
        ping("ok-3", *BERLIN, now),
    ]
    response = await post_pings(client, batch)
    assert response.status_code == 200
    body = response.json()
    assert body["accepted"] == 2
    reasons = {r["index"]: r["error"] for r in body["rejected"]}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert "length" in reasons[1]
    assert "finite" in reasons[2]
    assert "band" in reasons[3]
    assert "lon" in reasons[4]
    assert "future" in reasons[5]
    assert "lat" in reasons[6] and "float" in reasons[6]
    assert "speed" in reasons[8]
    assert server.tracker.metrics.pings_rejected == 8


async def test_ingest_ignores_and_counts_out_of_order_pings(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    now = time.time()
    await post_pings(client, [ping("v", 52.52, 13.40, now)])
    response = await post_pings(client, [ping("v", *MUNICH, now - 5), ping("v", *MUNICH, now)])
    assert response.json() == {"accepted": 0, "ignored": 2, "rejected": []}
    # Whatever the ticks did meanwhile, the vehicle is where its first ping put it.
    await server.wait_for_ticks(2)
    async with open_feed(client, f"bbox={BERLIN_BBOX}") as feed:
        await feed.next_event()
        assert abs(feed.view.by_id()["v"].position.lat - 52.52) < 1e-4


async def test_ingest_with_every_ping_rejected_is_422(client: httpx.AsyncClient) -> None:
    response = await post_pings(client, [ping("", *BERLIN, time.time())])
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "nothing_accepted"
    assert body["rejected"][0]["index"] == 0


async def test_ingest_rejects_bodies_that_are_not_batches(client: httpx.AsyncClient) -> None:
    for content, media in [
        (b"\xc1\xc1", "application/msgpack"),
        (b"{not json", "application/json"),
        (json.dumps({"vehicle_id": "v"}).encode(), "application/json"),
        (msgspec.msgpack.encode(42), "application/msgpack"),
    ]:
        response = await client.post("/ingest", content=content, headers={"Content-Type": media})
        assert response.status_code == 400, content
        assert response.json()["error"] == "bad_body"
        assert "array of pings" in response.json()["message"]


async def test_ingest_rejects_unknown_media_types_with_415(client: httpx.AsyncClient) -> None:
    response = await client.post("/ingest", content=b"x", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    assert "application/msgpack" in response.json()["allowed"]
    response = await client.post("/ingest", content=b"[]")
    assert response.status_code == 415


async def test_ingest_rejects_oversized_bodies_and_batches_with_413(
    start_server: StartServer,
) -> None:
    server = await start_server(ingest_max_bytes=4096, ingest_max_pings=10)
    async with httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY) as client:
        now = time.time()
        big = [ping(f"v{i}", *BERLIN, now) for i in range(200)]
        response = await post_pings(client, big)
        assert response.status_code == 413
        assert response.json()["error"] == "too_large"

        async def chunks():  # no Content-Length: the limit must hold while streaming too
            for _ in range(10):
                yield b" " * 1000

        response = await client.post(
            "/ingest", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413
        response = await post_pings(client, [ping(f"v{i}", *BERLIN, now) for i in range(11)])
        assert response.status_code == 413
        assert "at most 10" in response.json()["message"]


async def test_unknown_paths_and_methods_get_json_errors(client: httpx.AsyncClient) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    response = await client.get("/ingest")
    assert response.status_code == 405


async def test_healthz_and_metrics(server: RunningServer, client: httpx.AsyncClient) -> None:
    await post_pings(client, [ping("v", *BERLIN, time.time()), ping("", *BERLIN, time.time())])
    health = (await client.get("/healthz")).json()
    assert health["status"] == "ok" and health["vehicles"] == 1
    text = (await client.get("/metrics")).text
    for line in (
        "tracker_pings_accepted_total 1.0",
        "tracker_pings_rejected_total 1.0",
        "tracker_vehicles 1.0",
        "tracker_subscribers 0.0",
    ):
        assert line in text.splitlines(), line
    for name in ("events_sent", "bytes_sent", "conflations", "tick_duration_seconds_count"):
        assert f"tracker_{name}" in text
