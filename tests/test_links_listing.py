"""``GET /links`` (admin): the links being watched now, paged by id, bounded, filtered by
vehicle; a revoked or closed link leaves the list; bad parameters are 400 with a reason."""

from __future__ import annotations

import time
import urllib.parse
from typing import Any

import httpx
import trio

from tests.conftest import BERLIN, StartServer, ping, post_pings
from tests.credentials import SECURE, mint_token
from tests.sse import open_feed
from tests.test_links_revocation import ADMIN


async def _link(http: httpx.AsyncClient, vehicle: str) -> dict[str, Any]:
    response = await http.post("/links", json={"vehicle": vehicle, "ttl_s": 600}, headers=ADMIN)
    assert response.status_code == 201, response.text
    link: dict[str, Any] = response.json()
    return link


async def _listed(http: httpx.AsyncClient, query: str = "") -> dict[str, Any]:
    response = await http.get(f"/links?{query}", headers=ADMIN)
    assert response.status_code == 200, response.text
    listed: dict[str, Any] = response.json()
    return listed


async def test_open_links_are_listed_paged_and_filtered(start_server: StartServer) -> None:
    server = await start_server(**SECURE)
    odd = 'van "7", ünd:é'
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        await post_pings(
            http, [ping("van-12", *BERLIN, time.time()), ping(odd, *BERLIN, time.time())]
        )
        links = [await _link(http, "van-12") for _ in range(3)] + [await _link(http, odd)]
        unopened = await _link(http, "van-12")
        assert (await _listed(http)) == {"links": [], "next": None}
        async with (
            open_feed(http, f"token={links[0]['token']}") as a,
            open_feed(http, f"token={links[0]['token']}") as b,
            open_feed(http, f"token={links[1]['token']}") as c,
            open_feed(http, f"token={links[2]['token']}") as d,
            open_feed(http, f"token={links[3]['token']}") as e,
        ):
            for feed in (a, b, c, d, e):
                await feed.next_event()
            everything = await _listed(http)
            ids = sorted(link["id"] for link in links)
            assert [link["id"] for link in everything["links"]] == ids
            assert unopened["id"] not in ids and everything["next"] is None
            by_id = {link["id"]: link for link in everything["links"]}
            assert by_id[links[0]["id"]]["streams"] == 2
            assert by_id[links[0]["id"]]["vehicles"] == ["van-12"]
            assert abs(by_id[links[0]["id"]]["expires"] - links[0]["expires"]) < 1
            assert by_id[links[3]["id"]]["vehicles"] == [odd]
            pages, after = [], ""
            while True:
                page = await _listed(http, f"limit=1&after={after}")
                pages += [link["id"] for link in page["links"]]
                if page["next"] is None:
                    break
                after = page["next"]
            assert pages == ids
            only = await _listed(http, "vehicle=" + urllib.parse.quote(odd))
            assert [link["id"] for link in only["links"]] == [links[3]["id"]]
            revoked = await http.delete(f"/links/{links[1]['id']}", headers=ADMIN)
            assert revoked.status_code == 200
            with trio.fail_after(5):
                while links[1]["id"] in {x["id"] for x in (await _listed(http))["links"]}:
                    await trio.sleep(0.05)
        with trio.fail_after(5):  # the streams closed: nothing is watched
            while (await _listed(http))["links"]:
                await trio.sleep(0.05)


async def test_listing_is_for_admins_and_checks_its_parameters(start_server: StartServer) -> None:
    server = await start_server(**SECURE)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        assert (await http.get("/links")).status_code == 401
        reader = {"Authorization": f"Bearer {mint_token()}"}
        assert (await http.get("/links", headers=reader)).status_code == 403
        for query in (
            "limit=0",
            "limit=1001",
            "limit=-1",
            "limit=x",
            "limit=" + "9" * 400,
            "limit=" + "9" * 5000,  # past int()'s 4,300 digits: a ValueError
            "limit=%C2%B2",  # "²": isdigit() says yes, int() says no
            "vehicle=" + "v" * 65,
            "vehicle=",
            "after=" + "x" * 65,
        ):
            response = await http.get(f"/links?{query}", headers=ADMIN)
            assert response.status_code == 400, (query, response.text)
            assert "error" in response.json()
        response = await http.get("/links?after=%ff%fe&vehicle=%ff", headers=ADMIN)
        assert response.status_code in (200, 400)
