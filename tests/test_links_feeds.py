"""Tokens and feeds bound to vehicles or fleets, over real sockets: such a token reads
nothing else (no other vehicle of the same cells, no area, no other's position or history),
a vehicle feed follows its vehicle, and a stream ends when its token expires."""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
from pathlib import Path

import httpx
import jwt
import pytest
import trio

from tests.compact_reader import CompactTable
from tests.conftest import (
    BERLIN,
    BERLIN_BBOX,
    MUNICH,
    RunningServer,
    StartServer,
    ping,
    post_pings,
)
from tests.credentials import SECRET, SECURE, sign_claims
from tests.sse import Feed, feed_head, open_feed
from tests.test_fleets_ingest import ACME, BETA, DEVICES, _post
from tracker.auth import Keyring
from tracker.wire import decode_frame

KEYRING = Keyring([SECRET], resolution=7, max_cells=4000)


def every_name(feed: Feed) -> set[str]:
    """Every vehicle id named by any frame or compact event read: an independent decode."""
    names: set[str] = set()
    compact = CompactTable()
    for event in feed.events:
        if event.event in ("snapshot", "batch"):
            for line in event.data.split("\n"):
                names.update(n for _, n in decode_frame(base64.b64decode(line)).names)
        elif event.event == "message":
            compact.apply(event.data)
    return names | compact.names


async def _fleet_server(start_server: StartServer, tmp_path: Path) -> RunningServer:
    path = tmp_path / "devices.json"
    path.write_text(json.dumps(DEVICES))
    return await start_server(devices_file=str(path), **SECURE)


async def _drive(
    http: httpx.AsyncClient, server: RunningServer, rounds: int, first: int = 0
) -> None:
    """acme/van-1 and beta/van-1 in the same Berlin cell; acme/van-2 drives to Munich."""
    for step in range(first, first + rounds):
        now = time.time()
        lat = BERLIN[0] + 0.0001 * step
        await _post(http, ACME, [ping("van-1", lat, BERLIN[1], now)])
        await _post(http, BETA, [ping("van-1", lat, BERLIN[1], now)])
        where = MUNICH if step % 2 else BERLIN
        await _post(http, ACME, [ping("van-2", where[0], where[1], now)])
        await server.wait_for_ticks(1)


async def test_a_fleet_token_sees_only_its_fleet(start_server: StartServer, tmp_path: Path) -> None:
    server = await _fleet_server(start_server, tmp_path)
    token = KEYRING.mint(ttl_s=60, fleets=["beta"])
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        await _drive(http, server, 1)
        refused = await feed_head(http, f"/feed?bbox={BERLIN_BBOX}&fleet=acme&token={token}")
        assert refused.status_code == 403 and refused.json()["error"] == "forbidden_vehicle"
        bad = await feed_head(http, f"/feed?bbox={BERLIN_BBOX}&fleet=zeta&token={token}")
        assert bad.status_code == 400
        async with open_feed(http, f"bbox={BERLIN_BBOX}&token={token}") as feed:
            await feed.next_event()
            await _drive(http, server, 4)
            with trio.move_on_after(0.5):
                while True:
                    await feed.next_event()
        assert every_name(feed) == {"beta/van-1"}
        assert (
            await http.get("/vehicles/acme%2Fvan-1", params={"token": token})
        ).status_code == 403
        own = await http.get("/vehicles/beta%2Fvan-1", params={"token": token})
        assert own.status_code == 200 and own.json()["id"] == "beta/van-1"


async def test_an_area_feed_filters_by_fleet(start_server: StartServer, tmp_path: Path) -> None:
    server = await _fleet_server(start_server, tmp_path)
    admin = KEYRING.mint(ttl_s=60, admin=True)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        await _drive(http, server, 1)
        async with (
            open_feed(http, f"bbox={BERLIN_BBOX}&fleet=acme,beta&token={admin}") as both,
            open_feed(http, f"bbox={BERLIN_BBOX}&fleet=acme&token={admin}") as acme,
        ):
            await both.next_event()
            await acme.next_event()
            await _drive(http, server, 3)
            await acme.until(lambda v: "acme/van-2" in v.by_id())
        assert every_name(acme) == {"acme/van-1", "acme/van-2"}
        assert "beta/van-1" in every_name(both)


