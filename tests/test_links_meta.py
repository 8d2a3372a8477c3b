"""Vehicle metadata over real sockets: set by admins, bounded, read once per session by
whoever may see the vehicle, kept across a restart."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.conftest import BERLIN, BERLIN_BBOX, StartServer, ping, post_pings
from tests.credentials import SECRET, SECURE, admin_token, mint_token
from tracker.auth import Keyring

ADMIN = {"Authorization": f"Bearer {admin_token(ttl_s=3600)}"}
VAN = {
    "name": "Van 12 · Müller",
    "kind": "van",
    "plate": "B-XY 12",
    "properties": {"depot": "Nord", "seats": 3},
}


async def test_metadata_is_set_by_admins_and_read_by_those_who_see_the_vehicle(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "meta.jsonl"
    server = await start_server(**SECURE, meta_file=str(path))
    keyring = Keyring([SECRET], resolution=7, max_cells=4000)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        await post_pings(
            http, [ping("van-12", *BERLIN, time.time()), ping("a/b", *BERLIN, time.time())]
        )
        await server.wait_for_ticks()
        assert (await http.put("/meta/van-12", json=VAN)).status_code == 401
        reader = {"Authorization": f"Bearer {mint_token()}"}
        assert (await http.put("/meta/van-12", json=VAN, headers=reader)).status_code == 403
        assert (await http.put("/meta/van-12", json=VAN, headers=ADMIN)).status_code == 200
        assert (
            await http.put("/meta/a%2Fb", json={"name": "slash"}, headers=ADMIN)
        ).status_code == 200
        everyone = await http.get("/meta", params={"vehicles": "van-12,a/b,nobody"}, headers=ADMIN)
        assert everyone.json() == {"van-12": VAN, "a/b": {"name": "slash"}}
        link = keyring.mint(ttl_s=60, vehicles=["a/b"])
        own = await http.get("/meta", params={"vehicles": "van-12,a/b", "token": link})
        assert own.json() == {"a/b": {"name": "slash"}}  # not another vehicle's
        elsewhere = mint_token(bbox=["11.5,48.1,11.6,48.2"])
        assert (
            await http.get("/meta", params={"vehicles": "van-12", "token": elsewhere})
        ).json() == {}
        berlin = mint_token(bbox=[BERLIN_BBOX])
        assert (
            "van-12"
            in (await http.get("/meta", params={"vehicles": "van-12", "token": berlin})).json()
        )
        for body in (
            b'{"name": "' + b"n" * 200 + b'"}',
            b'{"properties": {' + b", ".join(b'"k%d": 1' % i for i in range(20)) + b"}}",
            b'{"name": "\\u0000"}',
            b'{"name": "\xff"}',
            b'{"color": "red"}',
            b'{"properties": {"a": {"b": 1}}}',
            b"[" * 5000,
        ):
            bad = await http.put(
                "/meta/van-12", content=body, headers={**ADMIN, "Content-Type": "application/json"}
            )
            assert bad.status_code == 400, (body[:30], bad.text)
        too_many = ",".join(f"v{i}" for i in range(101))
        assert (
            await http.get("/meta", params={"vehicles": too_many}, headers=ADMIN)
        ).status_code == 400
        assert (await http.delete("/meta/a%2Fb", headers=ADMIN)).status_code == 200
    await server.stop()
    again = await start_server(**SECURE, meta_file=str(path))
    async with httpx.AsyncClient(base_url=again.url, timeout=10) as http:
        kept = await http.get("/meta", params={"vehicles": "van-12,a/b"}, headers=ADMIN)
        assert kept.json() == {"van-12": VAN}
