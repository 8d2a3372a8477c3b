"""Shared fixtures: a real tracker server on a free loopback port, and SSE helpers.

Servers run inside the test's own nursery (pytest-trio), so a test owns its server's
whole life; nothing is shared between tests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import pytest
import trio

from tests.postgres_server import PostgresServer
from tests.redis_server import RedisServer
from tracker.config import TrackerConfig
from tracker.logs import CHATTY_LOGGERS
from tracker.server import serve
from tracker.service import Tracker

if TYPE_CHECKING:
    from playwright.sync_api import Browser

FAST: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 0,
    "tick_s": 0.05,
    "heartbeat_s": 5.0,
    "stale_after_s": 30.0,
    "remove_after_s": 60.0,
    "shutdown_grace_s": 0.5,
    "open_feeds": True,
    "ingest_keys": "test-ingest-key",
    "history": "",
}
"""Config of test servers: short ticks so tests wait milliseconds, not seconds; feeds open
to anonymous readers and one known ingest key, so that tests of other features need no
credentials (tests/test_auth.py and friends exercise the secure default). No history:
a test that wants it passes ``history=str(tmp_path / "history.sqlite3")``."""

INGEST_KEY = {"X-Ingest-Key": "test-ingest-key"}

BERLIN = (52.52, 13.405)
# A bbox around central Berlin and one far away (Munich).
BERLIN_BBOX = "13.30,52.48,13.50,52.56"
MUNICH = (48.137, 11.575)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's TRACKER_* variables must not change what tests see."""
    for name in list(os.environ):
        if name.startswith("TRACKER_"):
            monkeypatch.delenv(name)


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    """configure_logging changes the root logger; put back what pytest had."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    logging.captureWarnings(False)


@dataclass
class RunningServer:
    """A tracker serving on a loopback port inside the test's nursery."""

    url: str
    tracker: Tracker
    shutdown: trio.Event
    stopped: trio.Event

    async def wait_for_ticks(self, ticks: int = 2) -> None:
        """Let the server publish ``ticks`` more ticks (pings become visible on a tick)."""
        target = self.tracker.index.tick + ticks
        with trio.fail_after(5):
            while self.tracker.index.tick < target:
                await trio.sleep(0.01)

    async def stop(self) -> None:
        """Shut down gracefully and wait until the server has really exited."""
        self.shutdown.set()
        with trio.fail_after(10):
            await self.stopped.wait()


StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
def start_server(nursery: trio.Nursery) -> StartServer:
    """Start a real server: ``await start_server(tick_s=0.1, ...)`` (config overrides)."""

    async def start(**overrides: Any) -> RunningServer:
        config = TrackerConfig(**{**FAST, **overrides})
        tracker = Tracker(config)
        shutdown, stopped = trio.Event(), trio.Event()

        async def run(task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await serve(config, shutdown, tracker=tracker, task_status=task_status)
            finally:
                stopped.set()

        binds = await nursery.start(run)
        return RunningServer(binds[0], tracker, shutdown, stopped)

    return start


@pytest.fixture
async def server(start_server: StartServer) -> RunningServer:
    """A server with the fast test configuration."""
    return await start_server()


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP/1.1 client bound to ``server``."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10, headers=INGEST_KEY) as http:
        yield http


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A private redis-server on a free port, stopped after the test."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One private PostgreSQL for the whole session (initdb takes a second; databases are
    what tests get: see :func:`postgres`)."""
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, one for the whole run (each test gets a fresh context:
    ``tests.browser.watched_page``). Imported here only when a browser test asks."""
    from tests.browser import chromium

    with chromium() as running:
        yield running


@pytest.fixture
def postgres(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty database on the private PostgreSQL, for this test only."""
    return postgres_server.create_database()


def ping(vehicle_id: str, lat: float, lon: float, ts: float, **extra: Any) -> dict[str, Any]:
    """One ping as the ingest API takes it."""
    return {"vehicle_id": vehicle_id, "lat": lat, "lon": lon, "ts": ts, **extra}


async def post_pings(http: httpx.AsyncClient, pings: list[dict[str, Any]]) -> httpx.Response:
    """POST a batch as msgpack, the way vehicles do."""
    return await http.post(
        "/ingest",
        content=msgspec.msgpack.encode(pings),
        headers={"Content-Type": "application/msgpack", **INGEST_KEY},
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test means a missing component: that is a failure, not a pass."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and reporter.stats.get("skipped") and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
