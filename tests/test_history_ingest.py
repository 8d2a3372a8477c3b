"""History on the write path, end to end: ingest over HTTP into the embedded store.

Real sockets and the real SQLite store: what ingest acknowledged is read back from the
file by a store of the test's own; the durability contract is checked on a real tracker
process killed with SIGKILL, and a restart keeps appending to the same file.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import msgspec
import pytest
import trio

from tests.conftest import BERLIN, INGEST_KEY, StartServer, ping, post_pings
from tests.processes import run_tracker, tracker_process
from tracker import service
from tracker.history.store import HistoryStore, StoreError, open_store
from tracker.history.writer import History
from tracker.pings import Ping

Key = tuple[str, int]
"""A stored position by vehicle and time in ms (what the store keeps exactly)."""


def stored(path: Path, vehicles: Sequence[str], start: float, end: float) -> set[Key]:
    """Every position the file at ``path`` holds for ``vehicles`` in ``[start, end)``."""
    store = open_store(str(path))
    try:
        store.migrate()
        keys: set[Key] = set()
        for vehicle in vehicles:
            track = store.track(vehicle, start, end, limit=10_000_000)
            keys.update((vehicle, round(ts * 1000)) for ts in track.ts.tolist())
        return keys
    finally:
        store.close()


def keys(pings: Sequence[dict[str, object]]) -> set[Key]:
    return {(str(p["vehicle_id"]), round(float(p["ts"]) * 1000)) for p in pings}  # type: ignore[arg-type]


async def committed(history: History) -> None:
    """Wait until history has committed everything it queued."""
    with trio.fail_after(10):
        while history.queued:
            await trio.sleep(0.02)


async def test_ingested_pings_are_in_the_history_file(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "history.sqlite3"
    server = await start_server(history=str(path), history_commit_s=0.1)
    assert server.tracker.history is not None
    now = time.time()
    batch = [
        ping(f"v{n % 3}", BERLIN[0] + n * 1e-4, BERLIN[1], now - 10 + n * 0.5) for n in range(12)
    ]
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        assert (await post_pings(client, batch)).json()["accepted"] == 12
        await committed(server.tracker.history)
        health = (await client.get("/healthz")).json()
        metrics = (await client.get("/metrics")).text
    assert stored(path, ["v0", "v1", "v2"], now - 60, now + 60) == keys(batch)
    assert health["history"] == "ok"
    assert "tracker_history_committed_pings_total 12.0" in metrics


class GatedStore:
    """A real store whose appends wait until the test opens the gate (a slow disk)."""

    def __init__(self, inner: HistoryStore) -> None:
        self.inner = inner
        self.resolution = inner.resolution
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def append(self, pings: Sequence[Ping]) -> None:
        self.waiting.set()
        self.gate.wait(timeout=20)
        self.inner.append(pings)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_ingest_answers_503_when_history_cannot_keep_up_and_loses_nothing(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "history.sqlite3"
    gated: list[GatedStore] = []

    def slow_store(target: str) -> GatedStore:
        gated.append(GatedStore(open_store(target)))
        return gated[0]

    monkeypatch.setattr(service, "open_store", slow_store)
    server = await start_server(history=str(path), history_commit_s=0.05, history_queue_pings=10)
    history = server.tracker.history
    assert history is not None
    now = time.time()
    acknowledged: list[dict[str, object]] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        first = [ping(f"a{n}", *BERLIN, now) for n in range(6)]
        assert (await post_pings(client, first)).status_code == 200
        acknowledged += first
        await trio.to_thread.run_sync(gated[0].waiting.wait, 5)  # a commit is stuck
        second = [ping(f"b{n}", *BERLIN, now) for n in range(4)]
        assert (await post_pings(client, second)).status_code == 200  # 10: full
        acknowledged += second
        third = [ping(f"c{n}", *BERLIN, now) for n in range(2)]
        refused = await post_pings(client, third)
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"] == "busy"
        assert "history cannot keep up" in refused.json()["message"]
        assert server.tracker.index.vehicle_count == 10  # refused before it was applied
        gated[0].gate.set()
        await committed(history)
        assert (await post_pings(client, third)).status_code == 200
        acknowledged += third
        await committed(history)
        metrics = (await client.get("/metrics")).text
    vehicles = [str(p["vehicle_id"]) for p in acknowledged]
    assert stored(path, vehicles, now - 1, now + 1) == keys(acknowledged)
    assert "tracker_history_refused_pings_total 2.0" in metrics


async def post_steadily(
    url: str, vehicles: list[str], until: float, acknowledged: list[tuple[float, list[Key]]]
) -> None:
    """POST one ping per vehicle every 20 ms until ``until`` (or until the tracker dies);
    each batch acknowledged with 200 is recorded with the time its answer arrived."""
    async with httpx.AsyncClient(base_url=url, timeout=5, headers=INGEST_KEY) as client:
        while time.time() < until:
            now = time.time()
            batch = [ping(v, *BERLIN, now) for v in vehicles]
            try:
                response = await client.post(
                    "/ingest",
                    content=msgspec.msgpack.encode(batch),
                    headers={"Content-Type": "application/msgpack"},
                )
            except httpx.TransportError:
                return  # killed
            if response.status_code == 200:
                acknowledged.append((time.time(), sorted(keys(batch))))
            await trio.sleep(0.02)


COMMIT_S = 0.5
MARGIN_S = 1.0
"""Slack on top of the commit interval for the commit's own duration (an fsync on a disk
that other processes load can take hundreds of milliseconds)."""


async def test_kill_9_loses_at_most_the_last_commit_interval_and_a_restart_appends(
    tmp_path: Path,
) -> None:
    path = tmp_path / "history.sqlite3"
    vehicles = [f"k{n}" for n in range(20)]
    options = ["serve", "--port", "0", "--open", "--ingest-keys", INGEST_KEY["X-Ingest-Key"]]
    options += ["--history", str(path), "--history-commit", str(COMMIT_S), "--tick", "0.1"]
    started = time.time()
    acknowledged: list[tuple[float, list[Key]]] = []
    async with tracker_process(*options) as tracker, trio.open_nursery() as nursery:
        nursery.start_soon(post_steadily, tracker.url, vehicles, time.time() + 60, acknowledged)
        with trio.fail_after(50):  # enough acknowledged before the last interval, however busy
            while sum(at < time.time() - COMMIT_S - MARGIN_S for at, _ in acknowledged) <= 60:
                await trio.sleep(0.1)
        killed_at = time.time()
        tracker.child.process.kill()  # SIGKILL: no flush, no goodbye
        await trio.to_thread.run_sync(tracker.child.process.wait)
    on_disk = stored(path, vehicles, started - 1, time.time() + 1)
    old = {
        key for at, batch in acknowledged if at < killed_at - COMMIT_S - MARGIN_S for key in batch
    }
    recent = {
        key for at, batch in acknowledged if at >= killed_at - COMMIT_S - MARGIN_S for key in batch
    }
    missing_recent = recent - on_disk
    print(
        f"acknowledged {len(old) + len(recent)} pings; of the last {COMMIT_S + MARGIN_S} s "
        f"before kill -9 ({len(recent)}), {len(missing_recent)} missing; older ones missing: "
        f"{len(old - on_disk)}"
    )
    assert len(old) > 1000
    assert old <= on_disk  # the contract: only the last commit interval may be missing
    assert on_disk <= old | recent  # nothing stored that was not sent

    again: list[tuple[float, list[Key]]] = []
    async with tracker_process(*options) as tracker:
        await post_steadily(tracker.url, vehicles, time.time() + 1, again)
        assert await tracker.interrupt() == 0  # a graceful stop flushes the queue
    after = stored(path, vehicles, started - 1, time.time() + 1)
    assert {key for _, batch in again for key in batch} <= after  # nothing lost on SIGINT
    assert on_disk <= after  # the file kept what it had, and grew
    assert len(again) >= 3  # some batches after the restart, however busy the machine


class FailingStore(GatedStore):
    """A real store whose appends fail while ``failing`` is set (a full disk)."""

    failing = True

    def append(self, pings: Sequence[Ping]) -> None:
        if self.failing:
            raise StoreError("disk full")
        self.inner.append(pings)


async def test_healthz_warns_while_the_history_store_fails(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing: list[FailingStore] = []

    def broken_store(target: str) -> FailingStore:
        failing.append(FailingStore(open_store(target)))
        return failing[0]

    monkeypatch.setattr(service, "open_store", broken_store)
    server = await start_server(history=str(tmp_path / "h.sqlite3"), history_commit_s=0.05)
    assert server.tracker.history is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        assert (await post_pings(client, [ping("v1", *BERLIN, time.time())])).status_code == 200
        with trio.fail_after(5):
            while not server.tracker.history.failing:
                await trio.sleep(0.02)
        health = await client.get("/healthz")
        assert health.status_code == 200  # feeds go on: a warning, not a problem
        body = health.json()
        assert body["history"] == "failing" and body["status"] == "ok"
        assert any("history store is failing" in w for w in body["warnings"])
        failing[0].failing = False
        await committed(server.tracker.history)
        assert (await client.get("/healthz")).json()["history"] == "ok"


def test_a_history_file_that_cannot_be_opened_stops_serve_with_one_line(tmp_path: Path) -> None:
    not_history = tmp_path / "notes.txt"
    not_history.write_text("not a database, " * 100)
    result = run_tracker("serve", "--port", "0", "--history", str(not_history))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    # One line says why (a busy machine may add the event-loop watch's log lines before it).
    assert [line for line in result.stderr.splitlines() if line.startswith("tracker:")] == [
        "tracker: cannot open the history store (--history, TRACKER_HISTORY): history file "
        f"{not_history}: file is not a database"
    ]
