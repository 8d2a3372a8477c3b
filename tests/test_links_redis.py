"""A tracking link on one instance follows a vehicle ingested on another, from shard to
shard (two real tracker processes on a private redis-server)."""

from __future__ import annotations

import time

import httpx

from tests.conftest import BERLIN, MUNICH, ping, post_pings
from tests.credentials import SECRET
from tests.redis_server import RedisServer, tracker_instances
from tests.sse import open_feed
from tracker.auth import Keyring


async def test_a_link_follows_its_vehicle_ingested_elsewhere(redis: RedisServer) -> None:
    link = Keyring([SECRET], resolution=7, max_cells=4000).mint(ttl_s=60, vehicles=["van-1"])
    async with (
        tracker_instances(redis, 2, "--token-secrets", SECRET) as (a, b),
        httpx.AsyncClient(base_url=a.url, timeout=10) as to_a,
        httpx.AsyncClient(base_url=b.url, timeout=10) as to_b,
    ):
        now = time.time() - 2
        await post_pings(to_a, [ping("van-1", *BERLIN, now), ping("other", *BERLIN, now)])
        async with open_feed(to_b, f"token={link}") as feed:
            await feed.until(lambda view: "van-1" in view.by_id(), timeout=10)
            for step, (lat, lon) in enumerate([MUNICH, (MUNICH[0] + 1e-3, MUNICH[1]), BERLIN]):
                await post_pings(to_a, [ping("van-1", lat, lon, now + 1 + step)])
                await feed.until(
                    lambda view, lat=lat: (
                        view.by_id().get("van-1") is not None
                        and abs(view.by_id()["van-1"].position.lat - lat) < 1e-4
                    ),
                    timeout=10,
                )
            assert set(feed.ids()) == {"van-1"}