async def test_a_link_sees_only_its_van_wherever_it_goes(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await _fleet_server(start_server, tmp_path)
    link = KEYRING.mint(ttl_s=60, vehicles=["acme/van-2"])
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        await _drive(http, server, 1)
        async with open_feed(http, f"bbox={BERLIN_BBOX}&token={link}") as within:
            await within.next_event()  # an area narrows the van to it: never the area's others
            await _drive(http, server, 2)
            with trio.move_on_after(0.3):
                while True:
                    await within.next_event()
        assert every_name(within) == {"acme/van-2"}
        for url in (
            f"/feed?vehicles=acme/van-1&token={link}",  # another van of the same cells
            f"/feed?fleet=acme&bbox={BERLIN_BBOX}&token={link}",
            f"/vehicles/acme%2Fvan-1?token={link}",
            f"/history?bbox={BERLIN_BBOX}&token={link}",
            f"/vehicles/acme%2Fvan-1/track?token={link}",
        ):
            refused = await feed_head(http, url)
            assert refused.status_code in (403, 404), url
            if refused.status_code == 404:
                assert refused.json()["error"] == "history_disabled"
        async with open_feed(http, f"token={link}") as feed:
            first = await feed.next_event()
            assert first.event == "message" and first.data.startswith("*\n=")  # a snapshot
            assert set(feed.ids()) == {"acme/van-2"}
            cities = set()
            for step in range(4):
                await _drive(http, server, 1, step)
                await feed.until(lambda v: True)
                cities.add(round(feed.view.by_id()["acme/van-2"].position.lat))
            assert cities == {round(BERLIN[0]), round(MUNICH[0])}  # followed there and back
        assert every_name(feed) == {"acme/van-2"}
        assert (await http.get(f"/vehicles/acme%2Fvan-2?token={link}")).status_code == 200


async def test_a_stream_ends_when_its_token_expires(start_server: StartServer) -> None:
    server = await start_server(**SECURE)
    token = KEYRING.mint(ttl_s=4, vehicles=["van-1"])
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        async with open_feed(http, f"token={token}") as feed:
            assert (await feed.next_event()).data == "*"  # the van is not known: nothing
            event = await feed.next_event(timeout=10)
            while event.event != "expired":
                event = await feed.next_event(timeout=10)
        again = await feed_head(http, f"/feed?token={token}")
    assert again.status_code == 401 and again.json()["error"] == "token_expired"


@pytest.mark.parametrize(
    ("claims", "says"),
    [
        ({"vehicles": "van-1"}, "vehicles claim"),
        ({"vehicles": []}, "vehicles claim"),
        ({"vehicles": [1]}, "vehicles claim"),
        ({"vehicles": ["v" * 65]}, "vehicles claim"),
        ({"vehicles": ["\ud800"]}, "vehicles claim"),
        ({"vehicles": [f"v{i}" for i in range(101)]}, "vehicles claim"),
        ({"fleets": ["a/b"]}, "fleets claim"),
        ({"fleets": {"a": 1}}, "fleets claim"),
        ({"admin": True, "vehicles": ["v"]}, "admin token"),
    ],
)
async def test_malformed_bindings_are_401(
    start_server: StartServer, claims: dict[str, object], says: str
) -> None:
    server = await start_server(**SECURE)
    token = jwt.encode({"exp": int(time.time()) + 60, **claims}, SECRET, "HS256")
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        response = await feed_head(http, f"/feed?token={token}")
    assert response.status_code == 401 and says in response.json()["message"]


async def test_huge_and_forged_bindings_are_refused(start_server: StartServer) -> None:
    server = await start_server(**SECURE)
    huge = sign_claims(json.dumps({"exp": int(time.time()) + 60, "vehicles": ["v"] * 100_000}))
    forged = jwt.encode({"exp": int(time.time()) + 60, "vehicles": ["v"]}, "f" * 32, "HS256")
    link = KEYRING.mint(ttl_s=60, vehicles=["van-1"])
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        bearer = {"Authorization": f"Bearer {huge}"}
        assert (await feed_head(http, "/feed", headers=bearer)).status_code in (401, 431)
        assert (await feed_head(http, f"/feed?token={forged}")).status_code == 401
        long_id = urllib.parse.quote("v" * 10_000)
        for query in (
            f"vehicles={long_id}",
            "vehicles=%ff%fe",  # invalid UTF-8: not a vehicle of the token
            "vehicles=" + ",".join(f"v{i}" for i in range(101)),
            "vehicles=,",
            "vehicles=van-1&fleet=acme",
        ):
            response = await feed_head(http, f"/feed?{query}&token={link}")
            assert response.status_code in (400, 403), (query, response.text)


async def test_a_replay_ends_when_its_token_expires(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await start_server(
        **SECURE, history=str(tmp_path / "history.sqlite3"), history_commit_s=0.05
    )
    start = time.time() - 600
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        pings = [ping("van-1", BERLIN[0] + i * 1e-4, BERLIN[1], start + i) for i in range(300)]
        assert (await post_pings(http, pings)).status_code == 200
        history = server.tracker.history
        assert history is not None
        with trio.fail_after(10):
            while history.queued:
                await trio.sleep(0.05)
        token = KEYRING.mint(ttl_s=3)
        query = f"bbox={BERLIN_BBOX}&from={start}&to={start + 300}&speed=1&token={token}"
        async with open_feed(http, query) as feed:
            event = await feed.next_event(timeout=10)
            while event.event != "expired":
                event = await feed.next_event(timeout=20)
