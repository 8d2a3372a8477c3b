"""Two tracker processes sharing one Redis (``--bus``) and one PostgreSQL (``--history``).

A load balancer sends each vehicle's pings to whichever instance it likes; a dispatcher
asks either instance. Both must answer with the pings accepted by both, each stored
exactly once (an instance records what it accepted, never what the bus brought it).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import psycopg
import trio

from tests.conftest import BERLIN, BERLIN_BBOX, ping, post_pings
from tests.redis_server import RedisServer, tracker_instances

COMMIT_S = 0.2


def moving(vehicle_id: str, start: float, count: int, lat0: float) -> list[dict[str, Any]]:
    """``count`` pings one second apart, drifting north from ``lat0`` in central Berlin."""
    return [
        ping(vehicle_id, lat0 + i * 1e-4, BERLIN[1], start + i, speed=8.5, heading=0.0)
        for i in range(count)
    ]


async def stored_positions(url: str) -> int:
    """Positions in the shared database, read directly (not through a tracker)."""

    def count() -> int:
        with psycopg.connect(url) as connection:
            row = connection.execute(
                """SELECT (SELECT coalesce(sum(size), 0) FROM history_raw)
                        + (SELECT coalesce(sum(size), 0) FROM history_chunks)"""
            ).fetchone()
        return int(row[0]) if row else 0

    return await trio.to_thread.run_sync(count)


async def get_json(http: httpx.AsyncClient, path: str, **params: Any) -> Any:
    response = await http.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def test_two_instances_share_one_history(redis: RedisServer, postgres: str) -> None:
    now = time.time()
    # "shared" reports first to instance a, then (later pings) to instance b.
    shared = moving("shared", now - 60, 20, BERLIN[0])
    only_a = moving("only-a", now - 60, 15, BERLIN[0] + 0.01)
    only_b = moving("only-b", now - 60, 25, BERLIN[0] - 0.01)
    options = ("--history", postgres, "--history-commit", str(COMMIT_S))
    async with (
        tracker_instances(redis, 2, *options) as (a, b),
        httpx.AsyncClient(base_url=a.url, timeout=10) as to_a,
        httpx.AsyncClient(base_url=b.url, timeout=10) as to_b,
    ):
        for http, pings in ((to_a, shared[:10] + only_a), (to_b, shared[10:] + only_b)):
            reply = await post_pings(http, pings)
            assert reply.status_code == 200, reply.text
            assert reply.json()["accepted"] == len(pings)
        posted = len(shared) + len(only_a) + len(only_b)
        with trio.fail_after(10):
            while await stored_positions(postgres) < posted:
                await trio.sleep(COMMIT_S)
        window = {"from": f"{now - 120:.3f}", "to": f"{now + 60:.3f}"}
        for http in (to_a, to_b):
            for pings in (shared, only_a, only_b):
                vehicle_id = pings[0]["vehicle_id"]
                track = await get_json(http, f"/vehicles/{vehicle_id}/track", **window)
                assert track["ts"] == [round(p["ts"], 3) for p in pings], vehicle_id
                assert track["lat"] == [round(p["lat"], 6) for p in pings], vehicle_id
            area = await get_json(http, "/history", bbox=BERLIN_BBOX, **window)
            assert area["cursor"] is None
            counts = {v["vehicle_id"]: v["count"] for v in area["vehicles"]}
            assert counts == {"only-a": 15, "only-b": 25, "shared": 20}
    assert await stored_positions(postgres) == posted, "a ping was written twice"
