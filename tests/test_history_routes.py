"""GET /vehicles/{id}/track and GET /history over real sockets, on a real SQLite history.

Pings go in through POST /ingest and are read back once committed: every format round
trips, simplification keeps endpoints, cursors page through exactly, tokens bound what
is read, and every bad parameter is a 400 with a message (the fuzzing is in
tests/test_fuzz_http.py).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h3.api.basic_int as h3i
import httpx
import msgspec
import numpy as np
import pytest
import shapely
import trio

from tests.conftest import BERLIN, BERLIN_BBOX, INGEST_KEY, MUNICH, StartServer, ping, post_pings
from tests.credentials import SECURE, mint_token
from tracker.history.routes import MAX_LIMIT, MAX_TRACK_WINDOW_S
from tracker.regions import parse_area

NOW = time.time()
START, END = NOW - 3600, NOW + 60
WINDOW = {"from": f"{START:.3f}", "to": f"{END:.3f}"}
N = 400
"""Positions of the main test track: one every 5 s, east across central Berlin."""


def _berlin_track(vehicle_id: str = "van-1", n: int = N) -> list[dict[str, Any]]:
    """A zigzag east through central Berlin (about 11 m a step, 5 m off the line)."""
    return [
        ping(
            vehicle_id,
            round(BERLIN[0] + (i % 2) * 5e-5, 6),
            round(BERLIN[1] - 0.02 + i * 1.6e-4, 6),
            round(NOW - 3000 + i * 5, 3),
            speed=round(5 + (i % 7), 1),
            heading=float(90 + i % 3),
        )
        for i in range(n)
    ]


VAN_1_CELLS = ",".join(
    sorted({h3i.int_to_str(h3i.latlng_to_cell(p["lat"], p["lon"], 7)) for p in _berlin_track()})
)
"""The cells van-1 drove through (van-2 is parked in one of them)."""


async def _stored(server: Any, client: httpx.AsyncClient, pings: list[dict[str, Any]]) -> None:
    """Ingest ``pings`` (in batches) and wait until history committed them."""
    for at in range(0, len(pings), 500):
        reply = await post_pings(client, pings[at : at + 500])
        assert reply.json()["accepted"] == len(pings[at : at + 500]), reply.text
    with trio.fail_after(10):
        while server.tracker.history.queued:
            await trio.sleep(0.02)


@pytest.fixture
async def history(start_server: StartServer, tmp_path: Path) -> Any:
    return await start_server(history=str(tmp_path / "history.sqlite3"), history_commit_s=0.05)


@pytest.fixture
async def http(history: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=history.url, timeout=10, headers=INGEST_KEY) as client:
        yield client


@pytest.fixture
async def berlin(history: Any, http: httpx.AsyncClient) -> list[dict[str, Any]]:
    """van-1 across Berlin (N positions), van-2 parked in Berlin, van-3 in Munich."""
    track = _berlin_track()
    parked = [ping("van-2", BERLIN[0], BERLIN[1], NOW - 3000 + i * 60) for i in range(40)]
    munich = [ping("van-3", MUNICH[0], MUNICH[1], NOW - 3000 + i * 60) for i in range(40)]
    await _stored(history, http, track + parked + munich)
    return track


def _columns(pings: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {name: [p[name] for p in pings] for name in ("ts", "lat", "lon", "speed", "heading")}


async def _track(http: httpx.AsyncClient, vehicle: str = "van-1", **params: Any) -> httpx.Response:
    return await http.get(f"/vehicles/{vehicle}/track", params={**WINDOW, **params})


# --- formats ---------------------------------------------------------------------------------


async def test_track_json_round_trips(
    http: httpx.AsyncClient, berlin: list[dict[str, Any]]
) -> None:
    response = await _track(http)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    page = response.json()
    assert page["vehicle_id"] == "van-1" and page["count"] == N
    assert {k: page[k] for k in ("ts", "lat", "lon", "speed", "heading")} == _columns(berlin)
    assert page["cursor"] is None and page["filtered"] is False and page["tolerance_m"] is None
    assert page["from"] == pytest.approx(START, abs=1e-3)


async def test_track_msgpack_round_trips(
    http: httpx.AsyncClient, berlin: list[dict[str, Any]]
) -> None:
    response = await _track(http, format="msgpack")
    assert response.headers["content-type"] == "application/msgpack"
    page = msgspec.msgpack.decode(response.content)
    expected = _columns(berlin)
    assert page["count"] == N
    assert np.frombuffer(page["ts"], "<f8").tolist() == expected["ts"]
    assert np.frombuffer(page["lat_e6"], "<i4").tolist() == [
        round(v * 1e6) for v in expected["lat"]
    ]
    assert np.frombuffer(page["lon_e6"], "<i4").tolist() == [
        round(v * 1e6) for v in expected["lon"]
    ]
    assert np.frombuffer(page["speed"], "<f4").tolist() == expected["speed"]


async def test_track_geojson_is_a_valid_feature(
    http: httpx.AsyncClient, berlin: list[dict[str, Any]]
) -> None:
    response = await _track(http, format="geojson")
    assert response.headers["content-type"] == "application/geo+json"
    feature = response.json()
    assert feature["type"] == "Feature"
    line = shapely.from_geojson(json.dumps(feature["geometry"]))
    assert line.geom_type == "LineString" and line.is_valid and len(line.coords) == N
    assert feature["geometry"]["coordinates"][0] == [berlin[0]["lon"], berlin[0]["lat"]]
    times = feature["properties"]["coordTimes"]
    assert len(times) == N and times[0].endswith("Z")
    assert np.datetime64(times[-1].rstrip("Z")).astype("datetime64[ms]").astype(float) / 1000 == (
        pytest.approx(berlin[-1]["ts"], abs=1e-3)
    )


async def test_an_unknown_vehicle_has_an_empty_track(http: httpx.AsyncClient, history: Any) -> None:
    page = (await _track(http, "nobody")).json()
    assert page["count"] == 0 and page["ts"] == [] and page["cursor"] is None
    feature = (await _track(http, "nobody", format="geojson")).json()
    assert feature["geometry"] is None


async def test_vehicle_ids_with_slashes_and_unicode_are_addressable(
    history: Any, http: httpx.AsyncClient
) -> None:
    vehicle = "fleet/7\nü"
    await _stored(history, http, [ping(vehicle, BERLIN[0], BERLIN[1], NOW - 100)])
    response = await http.get(
        f"/vehicles/{urllib.parse.quote(vehicle, safe='')}/track", params=WINDOW
    )
    assert response.json()["vehicle_id"] == vehicle and response.json()["count"] == 1


# --- simplification and paging ---------------------------------------------------------------


async def test_simplification_drops_wiggles_and_keeps_the_endpoints(
    http: httpx.AsyncClient, berlin: list[dict[str, Any]]
) -> None:
    page = (await _track(http, tolerance_m="20")).json()
    assert 2 <= page["count"] < N / 10  # the 5 m zigzag is gone
    assert page["tolerance_m"] == 20.0
    assert page["ts"][0] == berlin[0]["ts"] and page["ts"][-1] == berlin[-1]["ts"]
    by_time = {p["ts"]: p for p in berlin}
    for ts, lat, lon in zip(page["ts"], page["lat"], page["lon"], strict=True):
        assert (by_time[ts]["lat"], by_time[ts]["lon"]) == (lat, lon)  # kept points, kept times
    fine = (await _track(http, tolerance_m="1")).json()
    assert fine["count"] == N


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_cursor_paging_reconstructs_the_track_exactly(
    http: httpx.AsyncClient, berlin: list[dict[str, Any]], fmt: str
) -> None:
    times: list[float] = []
    cursor = None
    for _ in range(20):
        params = {"limit": "37", "format": fmt, **({"cursor": cursor} if cursor else {})}
        response = await _track(http, **params)
        assert response.status_code == 200, response.text
        if fmt == "json":
            page = response.json()
            times += page["ts"]
        else:
            page = msgspec.msgpack.decode(response.content)
            times += np.frombuffer(page["ts"], "<f8").tolist()
        assert page["count"] <= 37
        cursor = page["cursor"]
        if cursor is None:
            break
    assert times == [p["ts"] for p in berlin]


async def test_a_cursor_only_continues_its_own_query(
    http: httpx.AsyncClient, berlin: list[dict[str, Any]]
) -> None:
    cursor = (await _track(http, limit="10")).json()["cursor"]
    assert cursor
    other = await _track(http, "van-2", cursor=cursor)
    moved = await http.get(
        "/vehicles/van-1/track", params={**WINDOW, "to": f"{END - 1:.3f}", "cursor": cursor}
    )
    area = await http.get("/history", params={**WINDOW, "bbox": BERLIN_BBOX, "cursor": cursor})
    for response in (other, moved, area):
        assert response.status_code == 400
        assert response.json()["param"] == "cursor"


# --- area queries ----------------------------------------------------------------------------


async def _area_pages(http: httpx.AsyncClient, **params: Any) -> tuple[dict[str, Any], int]:
    """Every page of an area query merged: vehicle id -> ts list; and the page count."""
    merged: dict[str, list[float]] = {}
    cursor, pages = None, 0
    while True:
        query = {**WINDOW, **params, **({"cursor": cursor} if cursor else {})}
        response = await http.get("/history", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        pages += 1
        assert page["count"] == sum(v["count"] for v in page["vehicles"])
        for vehicle in page["vehicles"]:
            merged.setdefault(vehicle["vehicle_id"], []).extend(vehicle["ts"])
        cursor = page["cursor"]
        if cursor is None:
            return merged, pages


@pytest.mark.parametrize(
    "area",
    [
        {"bbox": BERLIN_BBOX},
        {"lat": str(BERLIN[0]), "lon": str(BERLIN[1]), "radius_m": "8000"},
        {"cells": VAN_1_CELLS},
    ],
)
async def test_area_query_finds_who_was_there(
    http: httpx.AsyncClient, berlin: list[dict[str, Any]], area: dict[str, str]
) -> None:
    merged, _ = await _area_pages(http, **area)
    assert set(merged) == {"van-1", "van-2"}  # not van-3 in Munich
    assert merged["van-1"] == [p["ts"] for p in berlin]
    assert len(merged["van-2"]) == 40


async def test_area_query_pages_through_every_position(
    http: httpx.AsyncClient, berlin: list[dict[str, Any]]
) -> None:
    merged, pages = await _area_pages(http, bbox=BERLIN_BBOX, limit="50")
    assert pages >= (N + 40) // 50
    assert merged["van-1"] == [p["ts"] for p in berlin] and len(merged["van-2"]) == 40


async def test_area_query_returns_only_positions_inside_the_area(
    http: httpx.AsyncClient, berlin: list[dict[str, Any]]
) -> None:
    west_half = "13.30,52.48,13.405,52.56"
    merged, _ = await _area_pages(http, bbox=west_half)
    inside = [
        p["ts"] for p in berlin if h3i.latlng_to_cell(p["lat"], p["lon"], 7) in _cells(west_half)
    ]
    assert 0 < len(merged["van-1"]) < N and merged["van-1"] == inside


def _cells(bbox: str) -> frozenset[int]:
    return parse_area({"bbox": [bbox]}, resolution=7, max_cells=4000)


async def test_area_query_in_geojson_is_a_feature_collection(
    http: httpx.AsyncClient, berlin: list[dict[str, Any]]
) -> None:
    response = await http.get(
        "/history", params={**WINDOW, "bbox": BERLIN_BBOX, "format": "geojson"}
    )
    collection = response.json()
    assert collection["type"] == "FeatureCollection"
    ids = [feature["properties"]["vehicle_id"] for feature in collection["features"]]
    assert ids == ["van-1", "van-2"]


# --- who reads what --------------------------------------------------------------------------


@pytest.fixture
async def secure(start_server: StartServer, tmp_path: Path) -> Any:
    server = await start_server(
        history=str(tmp_path / "history.sqlite3"), history_commit_s=0.05, **SECURE
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        await _stored(server, client, _berlin_track())
        await _stored(server, client, [ping("van-3", MUNICH[0], MUNICH[1], NOW - 100)])
    return server


EAST = "13.40,52.50,13.45,52.54"
"""The token's area in the secure tests: the eastern part of van-1's track."""


async def test_an_area_token_reads_the_track_inside_its_area_only(secure: Any) -> None:
    token = mint_token(bbox=[EAST])
    async with httpx.AsyncClient(base_url=secure.url, timeout=10) as client:
        page = (await _track(client, token=token)).json()
    allowed = _cells(EAST)
    expected = [
        p["ts"] for p in _berlin_track() if h3i.latlng_to_cell(p["lat"], p["lon"], 7) in allowed
    ]
    assert 0 < page["count"] < N and page["ts"] == expected
    assert page["filtered"] is True


async def test_an_admin_token_reads_the_whole_track(secure: Any) -> None:
    async with httpx.AsyncClient(base_url=secure.url, timeout=10) as client:
        response = await _track(client, token=mint_token())
    assert response.json()["count"] == N and response.json()["filtered"] is False


async def test_an_area_token_reads_its_area_and_is_403_beyond(secure: Any) -> None:
    token = mint_token(bbox=[EAST])
    async with httpx.AsyncClient(
        base_url=secure.url, timeout=10, headers={"Authorization": f"Bearer {token}"}
    ) as client:
        own = await client.get("/history", params=WINDOW)  # no area: the token's
        munich = await client.get("/history", params={**WINDOW, "bbox": "11.5,48.1,11.6,48.2"})
        wider = await client.get("/history", params={**WINDOW, "bbox": BERLIN_BBOX})
    assert own.status_code == 200 and [v["vehicle_id"] for v in own.json()["vehicles"]] == ["van-1"]
    for response in (munich, wider):
        assert response.status_code == 403 and response.json()["error"] == "forbidden_area"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        INGEST_KEY,
        {"Authorization": "Bearer test-ingest-key"},
        {"Authorization": "Bearer x.y.z"},
    ],
)
async def test_no_token_or_an_ingest_key_reads_nothing(
    secure: Any, headers: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=secure.url, timeout=10, headers=headers) as client:
        track = await _track(client)
        area = await client.get("/history", params={**WINDOW, "bbox": BERLIN_BBOX})
    for response in (track, area):
        assert response.status_code == 401 and response.json()["error"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_history_off_is_404_saying_so(start_server: StartServer) -> None:
    server = await start_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        for path in ("/vehicles/van-1/track", "/history"):
            response = await client.get(path, params={**WINDOW, "bbox": BERLIN_BBOX})
            assert response.status_code == 404
            assert response.json()["error"] == "history_disabled"
            assert "--history" in response.json()["message"]


# --- bad parameters --------------------------------------------------------------------------

LONG_AGO = f"{NOW - 40 * 86_400:.0f}"
BAD_TRACK_QUERIES = [
    ({"from": None}, "from= is required"),
    ({"to": None}, "to= is required"),
    ({"from": f"{END:.3f}"}, "must be before"),
    ({"from": f"{END + 5:.3f}"}, "must be before"),
    ({"from": f"{END - MAX_TRACK_WINDOW_S - 1:.3f}"}, "longer than"),
    ({"from": LONG_AGO}, "retention horizon"),
    ({"to": f"{NOW + 30 * 86_400:.0f}"}, "far future"),
    ({"to": f"{NOW * 1000:.0f}"}, "not a time"),
    ({"to": "999999999999"}, "1970..9999"),
    ({"from": "nan"}, "not a time"),
    ({"from": "inf"}, "not a time"),
    ({"from": "1e9"}, "not a time"),
    ({"from": "9" * 400}, "longer than"),
    ({"from": "2025-13-45T00:00:00Z"}, "not a time"),
    ({"limit": "0"}, "out of range"),
    ({"limit": str(MAX_LIMIT + 1)}, "out of range"),
    ({"limit": "9" * 500}, "not a whole number"),
    ({"limit": "ten"}, "not a whole number"),
    ({"limit": "-5"}, "not a whole number"),
    ({"limit": "1e3"}, "not a whole number"),
    ({"limit": "NaN"}, "not a whole number"),
    ({"tolerance_m": "nan"}, "not a number"),
    ({"tolerance_m": "inf"}, "not a number"),
    ({"tolerance_m": "1e400"}, "not a number"),
    ({"tolerance_m": "-1"}, "not a number"),
    ({"tolerance_m": "100001"}, "out of range"),
    ({"format": "xml"}, "not one of"),
    ({"format": "x" * 5000}, "not one of"),
    ({"cursor": "garbage"}, "cursor= is not valid"),
    ({"cursor": "A" * 5000}, "cursor= is not valid"),
]


@pytest.mark.parametrize(("change", "words"), BAD_TRACK_QUERIES)
async def test_bad_track_parameters_are_400(
    http: httpx.AsyncClient, history: Any, change: dict[str, str | None], words: str
) -> None:
    params = {k: v for k, v in {**WINDOW, **change}.items() if v is not None}
    response = await http.get("/vehicles/van-1/track", params=params)
    assert response.status_code == 400, response.text
    assert words in response.json()["message"]


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("from=%FF%FE&to=1", "not a time"),  # invalid UTF-8, percent-encoded
        ("from=1&from=2&to=3", "given 2 times"),
        (f"from={START}&to={END}&limit=%F0%9F%98%80", "not a whole number"),
        (f"from={START}&to={END}&tolerance_m=%FF", "not a number"),
    ],
    ids=["bad-utf8", "from-twice", "emoji-limit", "bad-tolerance"],  # stable across processes
)
async def test_raw_queries_are_400(
    http: httpx.AsyncClient, history: Any, query: str, words: str
) -> None:
    response = await http.get(f"/vehicles/van-1/track?{query}")
    assert response.status_code == 400 and words in response.json()["message"]


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/vehicles/" + "v" * 65 + "/track", "1 to 64 characters"),
        ("/vehicles/%ED%A0%80/track", "not valid UTF-8"),  # a lone surrogate
        ("/vehicles/%FF%FE/track", "not valid UTF-8"),
        ("/vehicles/%C0%AF/track", "not valid UTF-8"),  # an overlong "/"
    ],
)
async def test_bad_vehicle_ids_are_400(
    http: httpx.AsyncClient, history: Any, path: str, words: str
) -> None:
    response = await http.get(path, params=WINDOW)
    assert response.status_code == 400, response.text
    assert words in response.json()["message"]


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({}, "no area"),
        ({"bbox": "1,2,3"}, "bbox="),
        ({"bbox": "-180,-90,180,90"}, "cells"),
        ({"bbox": BERLIN_BBOX, "from": f"{NOW - 2 * 86_400:.0f}"}, "longer than"),
        ({"bbox": BERLIN_BBOX, "limit": "100001"}, "out of range"),
        ({"bbox": BERLIN_BBOX, "cursor": "x"}, "cursor= is not valid"),
        ({"lat": "nan", "lon": "1", "radius_m": "10"}, "lat="),
    ],
)
async def test_bad_area_queries_are_400(
    http: httpx.AsyncClient, history: Any, params: dict[str, str], words: str
) -> None:
    response = await http.get("/history", params={**WINDOW, **params})
    assert response.status_code == 400, response.text
    assert words in response.json()["message"]


async def test_a_huge_query_is_400_unread(http: httpx.AsyncClient, history: Any) -> None:
    response = await http.get("/history", params={**WINDOW, "bbox": "1," * 9000})
    assert response.status_code == 400 and "longer than" in response.json()["message"]


async def test_a_finer_index_cuts_area_answers_to_its_own_cells(
    start_server: StartServer, tmp_path: Path
) -> None:
    """The store indexes by resolution 7; an area of resolution-9 cells gets only those."""
    server = await start_server(
        history=str(tmp_path / "history.sqlite3"), history_commit_s=0.05, h3_resolution=9
    )
    small = "13.39,52.515,13.40,52.525"
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        await _stored(server, client, _berlin_track())
        merged, _ = await _area_pages(client, bbox=small)
    cells = parse_area({"bbox": [small]}, resolution=9, max_cells=4000)
    inside = [
        p["ts"] for p in _berlin_track() if h3i.latlng_to_cell(p["lat"], p["lon"], 9) in cells
    ]
    assert 0 < len(inside) < N and merged["van-1"] == inside
