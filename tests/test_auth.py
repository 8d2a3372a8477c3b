"""Feed tokens and ingest keys over real HTTP: every way in, every way to be refused."""

from __future__ import annotations

import time

import h3.api.basic_int as h3i
import httpx
import jwt
import pytest

from tests.conftest import BERLIN, BERLIN_BBOX, INGEST_KEY, MUNICH, StartServer, ping, post_pings
from tests.credentials import OLD_SECRET, SECRET, SECURE, admin_token, mint_token, sign_claims
from tests.sse import feed_head, open_feed
from tracker import auth
from tracker.auth import Keyring
from tracker.config import ConfigError, TrackerConfig
from tracker.errors import Unauthorized
from tracker.regions import parse_area


async def test_feeds_need_a_token_by_default(start_server: StartServer) -> None:
    server = await start_server(open_feeds=False)
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await feed_head(client, f"/feed?bbox={BERLIN_BBOX}")
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert "token" in response.json()["message"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("how", ["query", "bearer", "cookie"])
async def test_a_token_is_accepted_three_ways(start_server: StartServer, how: str) -> None:
    server = await start_server(**SECURE)
    token = mint_token()
    query, headers, cookies = f"bbox={BERLIN_BBOX}", {}, {}
    if how == "query":
        query += f"&token={token}"
    elif how == "bearer":
        headers["Authorization"] = f"Bearer {token}"
    else:
        async with httpx.AsyncClient(base_url=server.url) as client:
            session = await client.post("/session", json={"token": token})
        assert session.status_code == 200
        set_cookie = session.headers["set-cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
        cookies["tracker_token"] = session.cookies["tracker_token"]
    async with (
        httpx.AsyncClient(base_url=server.url, cookies=cookies) as client,
        open_feed(client, query, headers) as feed,
    ):
        assert (await feed.next_event()).event == "snapshot"


async def test_deleting_the_session_clears_the_cookie(start_server: StartServer) -> None:
    server = await start_server(**SECURE)
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.delete("/session")
    assert response.status_code == 200
    assert (
        'tracker_token=""' in response.headers["set-cookie"]
        or "Max-Age=0" in (response.headers["set-cookie"])
    )


@pytest.mark.parametrize(
    ("token", "says"),
    [
        (mint_token(ttl_s=-10), "expired"),
        (mint_token(secret="f" * 32), "signature"),
        ("not-a-jwt", "not a JWT"),
        (jwt.encode({"area": {}}, SECRET, "HS256"), "not valid"),  # no exp
        (jwt.encode({"exp": time.time() + 60}, None, "none"), "not valid"),  # alg: none
    ],
    ids=["expired", "forged", "not-a-jwt", "no-exp", "alg-none"],  # stable across processes
)
async def test_expired_forged_and_malformed_tokens_get_401(
    start_server: StartServer, token: str, says: str
) -> None:
    server = await start_server(**SECURE)
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await feed_head(client, f"/feed?bbox={BERLIN_BBOX}&token={token}")
        session = await client.post("/session", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401 and session.status_code == 401
    assert says in response.json()["message"]


async def test_rotation_accepts_old_and_new_secrets_and_signs_with_the_first(
    start_server: StartServer,
) -> None:
    server = await start_server(open_feeds=False, token_secrets=f"{SECRET},{OLD_SECRET}")
    async with httpx.AsyncClient(base_url=server.url) as client:
        for token in (mint_token(SECRET), mint_token(OLD_SECRET)):
            response = await feed_head(client, f"/feed?bbox={BERLIN_BBOX}&token={token}")
            assert response.status_code == 200
    rotated = Keyring([SECRET, OLD_SECRET], resolution=7, max_cells=10).mint(ttl_s=9)
    assert jwt.decode(rotated, SECRET, algorithms=["HS256"])["exp"] > time.time()


async def test_a_feed_beyond_the_token_area_gets_403(start_server: StartServer) -> None:
    server = await start_server(**SECURE)
    token = mint_token(bbox=["13.38,52.51,13.42,52.53"])
    async with httpx.AsyncClient(base_url=server.url) as client:
        wider = await feed_head(client, f"/feed?bbox={BERLIN_BBOX}&token={token}")
        inside = await feed_head(client, f"/feed?lat=52.52&lon=13.40&radius_m=50&token={token}")
    assert wider.status_code == 403
    assert wider.json()["error"] == "forbidden_area" and wider.json()["cells_outside"] > 0
    assert inside.status_code == 200


async def test_a_token_for_area_a_never_receives_a_vehicle_outside_a(
    start_server: StartServer,
) -> None:
    """Even when the client asks for more, or for nothing (then it gets the token's area)."""
    server = await start_server(**SECURE)
    area_a = h3i.latlng_to_cell(*BERLIN, 7)
    token = mint_token(cells=[h3i.int_to_str(area_a)])
    now = time.time()
    neighbour = h3i.cell_to_latlng(next(c for c in h3i.grid_disk(area_a, 1) if c != area_a))
    async with httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY) as client:
        await post_pings(
            client,
            [
                ping("in-a", *BERLIN, now),
                ping("next-door", *neighbour, now),
                ping("far", *MUNICH, now),
            ],
        )
        asks_for_more = await feed_head(client, f"/feed?bbox={BERLIN_BBOX}&token={token}")
        assert asks_for_more.status_code == 403
        async with open_feed(client, f"token={token}") as feed:
            await feed.until(lambda view: view.vehicles)
            await post_pings(client, [ping("next-door", *neighbour, now + 1)])
            await post_pings(client, [ping("in-a", BERLIN[0] + 1e-4, BERLIN[1], now + 1)])
            await feed.until(lambda view: view.by_id()["in-a"].position.ts > now)
            assert feed.ids() == {"in-a"}
            assert {v.cell for v in feed.view.vehicles.values()} == {area_a}


async def test_open_feeds_need_no_token_but_a_given_one_still_binds(
    start_server: StartServer,
) -> None:
    server = await start_server(open_feeds=True, token_secrets=SECRET)
    token = mint_token(bbox=["13.38,52.51,13.42,52.53"])
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await feed_head(client, f"/feed?bbox={BERLIN_BBOX}")).status_code == 200
        bound = await feed_head(client, f"/feed?bbox={BERLIN_BBOX}&token={token}")
        assert bound.status_code == 403


async def test_ingest_needs_one_of_the_ingest_keys(start_server: StartServer) -> None:
    server = await start_server(ingest_keys="key-one,key-two")
    body = [ping("v", *BERLIN, time.time())]
    async with httpx.AsyncClient(base_url=server.url) as client:
        missing = await client.post("/ingest", json=body)
        wrong = await client.post("/ingest", json=body, headers={"X-Ingest-Key": "key-three"})
        right = await client.post("/ingest", json=body, headers={"X-Ingest-Key": "key-two"})
    assert missing.status_code == 401 and "X-Ingest-Key" in missing.json()["message"]
    assert wrong.status_code == 401 and "not one of" in wrong.json()["message"]
    assert missing.headers["connection"] == "close"  # its body was never read
    # No Bearer challenge: the key goes in X-Ingest-Key, not in Authorization.
    assert "WWW-Authenticate" not in missing.headers and "WWW-Authenticate" not in wrong.headers
    assert right.status_code == 200 and right.json()["accepted"] == 1


async def test_an_unread_body_never_poisons_the_next_request(start_server: StartServer) -> None:
    """A refused ingest closes its connection; the client's next request gets a new one."""
    server = await start_server()
    async with httpx.AsyncClient(base_url=server.url) as client:
        for _ in range(3):
            refused = await client.post("/ingest", content=b"[" + b" " * 50_000 + b"]")
            assert refused.status_code == 401
            health = await client.get("/healthz")
            assert health.status_code == 200


def test_short_token_secrets_are_refused() -> None:
    with pytest.raises(ConfigError, match="32 characters"):
        TrackerConfig(token_secrets="short")


def test_every_spelling_of_a_token_is_one_holder() -> None:
    """``<token>`` and ``<token>=`` both verify: they must count as one token."""
    keyring = Keyring([SECRET], resolution=7, max_cells=4000)
    exp = int(time.time()) + 60
    for token in (mint_token(), sign_claims(f'{{"exp": {exp}}}')):  # with and without a jti
        padded = token + "="
        assert keyring.grant(padded).holder == keyring.grant(token).holder
    assert keyring.grant(mint_token()).holder != keyring.grant(mint_token()).holder
    assert (
        keyring.grant(sign_claims(f'{{"exp": {exp}}}')).holder
        != keyring.grant(sign_claims(f'{{"exp": {exp + 1}}}')).holder
    )


def test_only_tokens_minted_admin_are_admin_and_never_with_an_area() -> None:
    keyring = Keyring([SECRET], resolution=7, max_cells=4000)
    assert keyring.grant(admin_token()).admin
    assert not keyring.grant(mint_token()).admin
    assert not keyring.grant(mint_token(bbox=["13.38,52.51,13.42,52.53"])).admin
    exp = int(time.time()) + 60
    for claim in ('"true"', "1", '"admin"', "[true]"):  # only the JSON literal true counts
        assert not keyring.grant(sign_claims(f'{{"exp": {exp}, "admin": {claim}}}')).admin
    forged = sign_claims(
        f'{{"exp": {exp}, "admin": true, "area": {{"bbox": ["13.38,52.51,13.42,52.53"]}}}}'
    )
    with pytest.raises(Unauthorized, match="admin token cannot have an area"):
        keyring.grant(forged)
    with pytest.raises(ValueError, match="no area"):
        keyring.mint(ttl_s=60, area={"bbox": ["13.38,52.51,13.42,52.53"]}, admin=True)


@pytest.mark.parametrize("token", ["\udcff.a.b", "é" * 10, "a." * 5000])
def test_tokens_that_cannot_be_jwts_are_refused_before_parsing(token: str) -> None:
    keyring = Keyring([SECRET], resolution=7, max_cells=4000)
    with pytest.raises(Unauthorized, match="not a JWT"):
        keyring.grant(token)


def test_an_area_shared_by_tokens_and_spellings_is_computed_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[object] = []

    def counting(query: object, **kwargs: int) -> frozenset[int]:
        calls.append(query)
        return parse_area(query, **kwargs)  # type: ignore[arg-type]

    bbox = ["13.38,52.51,13.42,52.53"]
    first, second = mint_token(bbox=bbox), mint_token(bbox=bbox)
    other = mint_token(bbox=["13.38,52.51,13.42,52.54"])
    monkeypatch.setattr(auth, "parse_area", counting)
    keyring = Keyring([SECRET], resolution=7, max_cells=4000)
    grants = [keyring.grant(t) for t in (first, first + "=", second)]
    assert len(calls) == 1 and grants[0].cells == grants[1].cells == grants[2].cells
    keyring.grant(other)
    assert len(calls) == 2
