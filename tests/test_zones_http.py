"""/zones over real sockets: create, read, replace, delete; who may; attacks; restarts.

Every server here keeps its database in the test's temporary directory (``history=``):
zones are stored in the history's database and read back at start.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from tests.conftest import INGEST_KEY, StartServer, ping, post_pings
from tests.credentials import SECURE, admin_token, mint_token
from tracker.zones.events import ZoneEvent
from tracker.zones.routes import MAX_BATCH, MAX_BODY_BYTES, MAX_PAGE

BERLIN_SQUARE = [[13.40, 52.50], [13.41, 52.50], [13.41, 52.51], [13.40, 52.51], [13.40, 52.50]]
MUNICH_SQUARE = [[11.57, 48.13], [11.58, 48.13], [11.58, 48.14], [11.57, 48.14], [11.57, 48.13]]
GEOJSON = {"Content-Type": "application/geo+json"}


def feature(zone_id: str | None = "depot-1", ring: Any = None, **props: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring or BERLIN_SQUARE]},
        "properties": {"name": "Depot Mitte", "kind": "depot", **props},
    }
    if zone_id is not None:
        document["id"] = zone_id
    return document


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_token()}", **GEOJSON}


async def serve(start_server: StartServer, tmp_path: Path, **overrides: Any) -> httpx.AsyncClient:
    server = await start_server(**SECURE, history=str(tmp_path / "h.sqlite3"), **overrides)
    return httpx.AsyncClient(base_url=server.url, timeout=10)


async def test_create_read_replace_delete(start_server: StartServer, tmp_path: Path) -> None:
    async with await serve(start_server, tmp_path) as http:
        created = await http.post("/zones", json=feature(dwell_s=60, ref="A-17"), headers=admin())
        assert created.status_code == 201, created.text
        assert created.headers["location"] == "/zones/depot-1"
        body = created.json()
        assert body["id"] == "depot-1"
        assert body["properties"]["ref"] == "A-17"
        assert body["properties"]["dwell_s"] == 60
        read = await http.get("/zones/depot-1", headers=admin())
        assert read.json() == body
        again = await http.post("/zones", json=feature(), headers=admin())
        assert again.status_code == 409 and again.json()["error"] == "zone_exists"
        replaced = await http.put(
            "/zones/depot-1", json=feature(name="Depot Nord"), headers=admin()
        )
        assert replaced.status_code == 200
        assert replaced.json()["properties"]["name"] == "Depot Nord"
        new = await http.put("/zones/other", json=feature(None), headers=admin())
        assert new.status_code == 201 and new.json()["id"] == "other"
        listed = (await http.get("/zones", headers=admin())).json()
        assert listed["type"] == "FeatureCollection"
        assert [f["id"] for f in listed["features"]] == ["depot-1", "other"]
        assert (await http.delete("/zones/depot-1", headers=admin())).status_code == 204
        assert (await http.delete("/zones/depot-1", headers=admin())).status_code == 404
        gone = await http.get("/zones/depot-1", headers=admin())
        assert gone.status_code == 404 and gone.json()["error"] == "unknown_zone"


async def test_feature_collection_all_or_nothing_and_pages(
    start_server: StartServer, tmp_path: Path
) -> None:
    async with await serve(start_server, tmp_path) as http:
        bad = {"type": "FeatureCollection", "features": [feature("a"), feature("b", dwell_s=-1)]}
        refused = await http.post("/zones", json=bad, headers=admin())
        assert refused.status_code == 400
        assert refused.json()["feature"] == 1 and refused.json()["at"] == "dwell_s"
        assert (await http.get("/zones", headers=admin())).json()["features"] == []
        many = [feature(f"z{n:03}", kind="customer" if n % 2 else "depot") for n in range(25)]
        made = await http.post(
            "/zones", json={"type": "FeatureCollection", "features": many}, headers=admin()
        )
        assert made.status_code == 201 and len(made.json()["features"]) == 25
        seen: list[str] = []
        after = ""
        while True:
            page = (await http.get(f"/zones?limit=10&after={after}", headers=admin())).json()
            seen += [f["id"] for f in page["features"]]
            if "next" not in page:
                break
            after = page["next"]
        assert seen == [f"z{n:03}" for n in range(25)]
        kinds = (await http.get("/zones?kind=customer&limit=100", headers=admin())).json()
        assert len(kinds["features"]) == 12
        for limit in ("0", str(MAX_PAGE + 1), "x", "-1", "9" * 40):
            assert (await http.get(f"/zones?limit={limit}", headers=admin())).status_code == 400
        too_many = {
            "type": "FeatureCollection",
            "features": [feature(f"m{n}") for n in range(MAX_BATCH + 1)],
        }
        assert (await http.post("/zones", json=too_many, headers=admin())).status_code in (400, 413)
        twins = {"type": "FeatureCollection", "features": [feature("t"), feature("t")]}
        assert (await http.post("/zones", json=twins, headers=admin())).status_code == 400


async def test_writing_needs_an_admin_token_reading_is_bound_by_area(
    start_server: StartServer, tmp_path: Path
) -> None:
    async with await serve(start_server, tmp_path) as http:
        await http.post("/zones", json=feature("berlin"), headers=admin())
        await http.post("/zones", json=feature("munich", MUNICH_SQUARE), headers=admin())
        berlin_reader = {"Authorization": f"Bearer {mint_token(bbox=['13.3,52.45,13.5,52.55'])}"}
        everywhere = {"Authorization": f"Bearer {mint_token()}"}
        for method in ("post", "put", "delete"):
            path = "/zones" if method == "post" else "/zones/berlin"
            kwargs: dict[str, Any] = {} if method == "delete" else {"json": feature("x")}
            nobody = await http.request(method.upper(), path, headers=GEOJSON, **kwargs)
            assert nobody.status_code == 401
            reader = await http.request(
                method.upper(), path, headers={**everywhere, **GEOJSON}, **kwargs
            )
            assert reader.status_code == 403 and reader.json()["error"] == "admin_required"
        assert (await http.get("/zones")).status_code == 401
        listed = (await http.get("/zones", headers=berlin_reader)).json()
        assert [f["id"] for f in listed["features"]] == ["berlin"]
        assert (await http.get("/zones/munich", headers=berlin_reader)).status_code == 404
        assert (await http.get("/zones/berlin", headers=berlin_reader)).status_code == 200
        assert len((await http.get("/zones", headers=everywhere)).json()["features"]) == 2
        ingest_key = await http.get("/zones", headers=INGEST_KEY)
        assert ingest_key.status_code == 401


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"\xff\xfe{not json", "application/json", 400),
        (b'{"type": "Feature", "properties": {"name": "\xff"}}', "application/json", 400),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 400),
        (
            b'{"type":"Feature","geometry":{"type":"Polygon","coordinates":[[[1e999,1]]]}}',
            "application/json",
            400,
        ),
        (
            b'{"type":"Feature","geometry":{"type":"Polygon","coordinates":[[['
            + b"9" * 5000
            + b",1]]]}}",
            "application/json",
            400,
        ),
        (b"{}", "text/plain", 415),
        (b"{}", "", 415),
        (b"x" * (MAX_BODY_BYTES + 1), "application/json", 413),
    ],
)
async def test_attacks_get_a_clear_4xx(
    start_server: StartServer, tmp_path: Path, body: bytes, content_type: str, status: int
) -> None:
    async with await serve(start_server, tmp_path) as http:
        headers = {**admin(), "Content-Type": content_type}
        response = await http.post("/zones", content=body, headers=headers)
        assert response.status_code == status, response.text
        assert "error" in response.json()
        put = await http.put("/zones/x", content=body, headers=headers)
        assert put.status_code == status
        assert (await http.get("/healthz")).status_code == 200


async def test_long_and_odd_path_ids(start_server: StartServer, tmp_path: Path) -> None:
    async with await serve(start_server, tmp_path) as http:
        for zone_id in ("x" * 65, "a%20b", "%ff", "a%0Ab", "a:b"):
            response = await http.put(f"/zones/{zone_id}", json=feature(None), headers=admin())
            expected = 201 if zone_id == "a:b" else 400
            assert response.status_code == expected, (zone_id, response.text)
        assert (await http.get("/zones/" + "y" * 5000, headers=admin())).status_code == 404


async def test_zones_survive_a_restart(start_server: StartServer, tmp_path: Path) -> None:
    first = await start_server(**SECURE, history=str(tmp_path / "h.sqlite3"))
    async with httpx.AsyncClient(base_url=first.url, timeout=10) as http:
        await http.post("/zones", json=feature("keep", dwell_s=30), headers=admin())
        await http.post("/zones", json=feature("drop"), headers=admin())
        await http.put("/zones/keep", json=feature(None, name="Kept"), headers=admin())
        await http.delete("/zones/drop", headers=admin())
    await first.stop()
    second = await start_server(**SECURE, history=str(tmp_path / "h.sqlite3"))
    async with httpx.AsyncClient(base_url=second.url, timeout=10) as http:
        listed = (await http.get("/zones", headers=admin())).json()
    assert [(f["id"], f["properties"]["name"]) for f in listed["features"]] == [("keep", "Kept")]
    assert len(second.tracker.zones) == 1


async def test_events_from_ingest_to_the_sink(start_server: StartServer, tmp_path: Path) -> None:
    server = await start_server(**SECURE, history=str(tmp_path / "h.sqlite3"))
    received: list[ZoneEvent] = []

    class Sink:
        def emit(self, events: Any) -> None:
            received.extend(events)

    server.tracker.zones.worker.sink = Sink()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        made = await http.post(
            "/zones",
            json=feature("d"),
            headers={"Authorization": f"Bearer {admin_token()}", **GEOJSON},
        )
        assert made.status_code == 201, made.text
        now = time.time()
        await post_pings(http, [ping("van", 52.505, 13.39, now - 2)])
        await server.wait_for_ticks()
        await post_pings(http, [ping("van", 52.505, 13.405, now - 1)])
        with trio.fail_after(5):
            while not received:
                await trio.sleep(0.01)
        deleted = await http.delete(
            "/zones/d", headers={"Authorization": f"Bearer {admin_token()}"}
        )
        assert deleted.status_code == 204
        with trio.fail_after(5):
            while len(received) < 2:
                await trio.sleep(0.01)
    assert [(e.type, e.zone, e.vehicle, e.reason) for e in received] == [
        ("enter", "d", "van", None),
        ("exit", "d", "van", "zone_deleted"),
    ]
    metrics = server.tracker.metrics.render().decode()
    assert "tracker_zone_events_total 2.0" in metrics
    assert msgspec.json.decode(msgspec.json.encode(received[0]))["type"] == "enter"
