"""The served core over real sockets: supervision, liveness, readiness, shutdown deadline.

A dead or stuck core must never look healthy: a crashed tick takes ``serve`` down with the
error (the process exits non-zero), a stuck ticker makes ``/healthz`` answer 503.
Shutdown keeps its deadline (the grace period) whatever the clients do.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import BERLIN_BBOX, FAST, INGEST_KEY, RunningServer, StartServer
from tests.rawhttp import connect, move_fleet
from tests.sse import open_feed
from tracker.config import TrackerConfig
from tracker.server import serve
from tracker.service import CoreCrashed, Tracker


async def test_healthz_reports_tick_age_and_bus(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        with trio.fail_after(5):
            while (await client.get("/readyz")).status_code != 200:
                await trio.sleep(0.01)
        response = await client.get("/healthz")
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok" and health["problems"] == []
    assert health["bus"] == "local" and health["state"] == "running"
    assert 0 <= health["last_tick_age_s"] < 1


async def test_healthz_is_503_when_the_ticker_is_stuck(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.tracker, "tick", lambda *_, **__: None)  # alive, publishing nothing
    async with httpx.AsyncClient(base_url=server.url) as client:
        with trio.fail_after(5):
            while (response := await client.get("/healthz")).status_code == 200:
                await trio.sleep(0.1)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "failing" and "stuck" in body["problems"][0]
    assert body["last_tick_age_s"] >= 2.0


async def test_readyz_is_503_until_the_first_tick(start_server: StartServer) -> None:
    server = await start_server(tick_s=10)
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"ready": False, "state": "starting"}


async def test_readyz_flips_to_503_once_shutdown_begins(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        with trio.fail_after(5):
            while (await client.get("/readyz")).status_code != 200:
                await trio.sleep(0.01)
        async with open_feed(client, f"bbox={BERLIN_BBOX}") as feed:
            await feed.next_event()
            server.tracker.shutdown()  # what SIGTERM's shutdown trigger calls first
            assert (await feed.next_event()).event == "shutdown"
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {"ready": False, "state": "stopping"}
        assert (await client.get("/healthz")).status_code == 200  # alive while draining
    await server.stop()


async def test_a_crashing_tick_takes_serve_down_and_never_looks_healthy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = TrackerConfig(**FAST)
    tracker = Tracker(config)
    statuses: list[int] = []
    crashed_after: list[int] = []  # how many polls had answered when the tick crashed

    def crash(now: float, publication: object = None) -> Any:
        crashed_after.append(len(statuses))
        raise RuntimeError("index exploded")

    async def poll_health(url: str) -> None:
        async with httpx.AsyncClient(base_url=url) as client:
            while True:
                try:
                    statuses.append((await client.get("/healthz")).status_code)
                except httpx.TransportError:
                    statuses.append(0)
                await trio.sleep(0.005)

    with (
        trio.fail_after(10),
        pytest.RaisesGroup(
            pytest.RaisesExc(CoreCrashed, match="index exploded"), flatten_subgroups=True
        ),
    ):
        async with trio.open_nursery() as nursery:
            (url, *_) = await nursery.start(
                functools.partial(serve, config, trio.Event(), tracker=tracker)
            )
            nursery.start_soon(poll_health, url)
            while len(statuses) < 3:  # (a busy machine answers the first polls late)
                await trio.sleep(0.05)
            assert set(statuses) == {200}
            monkeypatch.setattr(tracker.index, "advance", crash)
            await trio.sleep(5)  # the crash must end this nursery long before
    # Only a poll already answered when the tick crashed may still read 200.
    assert statuses[crashed_after[0] + 1 :].count(200) == 0


# --- shutdown against clients that do not read ---------------------------------------------

GRACE_S = 0.5
MARGIN_S = 1.5  # scheduling on a loaded CI machine


async def test_shutdown_ends_within_grace_while_a_feed_client_never_reads(
    start_server: StartServer,
) -> None:
    # A write timeout far beyond the test: only the grace period may end the stalled write.
    server = await start_server(shutdown_grace_s=GRACE_S, write_timeout_s=60, sndbuf_bytes=4096)
    metrics = server.tracker.metrics
    stalled = await connect(server, rcvbuf=4096)
    await stalled.send_all(f"GET /feed?bbox={BERLIN_BBOX} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    async with httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY) as http:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(move_fleet, http, 1000)
                while metrics.conflations < 1:  # the feed is stuck in a socket write
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    started = trio.current_time()
    server.shutdown.set()
    with trio.fail_after(GRACE_S + MARGIN_S):
        await server.stopped.wait()
    assert trio.current_time() - started >= GRACE_S * 0.9  # it did wait for the grace
    await stalled.aclose()


async def test_shutdown_is_prompt_when_every_client_reads(start_server: StartServer) -> None:
    server = await start_server(shutdown_grace_s=5)
    async with (
        httpx.AsyncClient(base_url=server.url) as http,
        http.stream("GET", f"/feed?bbox={BERLIN_BBOX}") as feed,
    ):
        lines = feed.aiter_lines()
        await lines.__anext__()
        started = trio.current_time()
        server.shutdown.set()
        with trio.fail_after(3):
            async for line in lines:
                if line == "event: shutdown":
                    break
            await server.stopped.wait()
    assert trio.current_time() - started < 3


CRASHING_TRACKER = """
import sys

import tracker.geoindex
from tracker.cli import main

publish = tracker.geoindex.GeoIndex.advance


def advance(self, now, publication=None):
    if self.tick >= 5:
        raise RuntimeError("index exploded")
    return publish(self, now, publication)


tracker.geoindex.GeoIndex.advance = advance
sys.exit(main(sys.argv[1:]))
"""


def test_a_crashing_tick_ends_the_tracker_process_with_a_non_zero_exit() -> None:
    """The real program: ``tracker serve`` whose sixth tick raises exits on its own."""
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_TRACKER, "serve", "--port", "0", "--tick", "0.05"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert b"a core task crashed" in done.stderr and b"index exploded" in done.stderr
    # The traceback is logged once, then one line: no second, uncaught traceback.
    assert done.stderr.count(b"RuntimeError: index exploded") == 1, done.stderr.decode()
    assert done.stderr.strip().splitlines()[-1].startswith(b"tracker: stopped after a core")
