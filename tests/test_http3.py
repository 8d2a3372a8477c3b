"""Feeds and ingest over HTTP/3 (QUIC on loopback), with a real HTTP/3 client (aioquic).

The client is :class:`bench.h3.H3Client`: aioquic's own QUIC and HTTP/3 connections,
driven by Trio over a UDP socket. The server finds its port through the ``Alt-Svc``
header of its HTTPS responses, as a browser does.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
import trustme

from bench.h3 import H3Client, H3Response, event_fields, split_events
from tests.conftest import (
    BERLIN,
    BERLIN_BBOX,
    INGEST_KEY,
    RunningServer,
    StartServer,
    ping,
)
from tests.processes import run_tracker
from tests.rawhttp import move_fleet
from tracker.client import FeedView
from tracker.config import ConfigError, load_config
from tracker.quic import STREAM_HIGH_WATER, alt_svc


@dataclass
class Tls:
    """A throwaway CA and a certificate for 127.0.0.1 and localhost."""

    cafile: str
    certfile: str
    keyfile: str
    trust: ssl.SSLContext


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1", "localhost")
    cafile, certfile, keyfile = (tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem"))
    authority.cert_pem.write_to_path(cafile)
    cert.private_key_and_cert_chain_pem.write_to_path(certfile)
    cert.private_key_pem.write_to_path(keyfile)
    trust = ssl.create_default_context()
    authority.configure_trust(trust)
    return Tls(str(cafile), str(certfile), str(keyfile), trust)


async def start_h3(start_server: StartServer, tls: Tls, **overrides: Any) -> RunningServer:
    return await start_server(
        certfile=tls.certfile, keyfile=tls.keyfile, quic_bind="127.0.0.1:0", **overrides
    )


async def quic_port(server: RunningServer, tls: Tls, http2: bool = False) -> int:
    """The HTTP/3 port the server advertises (Alt-Svc) on an HTTPS response."""
    async with httpx.AsyncClient(verify=tls.trust, http2=http2, http1=not http2) as http:
        response = await http.get(f"{server.url}/healthz")
    assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    match = re.fullmatch(r'h3=":(\d+)"; ma=3600', response.headers["alt-svc"])
    assert match, response.headers["alt-svc"]
    return int(match[1])


@asynccontextmanager
async def h3_client(server: RunningServer, tls: Tls, **options: Any) -> AsyncIterator[H3Client]:
    port = await quic_port(server, tls)
    async with H3Client.connect("127.0.0.1", port, tls.cafile, **options) as client:
        yield client


class H3Feed:
    """A feed read over HTTP/3: its events, decoded into a view."""

    def __init__(self, response: H3Response) -> None:
        self.response = response
        self.view = FeedView()
        self.names: list[str] = []
        self._buffer = bytearray()
        self._pending: list[bytes] = []

    async def next_event(self) -> str:
        while not self._pending:
            chunk = await self.response.read()
            assert chunk, "the feed ended"
            self._buffer += chunk
            self._pending = split_events(self._buffer)
        name, data = event_fields(self._pending.pop(0))
        self.names.append(name)
        self.view.apply(name, data)
        return name


async def post_h3(client: H3Client, pings: list[dict[str, Any]]) -> H3Response:
    return await client.request(
        "POST",
        "/ingest",
        [("content-type", "application/msgpack"), *INGEST_KEY.items()],
        msgspec.msgpack.encode(pings),
    )


def test_quic_bind_needs_a_certificate() -> None:
    with pytest.raises(ConfigError) as error:
        load_config({"quic_bind": "127.0.0.1:4433"})
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("--quic-bind needs --certfile and --keyfile")
    assert "TRACKER_QUIC_BIND" in message
    with pytest.raises(ConfigError, match="--quic-bind must be HOST:PORT or PORT"):
        load_config({"quic_bind": "127.0.0.1:http3", "certfile": "c", "keyfile": "k"})
    pair = {"certfile": "c", "keyfile": "k"}
    assert load_config({"quic_bind": "4433", "host": "::1", **pair}).quic_address == ("::1", 4433)
    assert load_config({"quic_bind": "[::]:443", **pair}).quic_address == ("::", 443)


async def test_alt_svc_advertises_h3_on_http1_and_http2(
    start_server: StartServer, tls: Tls
) -> None:
    server = await start_h3(start_server, tls)
    port = await quic_port(server, tls)
    assert port == await quic_port(server, tls, http2=True)
    assert alt_svc(port) == f'h3=":{port}"; ma=3600'
    plain = await start_server(certfile=tls.certfile, keyfile=tls.keyfile)
    async with httpx.AsyncClient(verify=tls.trust) as http:
        assert "alt-svc" not in (await http.get(f"{plain.url}/healthz")).headers


async def test_feed_and_ingest_over_h3(start_server: StartServer, tls: Tls) -> None:
    server = await start_h3(start_server, tls)
    with trio.fail_after(10):
        async with h3_client(server, tls) as client:
            accepted = await post_h3(client, [ping("h3-van", *BERLIN, time.time())])
            assert accepted.status == 200, await accepted.read_all()
            await server.wait_for_ticks()
            response = await client.request("GET", f"/feed?bbox={BERLIN_BBOX}")
            assert response.status == 200
            assert response.headers[b"content-type"].startswith(b"text/event-stream")
            assert b"connection" not in response.headers
            assert b"alt-svc" not in response.headers
            feed = H3Feed(response)
            assert await feed.next_event() == "snapshot"
            assert set(feed.view.by_id()) == {"h3-van"}
            moved = (BERLIN[0] + 0.001, BERLIN[1])
            await post_h3(client, [ping("h3-van", *moved, time.time())])
            while await feed.next_event() != "batch":
                pass
            seen = feed.view.by_id()["h3-van"].position
            assert (round(seen.lat, 3), round(seen.lon, 3)) == (round(moved[0], 3), BERLIN[1])
            bad = await client.request(
                "POST",
                "/ingest",
                [("content-type", "application/msgpack"), *INGEST_KEY.items()],
                b"\xc1" * 99,
            )
            assert bad.status == 400
            assert b'"error"' in await bad.read_all()


async def test_a_body_over_the_limit_is_refused_and_the_server_goes_on(
    start_server: StartServer, tls: Tls
) -> None:
    server = await start_h3(start_server, tls, ingest_max_bytes=4096)
    with trio.fail_after(10):
        async with h3_client(server, tls) as client:
            big = await client.request(
                "POST",
                "/ingest",
                [("content-type", "application/msgpack"), *INGEST_KEY.items()],
                b"\x90" * 300_000,  # the server answers before it has all of it
            )
            assert big.status == 413
            again = await post_h3(client, [ping("after", *BERLIN, time.time())])
            assert again.status == 200


def _buffered(server: RunningServer) -> int:
    value = server.tracker.metrics.gauges["quic_send_buffered_bytes"][1]()
    assert isinstance(value, int)
    return value


async def test_a_client_that_grants_no_credit_is_conflated_bounded_and_reaped(
    start_server: StartServer, tls: Tls
) -> None:
    server = await start_h3(start_server, tls, outbox_max_ticks=4, write_timeout_s=2.0)
    metrics, hub = server.tracker.metrics, server.tracker.hub
    feeds = 4
    with trio.fail_after(30):
        async with (
            httpx.AsyncClient(base_url=server.url, verify=tls.trust, headers=INGEST_KEY) as http,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(move_fleet, http, 600)
            async with (
                h3_client(server, tls, credit=False, window=16 * 1024) as stingy,
                h3_client(server, tls) as reader,
            ):
                stalled = [
                    await stingy.request("GET", f"/feed?bbox={BERLIN_BBOX}") for _ in range(feeds)
                ]
                live = H3Feed(await reader.request("GET", f"/feed?bbox={BERLIN_BBOX}"))
                while metrics.conflations < feeds:  # every stalled feed's outbox overflowed
                    await live.next_event()
                handed = metrics.bytes_sent
                held = _buffered(server)
                # each stalled stream holds at most the high water plus one write
                assert held <= feeds * (STREAM_HIGH_WATER + 256 * 1024)
                batches = live.names.count("batch")
                for _ in range(10):  # the reader on its own connection goes on
                    await live.next_event()
                assert live.names.count("batch") > batches
                assert _buffered(server) <= held + STREAM_HIGH_WATER  # the live feed's share
                while hub.subscriber_count > 1:  # the stalled ones are reaped
                    await live.next_event()
                assert metrics.h3_streams_reaped == feeds
                assert metrics.bytes_sent > handed
                with trio.fail_after(5):
                    while not all(r.reset for r in stalled):  # RESET_STREAM reached the client
                        await trio.sleep(0.05)
            nursery.cancel_scope.cancel()


async def test_shutdown_ends_h3_feeds_within_the_grace(start_server: StartServer, tls: Tls) -> None:
    server = await start_h3(start_server, tls, shutdown_grace_s=0.5)
    async with h3_client(server, tls) as client:
        feed = H3Feed(await client.request("GET", f"/feed?bbox={BERLIN_BBOX}"))
        assert await feed.next_event() == "snapshot"
        started = trio.current_time()
        server.shutdown.set()
        while await feed.next_event() != "shutdown":
            pass
        with trio.fail_after(3):
            await server.stopped.wait()
            await client.closed.wait()  # the server closed the connection
        assert trio.current_time() - started < 2.5


async def test_connections_over_the_limit_are_refused_or_evict_idle_ones(
    start_server: StartServer, tls: Tls
) -> None:
    server = await start_h3(start_server, tls, max_connections=2)
    port = await quic_port(server, tls)
    metrics = server.tracker.metrics
    connections = metrics.gauges["connections"][1]
    with trio.fail_after(10):
        async with (
            H3Client.connect("127.0.0.1", port, tls.cafile) as first,
            H3Client.connect("127.0.0.1", port, tls.cafile) as second,
        ):
            feeds = [await c.request("GET", f"/feed?bbox={BERLIN_BBOX}") for c in (first, second)]
            assert [f.status for f in feeds] == [200, 200]
            with pytest.raises(ConnectionRefusedError, match=r"\(2\)"):  # CONNECTION_REFUSED
                async with H3Client.connect("127.0.0.1", port, tls.cafile):
                    pass
            assert metrics.connections_refused == 1
        while connections():
            await trio.sleep(0.05)
        async with (
            H3Client.connect("127.0.0.1", port, tls.cafile) as idle,
            H3Client.connect("127.0.0.1", port, tls.cafile) as busy,
        ):
            await (await idle.request("GET", "/healthz")).read_all()
            assert (await busy.request("GET", f"/feed?bbox={BERLIN_BBOX}")).status == 200
            async with H3Client.connect("127.0.0.1", port, tls.cafile) as newcomer:
                assert (await newcomer.request("GET", "/healthz")).status == 200
                await idle.closed.wait()  # the idle one made room, as TCP ones do
            assert metrics.connections_evicted == 1


def test_tracker_serve_explains_quic_options_in_one_line(tls: Tls) -> None:
    result = run_tracker("serve", "--port", "0", "--quic-bind", "127.0.0.1:0")
    assert result.returncode == 2
    assert result.stderr == (
        "tracker: bad configuration: --quic-bind needs --certfile and --keyfile: QUIC is "
        "always encrypted (TRACKER_QUIC_BIND, TRACKER_CERTFILE, TRACKER_KEYFILE)\n"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = run_tracker(
            "serve",
            *("--port", "0", "--certfile", tls.certfile, "--keyfile", tls.keyfile),
            *("--quic-bind", f"127.0.0.1:{port}"),
        )
    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("tracker:")]
    assert line == (
        f"tracker: cannot listen for HTTP/3 on 127.0.0.1 UDP port {port}: Address already in "
        "use (--quic-bind, TRACKER_QUIC_BIND)"
    )
    assert "Traceback" not in result.stderr
