"""``GET /vehicles/{id}``: where one vehicle is, under the same token and area rules as feeds."""

from __future__ import annotations

import time

import h3.api.basic_int as h3i
import httpx
import pytest

from tests.conftest import BERLIN, MUNICH, RunningServer, StartServer, ping, post_pings
from tests.credentials import SECURE, mint_token

BERLIN_CENTRE = "13.38,52.51,13.42,52.53"


async def test_a_vehicle_is_found_where_it_was_last_published(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    now = time.time()
    await post_pings(client, [ping("van-7", *MUNICH, now, speed=12.5, heading=90)])
    await server.wait_for_ticks()  # published with the next tick (a busy machine may tick sooner)
    response = await client.get("/vehicles/van-7")
    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["lat"], body["lon"]) == ("van-7", *MUNICH)
    assert (body["speed"], body["heading"], body["stale"]) == (12.5, 90.0, False)
    assert body["cell"] == h3i.int_to_str(h3i.latlng_to_cell(*MUNICH, 7))
    assert response.headers["Cache-Control"] == "no-store"
    await post_pings(client, [ping("truck-1", *BERLIN, now)])
    await server.wait_for_ticks()
    truck = (await client.get("/vehicles/truck-1")).json()
    assert truck["speed"] is None and truck["heading"] is None


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [
        ("/vehicles/nobody", 404, "unknown_vehicle"),
        ("/vehicles/" + "x" * 65, 400, "bad_request"),
        ("/vehicles/" + "é" * 10_000, 400, "bad_request"),
        ("/vehicles/%FF%FE", 404, "unknown_vehicle"),
        ("/vehicles/a%00b", 404, "unknown_vehicle"),
        ("/vehicles/", 404, "not_found"),
    ],
)
async def test_bad_or_unknown_vehicle_ids_get_a_json_4xx(
    client: httpx.AsyncClient, path: str, status: int, error: str
) -> None:
    response = await client.get(path)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error


async def test_vehicles_follow_the_feed_rules_of_tokens_and_areas(
    start_server: StartServer,
) -> None:
    server = await start_server(**SECURE)
    async with httpx.AsyncClient(
        base_url=server.url, headers={"X-Ingest-Key": "test-ingest-key"}
    ) as client:
        await post_pings(client, [ping("van-1", *BERLIN, time.time())])
        await server.wait_for_ticks()
        anonymous = await client.get("/vehicles/van-1")
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        admin = await client.get("/vehicles/van-1", params={"token": mint_token()})
        assert admin.status_code == 200
        inside = mint_token(bbox=[BERLIN_CENTRE])
        bearer = {"Authorization": f"Bearer {inside}"}
        assert (await client.get("/vehicles/van-1", headers=bearer)).status_code == 200
        elsewhere = mint_token(bbox=["11.5,48.1,11.6,48.2"])
        outside = await client.get("/vehicles/van-1", params={"token": elsewhere})
        assert outside.status_code == 403 and outside.json()["error"] == "forbidden_area"
        expired = await client.get("/vehicles/van-1", params={"token": mint_token(ttl_s=-10)})
        assert expired.status_code == 401 and "expired" in expired.json()["message"]
