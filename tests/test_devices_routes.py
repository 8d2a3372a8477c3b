"""The device protocols over real sockets: /osmand, the --osmand-port listener, /owntracks.

Requests are the ones the apps send (tests/test_devices_osmand.py and _owntracks.py hold
the recorded examples); then each transport is attacked: no or wrong keys, unknown
devices, invalid UTF-8, huge and slow bodies, nested JSON, a device over its rate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningServer, StartServer
from tests.processes import free_port
from tests.rawhttp import connect, read_response
from tests.test_devices_osmand import TRACCAR_CLIENT_JSON
from tests.test_devices_owntracks import LOCATION, TRANSITION
from tracker.pings import Ping
from tracker.wire import Position

KEY = "test-ingest-key"  # the default fleet's key: the test servers' ingest key
BERLIN = (52.52, 13.405)


def _latest(server: RunningServer, vehicle_id: str) -> Ping | Position:
    """The newest ping the index holds for a vehicle (pending, or published)."""
    vehicle = server.tracker.index.vehicle(vehicle_id)
    assert vehicle is not None, f"{vehicle_id} is not tracked"
    latest = server.tracker.index.pending(vehicle) or vehicle.published
    assert latest is not None
    return latest


def _metric(text: str, name: str, **labels: str) -> float:
    """One sample of a /metrics scrape (0 if absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def _osmand(device: str = "phone-1", **extra: object) -> dict[str, object]:
    return {
        "id": device,
        "lat": BERLIN[0],
        "lon": BERLIN[1],
        "timestamp": int(time.time()),
        "speed": 10,
        "bearing": 90,
        "key": KEY,
        **extra,
    }


async def test_osmand_query_on_the_main_port_is_ingested_and_counted(
    start_server: StartServer,
) -> None:
    server = await start_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        response = await http.get("/osmand", params=_osmand())
        assert response.status_code == 200, response.text
        assert response.json()["accepted"] == 1
        form = {k: str(v) for k, v in _osmand("phone-2").items()}
        assert (await http.post("/osmand", data=form)).json()["accepted"] == 1
        metrics = (await http.get("/metrics")).text
    assert _latest(server, "phone-1").speed == pytest.approx(10 * 1852 / 3600, rel=1e-3)
    assert _metric(metrics, "tracker_device_pings_total", source="osmand", outcome="accepted") == 2
    assert _metric(metrics, "tracker_device_last_seen_timestamp_seconds", source="osmand") > 0
    assert _metric(metrics, "tracker_pings_accepted_total") == 2  # the common path counted


async def test_osmand_port_serves_traccar_client_json_at_any_path(
    start_server: StartServer,
) -> None:
    port = free_port()
    server = await start_server(osmand_port=port)
    body = TRACCAR_CLIENT_JSON.replace(b"2025-06-15T13:45:12.862Z", _iso_now())
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        response = await http.post(
            "/", params={"key": KEY}, content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["accepted"] == 1
        # Nothing else is served on the device port: every path is the OsmAnd protocol.
        feed = await http.get("/feed", params={"bbox": "13.3,52.48,13.5,52.56"})
        assert feed.status_code == 400 and "device id" in feed.json()["message"]
    assert _latest(server, "48241179").lat == 37.4219983


def _iso_now() -> bytes:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()).encode()


async def test_osmand_keys_basic_auth_and_unknown_devices(
    start_server: StartServer, tmp_path: Path
) -> None:
    devices = tmp_path / "devices.json"
    devices.write_text(
        json.dumps(
            {
                "fleets": {"trucks": {"keys": ["trucks-key"]}},
                "devices": {"truck-1": {"fleet": "trucks", "key": "truck-1-key"}},
            }
        )
    )
    server = await start_server(devices_file=str(devices))
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        query = _osmand("truck-1")
        del query["key"]
        missing = await http.get("/osmand", params=query)
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"].startswith("Basic")
        assert missing.json()["error"] == "unauthorized"
        basic = await http.get("/osmand", params=query, auth=("truck-1", "truck-1-key"))
        assert basic.status_code == 200
        wrong = await http.get("/osmand", params={**query, "key": KEY})
        assert wrong.status_code == 401
        unknown = await http.get("/osmand", params={**_osmand("truck-9"), "key": "trucks-key"})
        assert unknown.status_code == 403 and unknown.json()["error"] == "unknown_device"
        metrics = (await http.get("/metrics")).text
    assert (
        _metric(metrics, "tracker_device_rejected_total", source="osmand", reason="unauthorized")
        == 2
    )
    assert (
        _metric(metrics, "tracker_device_rejected_total", source="osmand", reason="unknown_device")
        == 1
    )


async def test_osmand_rejected_ping_is_acknowledged_with_its_reason(
    start_server: StartServer,
) -> None:
    """Traccar Client resends a refused report forever: a ping that can never be taken
    is answered 200 with its reason, and counted."""
    server = await start_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        old = await http.get("/osmand", params=_osmand(timestamp=int(time.time()) - 9 * 86_400))
        assert old.status_code == 200
        assert old.json()["accepted"] == 0
        assert "older than" in old.json()["rejected"][0]["error"]
        nan = await http.get("/osmand", params=_osmand(lat="nan"))
        assert "finite" in nan.json()["rejected"][0]["error"]
        metrics = (await http.get("/metrics")).text
    assert _metric(metrics, "tracker_device_rejected_total", source="osmand", reason="invalid") == 2
    assert _metric(metrics, "tracker_pings_rejected_total") == 2
    assert server.tracker.index.vehicle_count == 0


async def test_osmand_attacks_get_4xx_and_the_server_stays_up(start_server: StartServer) -> None:
    server = await start_server(
        body_timeout_s=0.5, body_min_rate_bytes_s=1_000_000, device_rate_per_s=2
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        nested = b'{"location":' + b"[" * 30_000 + b"]" * 30_000 + b"}"
        cases = [
            http.build_request("GET", "/osmand", params=_osmand(lat="1" * 20_000)),
            http.build_request("GET", "/osmand", params=_osmand(id="x" * 1000)),
            http.build_request("GET", "/osmand", params=_osmand(timestamp="9" * 10_000)),
            http.build_request("POST", "/osmand", content=nested, params={"key": KEY}),
            http.build_request("POST", "/osmand", content=b"{" + b" " * 70_000 + b"}"),
            http.build_request("POST", "/osmand", content=b"{\xff\xfe}", params={"key": KEY}),
        ]
        statuses = [(await http.send(case)).status_code for case in cases]
        assert statuses == [400, 400, 400, 400, 413, 400]
        responses = [await http.get("/osmand", params=_osmand("burst")) for _ in range(4)]
        assert [r.status_code for r in responses][-1] == 429
    # Invalid UTF-8 in the query and a body that never comes, on raw sockets.
    stream = await connect(server)
    await stream.send_all(
        b"GET /osmand?id=%FF%FE&lat=52.5&lon=13.4&key="
        + KEY.encode()
        + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    utf8 = await read_response(stream)
    assert utf8.status == 200  # decoded with replacement characters: a valid id
    assert server.tracker.index.vehicle_count == 2  # "burst" and the replacement-character id
    slow = await connect(server)
    await slow.send_all(
        b"POST /osmand?key="
        + KEY.encode()
        + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{"
    )
    assert (await read_response(slow, timeout=5)).status == 408
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        assert (await http.get("/healthz")).status_code == 200


async def test_owntracks_http_location_and_other_messages(start_server: StartServer) -> None:
    server = await start_server()
    location = LOCATION.replace(b'"tst":1497476456', f'"tst":{int(time.time())}'.encode())
    headers = {"X-Limit-U": "jane", "X-Limit-D": "phone", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        response = await http.post(
            "/owntracks", content=location, headers=headers, auth=("jane", KEY)
        )
        assert response.status_code == 200 and response.json() == []
        skipped = await http.post(
            "/owntracks", content=TRANSITION, headers=headers, auth=("jane", KEY)
        )
        assert skipped.status_code == 200 and skipped.json() == []
        by_user = await http.post(
            "/owntracks", content=location, auth=("bob", KEY), headers={"X-Limit-D": "tablet"}
        )
        assert by_user.status_code == 200
        nobody = await http.post("/owntracks", content=location, params={"key": KEY})
        assert nobody.status_code == 400
        wrong = await http.post(
            "/owntracks", content=location, headers=headers, auth=("jane", "wrong")
        )
        assert wrong.status_code == 401
        garbage = await http.post(
            "/owntracks", content=b"\xff" * 100, headers=headers, auth=("jane", KEY)
        )
        assert garbage.status_code == 400
        metrics = (await http.get("/metrics")).text
    assert _latest(server, "jane/phone").speed == pytest.approx(10.0)  # 36 km/h
    assert _latest(server, "bob/tablet").lat == 48.85833
    assert (
        _metric(metrics, "tracker_device_pings_total", source="owntracks-http", outcome="accepted")
        == 2
    )
