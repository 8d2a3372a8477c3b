"""Feeds over HTTP/2: cleartext h2c (prior knowledge) and h2 over TLS (ALPN)."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import httpx
import trustme

from tests.conftest import BERLIN, BERLIN_BBOX, StartServer, ping, post_pings
from tests.sse import open_feed


async def _feed_sees_vehicle(client: httpx.AsyncClient) -> None:
    await post_pings(client, [ping("h2", *BERLIN, time.time())])
    async with open_feed(client, f"bbox={BERLIN_BBOX}") as feed:
        assert feed.response.http_version == "HTTP/2"
        await feed.until(lambda v: bool(v.vehicles))
        assert feed.ids() == {"h2"}


async def test_feed_over_h2c(start_server: StartServer) -> None:
    server = await start_server()
    async with httpx.AsyncClient(base_url=server.url, http1=False, http2=True) as client:
        await _feed_sees_vehicle(client)


async def test_feed_over_h2_with_tls(start_server: StartServer, tmp_path: Path) -> None:
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(certfile)
    cert.private_key_pem.write_to_path(keyfile)
    server = await start_server(certfile=str(certfile), keyfile=str(keyfile))
    assert server.url.startswith("https://")
    trust = ssl.create_default_context()
    authority.configure_trust(trust)
    async with httpx.AsyncClient(base_url=server.url, http2=True, verify=trust) as client:
        await _feed_sees_vehicle(client)
