"""Tracking links over real sockets: minted by an admin (POST /links, tracker token
--vehicle), revoked one by one (DELETE /links/{id}, tracker revoke) at once, with the open
stream ended, the token refused until it expires, other links untouched, and revocations
kept across a restart and shared by two real tracker processes on a private Redis."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio

from tests.conftest import BERLIN, StartServer, ping, post_pings
from tests.credentials import SECRET, SECURE, admin_token, mint_token
from tests.processes import run_tracker
from tests.redis_server import RedisServer, tracker_instances
from tests.sse import Feed, feed_head, open_feed
from tracker.revocation import Revocation, Revocations, expiry_of

ADMIN = {"Authorization": f"Bearer {admin_token(ttl_s=3600)}"}


async def _link(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await http.post("/links", json={"vehicle": "van-12", **body}, headers=ADMIN)
    assert response.status_code == 201, response.text
    link: dict[str, Any] = response.json()
    return link


async def _final(feed: Feed) -> str:
    """The name of the event that ends the stream."""
    while True:
        event = await feed.next_event(timeout=10)
        if event.event not in ("snapshot", "batch", "message"):
            return event.event


async def test_a_revoked_link_ends_at_once_and_stays_refused(
    start_server: StartServer, tmp_path: Path
) -> None:
    revoked = tmp_path / "revoked.jsonl"
    server = await start_server(**SECURE, revocations_file=str(revoked))
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        await post_pings(http, [ping("van-12", *BERLIN, time.time())])
        link, other = await _link(http, ttl_s=3600), await _link(http)
        assert link["embed"].endswith(f"/embed?token={link['token']}")
        assert jwt.decode(link["token"], SECRET, ["HS256"])["vehicles"] == ["van-12"]
        async with (
            open_feed(http, f"token={link['token']}") as feed,
            open_feed(http, f"token={other['token']}") as untouched,
        ):
            assert (await feed.next_event()).data.startswith("*")  # a compact snapshot
            await untouched.next_event()
            gone = await http.delete(f"/links/{link['id']}", headers=ADMIN)
            assert gone.status_code == 200 and gone.json()["until"] == pytest.approx(
                link["expires"]
            )
            assert await _final(feed) == "revoked"
            await post_pings(http, [ping("van-12", BERLIN[0] + 1e-3, BERLIN[1], time.time())])
            assert (await untouched.next_event()).event == "message"  # the other link lives on
        again = await feed_head(http, f"/feed?token={link['token']}")
        assert again.status_code == 401 and again.json()["error"] == "token_revoked"
        where = await http.get("/vehicles/van-12", params={"token": link["token"]})
        assert where.status_code == 401
        twice = await http.delete(f"/links/{link['id']}", headers=ADMIN)
        assert twice.status_code == 200  # idempotent
    await server.stop()
    # kept across a restart (the file), until the token expires
    restarted = await start_server(**SECURE, revocations_file=str(revoked))
    async with httpx.AsyncClient(base_url=restarted.url, timeout=10) as http:
        again = await feed_head(http, f"/feed?token={link['token']}")
        assert again.status_code == 401 and again.json()["error"] == "token_revoked"
        assert (await feed_head(http, f"/feed?token={other['token']}")).status_code == 200


async def test_links_are_for_admins_and_check_their_input(start_server: StartServer) -> None:
    server = await start_server(**SECURE)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        reader = {"Authorization": f"Bearer {mint_token()}"}
        assert (await http.post("/links", json={"vehicle": "v"})).status_code == 401
        assert (await http.post("/links", json={"vehicle": "v"}, headers=reader)).status_code == 403
        assert (await http.delete("/links/abc", headers=reader)).status_code == 403
        for body in (
            b"{}",
            b'{"vehicle": ""}',
            b'{"vehicle": "' + b"v" * 10_000 + b'"}',
            b'{"vehicle": "\xff\xfe"}',
            b'{"vehicle": "v", "ttl_s": 1e400}',
            b'{"vehicle": "v", "ttl_s": -1}',
            b'{"vehicle": "v", "area": {"bbox": ["1,2"]}}',
            b'{"vehicle": "v", "extra": 1}',
            b"[" * 10_000,
        ):
            response = await http.post(
                "/links", content=body, headers={**ADMIN, "Content-Type": "application/json"}
            )
            assert response.status_code == 400, (body[:40], response.text)
        assert (await http.post("/links", content=b"x", headers=ADMIN)).status_code == 415
        huge = b'{"vehicle": "' + b"v" * 20_000 + b'"}'
        json_type = {**ADMIN, "Content-Type": "application/json"}
        assert (await http.post("/links", content=huge, headers=json_type)).status_code == 413
        assert (await http.delete("/links/" + "x" * 100, headers=ADMIN)).status_code == 400
        near = await _link(
            http, ttl_s=60, area={"lat": ["52.52"], "lon": ["13.4"], "radius_m": ["5000"]}
        )
        claims = jwt.decode(near["token"], SECRET, ["HS256"])
        assert claims["area"]["radius_m"] == ["5000"] and claims["exp"] - time.time() < 61


def test_revocations_are_kept_until_their_tokens_expire(tmp_path: Path) -> None:
    path = tmp_path / "revoked.jsonl"
    now = 1_000_000.0
    kept = Revocations(str(path), max_entries=2)
    ended: list[str] = []
    kept.listen(ended.append)
    assert expiry_of("abc.1000100", now) == 1000100.0
    assert expiry_of("no-expiry", now) > now + 365 * 86_400
    assert kept.apply(Revocation("a.1000100", 1000100.0), now)
    assert not kept.apply(Revocation("a.1000100", 1000100.0), now)  # known
    assert not kept.apply(Revocation("old.999", 999.0), now)  # expired already
    assert kept.apply(Revocation("b.2000000", 2000000.0), now)
    assert ended == ["a.1000100", "b.2000000"]
    with pytest.raises(Exception, match="revocations_max"):
        kept.apply(Revocation("c.2000000", 2000000.0), now)
    assert kept.apply(Revocation("c.2000000", 2000000.0), 1000200.0)  # a expired: room
    path.write_bytes(path.read_bytes() + b'{"torn')
    loaded = Revocations(str(path), max_entries=10)
    loaded.load(1000200.0)
    assert {r.jti for r in loaded.entries()} == {"b.2000000", "c.2000000"}
    assert path.read_bytes().count(b"\n") == 2  # compacted


async def test_revocation_reaches_another_instance_at_once(
    redis: RedisServer, tmp_path: Path
) -> None:
    secret = ("--token-secrets", SECRET, "--revocations-file", str(tmp_path / "a.jsonl"))
    async with tracker_instances(redis, 2, *secret) as (a, b):
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=10) as to_a,
            httpx.AsyncClient(base_url=b.url, timeout=10) as to_b,
        ):
            link, other = await _link(to_a), await _link(to_a)
            async with (
                open_feed(to_b, f"token={link['token']}") as feed,
                open_feed(to_b, f"token={other['token']}") as untouched,
            ):
                await feed.next_event()
                await untouched.next_event()
                started = trio.current_time()
                assert (await to_a.delete(f"/links/{link['id']}", headers=ADMIN)).status_code == 200
                assert await _final(feed) == "revoked"
                assert trio.current_time() - started < 5
                refused = await feed_head(to_b, f"/feed?token={link['token']}")
                assert refused.status_code == 401
                assert (await feed_head(to_b, f"/feed?token={other['token']}")).status_code == 200
        # and through the CLI, against the other instance
        third = run_tracker(
            "revoke", other["id"], "--base-url", b.url, env={"TRACKER_TOKEN_SECRETS": SECRET}
        )
        assert third.returncode == 0, third.stderr
        with trio.fail_after(5):
            while (await _head(a.url, other["token"])) != 401:
                await trio.sleep(0.05)


async def _head(url: str, token: str) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        return (await feed_head(http, f"/feed?token={token}")).status_code


def test_tracker_token_mints_a_tracking_link() -> None:
    minted = run_tracker(
        "token", "--vehicle", "van-12", "--ttl", "4h", env={"TRACKER_TOKEN_SECRETS": SECRET}
    )
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.split()[0]
    claims = jwt.decode(token, SECRET, ["HS256"])
    assert claims["vehicles"] == ["van-12"] and claims["exp"] - time.time() > 4 * 3600 - 5
    assert f"/embed?token={token}" in minted.stdout and claims["jti"] in minted.stderr
