"""From a ping to an alert: a zone made over HTTP, pings posted over HTTP, and the zone
engine's events arriving on ``GET /alerts`` and at a webhook, in order, with the log's ids."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import trio

from tests.alerts_tools import Receiver, open_alerts
from tests.conftest import StartServer, ping, post_pings
from tests.credentials import SECURE, admin_token, mint_token

SQUARE = [[13.40, 52.50], [13.41, 52.50], [13.41, 52.51], [13.40, 52.51], [13.40, 52.50]]


async def test_a_vehicle_entering_and_leaving_a_zone_is_streamed_and_posted(
    start_server: StartServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    server = await start_server(
        **SECURE, history=str(tmp_path / "h.sqlite3"), webhook_allow="127.0.0.1/32"
    )
    receiver = await Receiver().start(nursery)
    admin = {"Authorization": f"Bearer {admin_token()}"}
    zone = {
        "type": "Feature",
        "id": "depot-1",
        "geometry": {"type": "Polygon", "coordinates": [SQUARE]},
        "properties": {"name": "Depot Mitte", "kind": "depot"},
    }
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        made = await http.post(
            "/zones", json=zone, headers={**admin, "Content-Type": "application/geo+json"}
        )
        assert made.status_code == 201, made.text
        hook = await http.post(
            "/webhooks", json={"url": receiver.url, "kinds": ["depot"]}, headers=admin
        )
        assert hook.status_code == 201, hook.text
        async with open_alerts(http, f"zones=depot-1&token={mint_token()}") as reader:
            now = time.time()
            await post_pings(http, [ping("van", 52.505, 13.39, now - 3)])  # outside
            await server.wait_for_ticks()
            await post_pings(http, [ping("van", 52.505, 13.405, now - 2)])  # inside
            await server.wait_for_ticks()
            await post_pings(http, [ping("van", 52.505, 13.42, now - 1)])  # out again
            enter, leave = await reader.alerts(2)
    assert (enter["type"], enter["zone"], enter["kind"], enter["vehicle"]) == (
        "enter",
        "depot-1",
        "depot",
        "van",
    )
    assert leave["type"] == "exit" and leave["reason"] == "left" and leave["id"] > enter["id"]
    posted = await receiver.wait_for(2)
    assert [json.loads(r.body) for r in posted] == [enter, leave]
