"""Fleets at ingest: each key speaks for one fleet, ids are unique within a fleet, and no key
moves another fleet's vehicle (refused with a reason, counted)."""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tests.conftest import BERLIN, INGEST_KEY, MUNICH, RunningServer, StartServer, ping
from tracker.devices.identity import DevicesFile
from tracker.fleets import DEFAULT_KEY, Fleets, KeyFleet
from tracker.pings import Ping

ACME = {"X-Ingest-Key": "acme-key-0123456789"}
BETA = {"X-Ingest-Key": "beta-key-0123456789"}
OPS = {"X-Ingest-Key": "ops-key-01234567890"}
DEVICES = {
    "fleets": {
        "acme": {"keys": [ACME["X-Ingest-Key"]]},
        "beta": {"keys": [BETA["X-Ingest-Key"]]},
        "ops": {"keys": [OPS["X-Ingest-Key"]], "admin": True},
    }
}


def fleets() -> Fleets:
    spec = msgspec.convert(DEVICES, DevicesFile)
    return Fleets(spec.fleets, [INGEST_KEY["X-Ingest-Key"]])


def _ping(vehicle_id: str, fleet: str | None = None) -> Ping:
    return Ping(vehicle_id=vehicle_id, lat=1.0, lon=2.0, ts=3.0, fleet=fleet)


def test_wire_ids_name_one_vehicle_of_one_fleet() -> None:
    f = fleets()
    assert f.key_fleet(INGEST_KEY["X-Ingest-Key"]) == DEFAULT_KEY
    assert f.key_fleet(OPS["X-Ingest-Key"]) == KeyFleet("ops", admin=True)
    assert f.key_fleet("nope") is None and f.key_fleet("x" * 10_000) is None
    acme = KeyFleet("acme")
    placed = f.place(_ping("van-12"), acme)
    assert isinstance(placed, Ping) and placed.vehicle_id == "acme/van-12"
    assert f.fleet_of("acme/van-12") == "acme" and f.fleet_of("van-12") == "default"
    assert f.fleet_of("depot/van-12") == "default"  # not a fleet: an id with a slash
    assert f.place(_ping("depot/van-12"), DEFAULT_KEY) == _ping("depot/van-12")
    # another fleet's vehicle, however spelled: refused with a reason
    assert "fleet 'beta'" in str(f.place(_ping("van-12", fleet="beta"), acme))
    assert "names a vehicle of fleet 'acme'" in str(f.place(_ping("acme/van-12"), DEFAULT_KEY))
    assert "not configured" in str(f.place(_ping("v", fleet="zeta"), KeyFleet("ops", True)))
    assert "too long" in str(f.place(_ping("v" * 64), acme))
    by_admin = f.place(_ping("van-12", fleet="beta"), KeyFleet("ops", True))
    assert isinstance(by_admin, Ping) and by_admin.vehicle_id == "beta/van-12"
    assert by_admin.fleet is None


def test_a_fleet_name_with_a_slash_is_refused() -> None:
    with pytest.raises(ValueError, match="fleet name"):
        from tracker.devices.identity import Registry

        Registry(msgspec.convert({"fleets": {"a/b": {}}}, DevicesFile), max_registered=1)


async def _server(start_server: StartServer, tmp_path: Path, **extra: Any) -> RunningServer:
    path = tmp_path / "devices.json"
    path.write_text(json.dumps(DEVICES))
    return await start_server(devices_file=str(path), **extra)


async def _post(http: httpx.AsyncClient, key: dict[str, str], pings: list[Any]) -> httpx.Response:
    return await http.post(
        "/ingest",
        content=msgspec.msgpack.encode(pings),
        headers={"Content-Type": "application/msgpack", **key},
    )


async def test_two_fleets_keep_their_own_van_12_and_cannot_move_each_other(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await _server(start_server, tmp_path)
    now = time.time()
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await _post(http, ACME, [ping("van-12", *BERLIN, now)])).json()["accepted"] == 1
        assert (await _post(http, BETA, [ping("van-12", *MUNICH, now)])).json()["accepted"] == 1
        # beta's key naming acme (field or wire id), the default key naming acme's wire id
        refused = await _post(http, BETA, [ping("van-12", *MUNICH, now + 1, fleet="acme")])
        assert refused.status_code == 422
        assert "cannot report for fleet 'acme'" in refused.json()["rejected"][0]["error"]
        refused = await _post(http, INGEST_KEY, [ping("acme/van-12", *MUNICH, now + 1)])
        assert refused.status_code == 422
        mixed = await _post(
            http, OPS, [ping("van-12", *MUNICH, now + 2, fleet="acme"), ping("x", 0, 0, now)]
        )
        assert mixed.json()["accepted"] == 2  # an admin fleet's key names the fleet per ping
        await server.wait_for_ticks()
        where = {}
        for wire_id in ("acme/van-12", "beta/van-12", "ops/x"):
            got = await http.get(f"/vehicles/{urllib.parse.quote(wire_id, safe='')}")
            assert got.status_code == 200, got.text
            where[wire_id] = (got.json()["lat"], got.json()["id"])
        assert where["acme/van-12"] == (MUNICH[0], "acme/van-12")  # moved by ops only
        assert where["beta/van-12"] == (MUNICH[0], "beta/van-12")
        metrics = (await http.get("/metrics")).text
    assert "tracker_pings_refused_fleet_total 2" in metrics


async def test_an_unknown_key_is_401_and_the_default_fleet_is_unchanged(
    start_server: StartServer,
) -> None:
    server = await start_server()
    now = time.time()
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (
            await _post(http, {"X-Ingest-Key": "x"}, [ping("a", *BERLIN, now)])
        ).status_code == 401
        ok = await _post(http, INGEST_KEY, [ping("depot/7", *BERLIN, now)])
        assert ok.json()["accepted"] == 1
        named = await _post(http, INGEST_KEY, [ping("a", *BERLIN, now, fleet="acme")])
        assert named.status_code == 422 and "fleet 'acme'" in named.json()["rejected"][0]["error"]
        bad = await _post(http, INGEST_KEY, [ping("a", *BERLIN, now, fleet="x" * 33)])
        assert bad.status_code == 422
