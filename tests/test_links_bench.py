"""bench.linkclient against a real tracker: it applies every compact event of real link
feeds (no broken chain), counts every byte, and times each position from its ping."""

from __future__ import annotations

import time

import httpx
import trio

from bench.linkclient import LinkClient
from tests.conftest import BERLIN, StartServer, ping, post_pings
from tests.credentials import SECRET, SECURE
from tracker.auth import Keyring


async def test_the_link_client_follows_real_links(start_server: StartServer) -> None:
    server = await start_server(**SECURE)
    keyring = Keyring([SECRET], resolution=7, max_cells=4000)
    vans = [f"van-{n}" for n in range(3)]
    tokens = [f"token={keyring.mint(ttl_s=60, vehicles=[van])}" for van in vans]
    client = LinkClient(server.url, tokens + tokens, warmup=0.3, seconds=1.5)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        start = time.time() - 10
        await post_pings(http, [ping(van, *BERLIN, start) for van in vans])
        await server.wait_for_ticks(2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, client.run)
            for step in range(1, 20):
                lat = BERLIN[0] + 0.0001 * step
                await post_pings(http, [ping(van, lat, BERLIN[1], start + step) for van in vans])
                await trio.sleep(0.1)
    stats = client.stats
    assert stats.errors == [] and client.broken == 0 and stats.connected == 6
    assert stats.positions >= 6 * 10
    assert stats.bytes / stats.positions < 13
    assert stats.latency_ms.sum() > 0
