"""Ingest under attack (issue 13): future clocks, amplification, nesting and bad UTF-8.

Unit tests call ``ingest_body`` with an explicit ``now`` (no sockets, no clock); the HTTP
tests post to a real server and are bounded in time.
"""

from __future__ import annotations

import time

import httpx
import msgspec
import trio

from tests.conftest import BERLIN, MUNICH, RunningServer, ping, post_pings
from tracker.config import TrackerConfig
from tracker.geoindex import GeoIndex
from tracker.ingest import ingest_body
from tracker.metrics import Metrics

NOW = 1_764_000_000.0
MSGPACK = "application/msgpack"


def _index(config: TrackerConfig) -> GeoIndex:
    return GeoIndex(
        resolution=config.h3_resolution,
        stale_after_s=config.stale_after_s,
        remove_after_s=config.remove_after_s,
    )


def test_ingest_body_clamps_a_future_ping_so_the_next_real_one_applies() -> None:
    config = TrackerConfig()
    index = _index(config)

    def post(ts: float, where: tuple[float, float], now: float) -> tuple[int, int]:
        body = msgspec.msgpack.encode([ping("v", *where, ts)])
        reply = ingest_body(body, MSGPACK, index=index, config=config, metrics=Metrics(), now=now)
        return reply.accepted, reply.ignored

    assert post(NOW + config.max_future_s - 1, MUNICH, NOW) == (1, 0)  # ahead, accepted
    assert post(NOW + 1, BERLIN, NOW + 1) == (1, 0)  # the real one a second later applies
    assert index._by_id["v"].pending.lat == BERLIN[0]  # type: ignore[union-attr]


async def test_ingest_future_ping_beyond_tolerance_is_rejected_and_never_freezes(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(10):
        response = await post_pings(client, [ping("v", *MUNICH, time.time() + 290)])
        assert response.status_code == 422
        assert "future" in response.json()["rejected"][0]["error"]
        response = await post_pings(client, [ping("v", *MUNICH, time.time() + 9)])
        assert response.json()["accepted"] == 1
        await trio.sleep(0.05)
        real_ts = time.time()
        response = await post_pings(client, [ping("v", *BERLIN, real_ts)])
        assert response.json() == {"accepted": 1, "ignored": 0, "rejected": []}
        assert server.tracker.index._by_id["v"].last_ts == real_ts
