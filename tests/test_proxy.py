"""Trusted proxies: forwarded client addresses and schemes, believed only from listed peers."""

from __future__ import annotations

import ipaddress
from contextlib import AsyncExitStack

import httpx
import pytest
import trio

from tests.conftest import BERLIN_BBOX, StartServer
from tests.credentials import SECURE, mint_token
from tracker.config import ConfigError, TrackerConfig
from tracker.proxies import MAX_HOPS, forwarded_client

PROXY = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "proto", "expected"),
    [
        # An untrusted peer's headers are ignored: it is the client.
        ("203.0.113.9", "1.2.3.4", "https", ("203.0.113.9", None)),
        # One trusted proxy.
        ("10.0.0.1", "1.2.3.4", "https", ("1.2.3.4", "https")),
        ("10.0.0.1", "", "https", ("10.0.0.1", "https")),
        ("10.0.0.1", "1.2.3.4", "", ("1.2.3.4", None)),
        # The client wrote an X-Forwarded-For of its own: the proxy appended the truth.
        ("10.0.0.1", "6.6.6.6, 1.2.3.4", "https", ("1.2.3.4", "https")),
        # Two trusted proxies, each appending address and proto.
        ("10.0.0.2", "1.2.3.4, 10.0.0.1", "https, http", ("1.2.3.4", "https")),
        # Proxies that overwrite the proto: the last one's word.
        ("10.0.0.2", "1.2.3.4, 10.0.0.1", "http", ("1.2.3.4", "http")),
        # Ports, brackets, IPv6 and IPv4-mapped addresses.
        ("10.0.0.1", "1.2.3.4:5678", "", ("1.2.3.4", None)),
        ("fd00::1", "[2001:db8::1]:443", "https", ("2001:db8::1", "https")),
        ("::ffff:10.0.0.1", "2001:db8::1", "", ("2001:db8::1", None)),
        # Not an address: nothing further left is believed.
        ("10.0.0.1", "1.2.3.4, garbage", "", ("10.0.0.1", None)),
        ("10.0.0.1", "unknown", "", ("10.0.0.1", None)),
    ],
)
def test_forwarded_client(
    peer: str, forwarded_for: str, proto: str, expected: tuple[str, str | None]
) -> None:
    assert forwarded_client(peer, forwarded_for, proto, PROXY) == expected


def test_forwarded_client_reads_a_bounded_number_of_hops() -> None:
    """A 100,000-entry header costs no more than a short one, and stops at MAX_HOPS."""
    chain = ", ".join(["1.2.3.4"] + ["10.0.0.1"] * 100_000)
    client, _ = forwarded_client("10.0.0.1", chain, "https," * 100_000, PROXY)
    assert client == "10.0.0.1"  # beyond MAX_HOPS trusted hops: the client is not known
    short = ", ".join(["1.2.3.4"] + ["10.0.0.1"] * (MAX_HOPS - 1))
    assert forwarded_client("10.0.0.1", short, "", PROXY)[0] == "1.2.3.4"


def test_trusted_proxies_config_takes_addresses_and_networks() -> None:
    config = TrackerConfig(trusted_proxies="10.0.0.0/8, ::1,192.168.1.7")
    assert [str(n) for n in config.trusted_proxy_list] == [
        "10.0.0.0/8",
        "::1/128",
        "192.168.1.7/32",
    ]
    assert TrackerConfig().trusted_proxy_list == []
    with pytest.raises(ConfigError, match=r"--trusted-proxies .*\(TRACKER_TRUSTED_PROXIES\)"):
        TrackerConfig(trusted_proxies="10.0.0.0/8,proxy.example")


async def _session_cookie(url: str, headers: dict[str, str]) -> str:
    async with httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/session", json={"token": mint_token()}, headers=headers)
    assert response.status_code == 200, response.text
    return response.headers["set-cookie"]


async def test_cookie_is_secure_behind_a_trusted_tls_proxy_only(
    start_server: StartServer,
) -> None:
    behind = await start_server(**SECURE, trusted_proxies="127.0.0.1")
    direct = await start_server(**SECURE)
    https = {"X-Forwarded-Proto": "https"}
    assert "Secure" in await _session_cookie(behind.url, https)
    assert "Secure" not in await _session_cookie(behind.url, {})
    assert "Secure" not in await _session_cookie(direct.url, https)  # spoofed: ignored


async def test_session_origin_check_sees_the_scheme_the_proxy_saw(
    start_server: StartServer,
) -> None:
    """The page is https://tracker.example; the tracker behind the proxy sees http."""
    page = {"Host": "tracker.example", "Origin": "https://tracker.example"}
    behind = await start_server(**SECURE, trusted_proxies="127.0.0.0/8")
    direct = await start_server(**SECURE)
    forwarded = {**page, "X-Forwarded-Proto": "https"}
    assert "Secure" in await _session_cookie(behind.url, forwarded)
    async with httpx.AsyncClient(base_url=direct.url) as client:
        spoofed = await client.post("/session", json={"token": mint_token()}, headers=forwarded)
    assert spoofed.status_code == 403


async def _open_feeds_as(url: str, clients: list[str], stack: AsyncExitStack) -> list[int]:
    """Open a feed per entry of ``clients`` (as X-Forwarded-For), kept open; their statuses."""
    statuses = []
    for forwarded_for in clients:
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=url))
        response = await stack.enter_async_context(
            http.stream(
                "GET", f"/feed?bbox={BERLIN_BBOX}", headers={"X-Forwarded-For": forwarded_for}
            )
        )
        if response.status_code != 200:
            await response.aread()
        statuses.append(response.status_code)
    return statuses


async def test_stream_limit_per_address_counts_clients_behind_a_trusted_proxy(
    start_server: StartServer,
) -> None:
    behind = await start_server(trusted_proxies="127.0.0.1", max_streams_per_address=1)
    direct = await start_server(max_streams_per_address=1)
    with trio.fail_after(10):
        async with AsyncExitStack() as stack:
            clients = ["198.51.100.1", "198.51.100.2", "198.51.100.1"]
            assert await _open_feeds_as(behind.url, clients, stack) == [200, 200, 429]
        async with AsyncExitStack() as stack:
            # Not a trusted proxy: every "client" is the peer, 127.0.0.1.
            assert await _open_feeds_as(direct.url, clients[:2], stack) == [200, 429]
