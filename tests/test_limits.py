"""Limits over real HTTP: open feeds per token and per address, cells, ingest rate."""

from __future__ import annotations

import time
import urllib.parse
from contextlib import AsyncExitStack

import httpx
import pytest
import trio

from tests.conftest import BERLIN, BERLIN_BBOX, INGEST_KEY, StartServer, ping
from tests.credentials import SECURE, mint_token
from tests.sse import feed_head, open_feed
from tracker.errors import TooManyRequests
from tracker.limits import IngestRate, StreamSlots


async def test_streams_per_token_are_limited_and_freed_on_close(
    start_server: StartServer,
) -> None:
    server = await start_server(**SECURE, max_streams_per_token=2)
    token = mint_token()
    query = f"bbox={BERLIN_BBOX}&token={token}"
    async with httpx.AsyncClient(base_url=server.url) as client:
        async with AsyncExitStack() as feeds:
            for _ in range(2):
                await feeds.enter_async_context(open_feed(client, query))
            refused = await feed_head(client, f"/feed?{query}")
            assert refused.status_code == 429
            assert refused.json()["error"] == "too_many_requests"
            assert int(refused.headers["Retry-After"]) >= 1
            other = await feed_head(client, f"/feed?bbox={BERLIN_BBOX}&token={mint_token()}")
            assert other.status_code == 200  # another token has its own budget
        with trio.fail_after(5):  # closing feeds frees their slots
            while (await feed_head(client, f"/feed?{query}")).status_code != 200:
                await trio.sleep(0.05)


async def test_streams_per_token_count_every_spelling_of_a_token_once(
    start_server: StartServer,
) -> None:
    """``<token>=`` verifies like ``<token>``; it must not get a budget of its own."""
    server = await start_server(**SECURE, max_streams_per_token=1)
    token = mint_token()
    async with (
        httpx.AsyncClient(base_url=server.url) as client,
        open_feed(client, f"bbox={BERLIN_BBOX}&token={token}"),
    ):
        for spelling in (token + "=", token):
            query = urllib.parse.urlencode({"bbox": BERLIN_BBOX, "token": spelling})
            refused = await feed_head(client, f"/feed?{query}")
            assert refused.status_code == 429, spelling
            bearer = {"Authorization": f"Bearer {spelling}"}
            refused = await feed_head(client, f"/feed?bbox={BERLIN_BBOX}", headers=bearer)
            assert refused.status_code == 429, spelling


async def test_streams_per_address_are_limited(start_server: StartServer) -> None:
    server = await start_server(max_streams_per_address=3)
    async with httpx.AsyncClient(base_url=server.url) as client, AsyncExitStack() as feeds:
        for _ in range(3):
            await feeds.enter_async_context(open_feed(client, f"bbox={BERLIN_BBOX}"))
        refused = await feed_head(client, f"/feed?bbox={BERLIN_BBOX}")
    assert refused.status_code == 429 and "address" in refused.json()["message"]


async def test_cells_per_subscription_are_limited(start_server: StartServer) -> None:
    server = await start_server(max_feed_cells=10)
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await feed_head(client, f"/feed?bbox={BERLIN_BBOX}")
    assert response.status_code == 400
    assert response.json()["error"] == "bad_area" and response.json()["max_cells"] == 10


async def test_ingest_rate_per_key_answers_429_with_retry_after(
    start_server: StartServer,
) -> None:
    server = await start_server(ingest_rate_per_key=100)
    now = time.time()
    batch = [ping(f"v{i}", *BERLIN, now) for i in range(60)]
    async with httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY) as client:
        first = await client.post("/ingest", json=batch)
        second = await client.post("/ingest", json=batch)
    assert first.status_code == 200 and first.json()["accepted"] == 60
    assert second.status_code == 429
    assert second.json()["limit_per_s"] == 100
    assert second.headers["Retry-After"] == "1"
    assert "connection" not in second.headers  # its body was read: the connection is fine
    assert server.tracker.index.vehicle_count == 60  # the refused batch was not applied


def test_ingest_rate_refills_over_time_and_zero_means_no_limit() -> None:
    now = [0.0]
    rate = IngestRate(1000, clock=lambda: now[0])
    rate.admit("k", 1000)
    with pytest.raises(TooManyRequests) as refused:
        rate.admit("k", 500)
    assert refused.value.retry_after_s == 0.5
    now[0] = 0.5
    rate.admit("k", 500)
    rate.admit("other", 1000)  # every key has its own bucket
    unlimited = IngestRate(0)
    for _ in range(100):
        unlimited.admit("k", 50_000)


def test_stream_slots_count_a_released_or_dropped_slot_out_once() -> None:
    slots = StreamSlots(per_token=1, per_address=2, retry_after_s=1)
    slot = slots.acquire(token="t", address="a")
    with pytest.raises(TooManyRequests):
        slots.acquire(token="t", address="b")
    slot.release()
    slot.release()  # idempotent: counted out once
    first = slots.acquire(token="t", address="a")
    second = slots.acquire(token="u", address="a")
    with pytest.raises(TooManyRequests):
        slots.acquire(token="v", address="a")  # the address holds two
    del first, second  # dropped unreleased: counted out all the same
    held = [slots.acquire(token="t", address="a"), slots.acquire(token="u", address="a")]
    assert len(held) == 2
