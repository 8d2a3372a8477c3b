"""tracker.history.readers: queries answered in reader processes over the same SQLite file.

Real processes (spawned) and a real file; each test waits for the pool to start.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tracker.errors import ServiceBusy
from tracker.history import readers
from tracker.history.cursor import bind_query
from tracker.history.pages import PageQuery, track_page
from tracker.history.readers import ANSWER_PREFIX, ReaderPool, remove_stale_answers
from tracker.history.sqlite import SqliteStore
from tracker.pings import Ping

T0 = time.time() - 3600
BERLIN = (52.52, 13.405)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    file = tmp_path / "h.sqlite3"
    store = SqliteStore(file)
    store.migrate()
    lat, lon = BERLIN
    store.append(
        [Ping(vehicle_id="van", lat=lat + i * 1e-5, lon=lon, ts=T0 + i) for i in range(600)]
    )
    store.close()
    return file


def _page(fmt: str = "msgpack") -> functools.partial[bytes]:
    query = PageQuery(T0 - 1, T0 + 1000, fmt, 1000)
    return functools.partial(
        track_page,
        vehicle_id="van",
        query=query,
        after=None,
        binding=bind_query("track", b"van", query.start, query.end),
        cells=None,
        resolution=7,
        tolerance_m=None,
    )


async def _started(pool: ReaderPool) -> None:
    pool.want()
    with trio.fail_after(60):  # spawning interpreters on a busy machine
        while not pool.ready:
            await trio.sleep(0.05)


@asynccontextmanager
async def _running(path: Path) -> AsyncIterator[ReaderPool]:
    pool = ReaderPool(str(path), processes=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        yield pool
        nursery.cancel_scope.cancel()


async def test_a_reader_process_answers_what_a_thread_answers(path: Path) -> None:
    async with _running(path) as pool:
        await trio.sleep(0.1)
        assert not pool.ready  # not started until wanted
        await _started(pool)
        store = SqliteStore(path)
        store.migrate()
        try:
            expected = _page()(store)
        finally:
            store.close()
        assert await pool.call(_page()) == expected
        appended = SqliteStore(path)  # the writer commits more: readers see it
        appended.migrate()
        lat, lon = BERLIN
        appended.append([Ping(vehicle_id="van", lat=lat, lon=lon, ts=T0 + 700)])
        appended.close()
        assert len(await pool.call(_page())) > len(expected)
        executor = pool._executor
        assert executor is not None
        (process,) = executor._processes.values()
    assert not pool.ready  # stopped with its task
    assert await _ended(process.pid)


async def _ended(pid: int | None, within_s: float = 10.0) -> bool:
    """Whether process ``pid`` ended (gone, or a zombie) within ``within_s``.

    Not ``Process.is_alive()``: once the executor's own thread has reaped the process,
    ``is_alive()`` cannot tell (its ``waitpid`` fails) and answers True forever.
    """
    assert pid is not None
    stat = trio.Path(f"/proc/{pid}/stat")
    with trio.move_on_after(within_s):
        while True:
            try:
                if (await stat.read_text()).rsplit(")", 1)[1].split()[0] == "Z":
                    return True
            except FileNotFoundError:
                return True
            await trio.sleep(0.05)
    return False


async def test_a_killed_reader_answers_503_then_the_pool_is_replaced(path: Path) -> None:
    async with _running(path) as pool:
        await _started(pool)
        executor = pool._executor
        assert executor is not None
        for process in list(executor._processes.values()):
            os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(ServiceBusy), trio.fail_after(30):
            while True:  # until the executor notices its process is gone
                await pool.call(_page())
                await trio.sleep(0.1)
        await _started(pool)
        assert pool._executor is not executor
        assert await pool.call(_page("json"))


def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


async def test_starting_readers_removes_answers_left_by_stopped_trackers(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tracker killed with an answer in flight leaves its file; the next tracker to start
    its readers removes it, but not a running tracker's, nor anything else."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(readers, "SCRATCH", str(scratch))
    names = [
        f"{ANSWER_PREFIX}{_dead_pid()}-abc",  # a killed tracker's
        f"{ANSWER_PREFIX}{os.getpid()}-def",  # ours (in flight)
        f"{ANSWER_PREFIX}1-ghi",  # init's: running
        f"{ANSWER_PREFIX}x-jkl",  # not a pid: not ours to judge
        f"{ANSWER_PREFIX}{_dead_pid()}",  # no random part
        "other-file",
    ]
    for name in names:
        (scratch / name).write_bytes(b"answer")
    async with _running(path) as pool:
        await _started(pool)
        assert sorted(p.name for p in scratch.iterdir()) == sorted(names[1:])
        assert await pool.call(_page())  # answers still come through the scratch directory
        assert sorted(p.name for p in scratch.iterdir()) == sorted(names[1:])


def test_remove_stale_answers_counts_what_it_removed(tmp_path: Path) -> None:
    (tmp_path / f"{ANSWER_PREFIX}{_dead_pid()}-a").write_bytes(b"")
    (tmp_path / f"{ANSWER_PREFIX}{_dead_pid()}-b").write_bytes(b"")
    assert remove_stale_answers(str(tmp_path)) == 2
    assert remove_stale_answers(str(tmp_path)) == 0 and not list(tmp_path.iterdir())
