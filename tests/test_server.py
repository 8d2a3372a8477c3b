"""The served core over real sockets: supervision, liveness and readiness.

A dead or stuck core must never look healthy: a crashed tick takes ``serve`` down with the
error (the process exits non-zero), a stuck ticker makes ``/healthz`` answer 503.
"""

from __future__ import annotations

import functools
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import BERLIN_BBOX, FAST, RunningServer, StartServer
from tests.sse import open_feed
from tracker.config import TrackerConfig
from tracker.server import serve
from tracker.service import Tracker


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
    monkeypatch.setattr(server.tracker, "tick", lambda: None)  # alive, publishing nothing
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

    def crash(now: float) -> Any:
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
            pytest.RaisesExc(RuntimeError, match="index exploded"), flatten_subgroups=True
        ),
    ):
        async with trio.open_nursery() as nursery:
            (url, *_) = await nursery.start(
                functools.partial(serve, config, trio.Event(), tracker=tracker)
            )
            nursery.start_soon(poll_health, url)
            await trio.sleep(0.2)
            assert statuses and set(statuses) == {200}
            monkeypatch.setattr(tracker.index, "advance", crash)
            await trio.sleep(5)  # the crash must end this nursery long before
    # Only a poll already answered when the tick crashed may still read 200.
    assert statuses[crashed_after[0] + 1 :].count(200) == 0
