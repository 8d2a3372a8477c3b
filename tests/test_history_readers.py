"""tracker.history.readers: queries answered in reader processes over the same SQLite file.

Real processes and a real file; each test waits for its readers to start. A reader is
held still with SIGSTOP where a test needs a query in flight.
"""

from __future__ import annotations

import functools
import operator
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio

from tracker.errors import ServiceBusy
from tracker.history import reader, readers
from tracker.history.cursor import bind_query
from tracker.history.pages import PageQuery, track_page
from tracker.history.readers import ReaderPool
from tracker.history.sqlite import SqliteStore
from tracker.pings import Ping

T0 = 1_700_000_000.0
BERLIN = (52.52, 13.405)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    file = tmp_path / "h.sqlite3"
    _append(file, [T0 + i for i in range(600)])
    return file


def _append(file: Path, times: list[float]) -> None:
    store = SqliteStore(file)
    store.migrate()
    lat, lon = BERLIN
    store.append(
        [Ping(vehicle_id="van", lat=lat + i * 1e-5, lon=lon, ts=ts) for i, ts in enumerate(times)]
    )
    store.close()


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


def _in_thread(path: Path, fmt: str = "msgpack") -> bytes:
    store = SqliteStore(path)
    store.migrate()
    try:
        return _page(fmt)(store)
    finally:
        store.close()


async def _started(pool: ReaderPool, processes: int = 1, other_than: int = 0) -> list[int]:
    """The pids of the pool's idle readers, once ``processes`` of them (none ``other_than``
    that pid: a reader killed, whose task may not have seen it end yet) wait for queries."""
    pool.want()
    with trio.fail_after(60):  # starting interpreters on a busy machine
        while True:
            pids = [reader.process.pid for reader in pool._idle]
            if len(pids) >= processes and other_than not in pids:
                return pids
            await trio.sleep(0.05)


@asynccontextmanager
async def _running(path: Path, processes: int = 1) -> AsyncIterator[ReaderPool]:
    pool = ReaderPool(str(path), processes=processes)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        yield pool
        nursery.cancel_scope.cancel()


@contextmanager
def _stopped(pid: int) -> Iterator[None]:
    """Reader ``pid`` held still (it reads no request) until the block ends."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def _kill_after(pid: int, seconds: float) -> None:
    await trio.sleep(seconds)
    os.kill(pid, signal.SIGKILL)


async def _ended(pid: int, within_s: float = 10.0) -> bool:
    """Whether process ``pid`` ended (gone, or a zombie) within ``within_s``."""
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


async def test_a_reader_process_answers_what_a_thread_answers(path: Path) -> None:
    async with _running(path, processes=2) as pool:
        await trio.sleep(0.1)
        assert not pool.ready  # not started until wanted
        pids = await _started(pool, processes=2)
        assert pool.ready and len(set(pids)) == 2
        expected = _in_thread(path)
        assert await pool.call(_page()) == expected
        _append(path, [T0 + 700])  # the writer commits more: readers see it
        assert len(await pool.call(_page())) > len(expected)
        async with trio.open_nursery() as nursery:  # both readers at once, and a third waits
            for fmt in ("json", "geojson", "msgpack"):
                nursery.start_soon(pool.call, _page(fmt))
    assert not pool.ready  # stopped with its task
    for pid in pids:
        assert await _ended(pid)


async def test_a_query_that_raises_raises_in_the_tracker_and_the_reader_goes_on(
    path: Path,
) -> None:
    async with _running(path) as pool:
        (pid,) = await _started(pool)
        with pytest.raises(AttributeError, match="no_such_method"):
            await pool.call(operator.methodcaller("no_such_method"))
        with pytest.raises(TypeError, match="answers bytes, not int"):
            await pool.call(operator.attrgetter("resolution"))
        assert await pool.call(_page()) == _in_thread(path)
        assert [reader.process.pid for reader in pool._idle] == [pid]


async def test_a_reader_killed_during_a_query_answers_503_and_is_replaced(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with _running(path) as pool:
        (pid,) = await _started(pool)
        os.kill(pid, signal.SIGSTOP)  # the request stays in its socket, unread
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_kill_after, pid, 0.2)
            with pytest.raises(ServiceBusy, match="stopped"), trio.fail_after(10):
                await pool.call(_page())
        assert "history reader stopped answering" in caplog.text
        (replacement,) = await _started(pool, other_than=pid)
        assert await pool.call(_page("json")) == _in_thread(path, "json")
        os.kill(replacement, signal.SIGKILL)  # killed while idle: replaced before any query
        await _started(pool, other_than=replacement)
        assert await pool.call(_page()) == _in_thread(path)


async def test_an_abandoned_query_is_dropped_before_the_reader_answers_another(
    path: Path,
) -> None:
    async with _running(path) as pool:
        (pid,) = await _started(pool)
        with _stopped(pid), trio.move_on_after(0.3) as gave_up:
            await pool.call(_page("json"))  # the deadline (or a client gone) cancels it
        assert gave_up.cancelled_caught
        # The reader answers the abandoned query first: that answer is not the next one's.
        assert await pool.call(_page("msgpack")) == _in_thread(path, "msgpack")
        assert await pool.call(_page("geojson")) == _in_thread(path, "geojson")
        assert [reader.process.pid for reader in pool._idle] == [pid]


async def test_a_reader_stuck_on_an_abandoned_query_is_killed_and_replaced(
    path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(readers, "ABANDONED_ANSWER_S", 0.5)
    async with _running(path) as pool:
        (pid,) = await _started(pool)
        os.kill(pid, signal.SIGSTOP)  # never answers (killed below, never continued)
        with trio.move_on_after(0.3) as gave_up:
            await pool.call(_page("json"))
        assert gave_up.cancelled_caught
        assert await _ended(pid)
        assert "did not answer a query its caller left" in caplog.text
        await _started(pool, other_than=pid)
        assert await pool.call(_page()) == _in_thread(path)


async def test_a_reader_ends_by_itself_when_the_tracker_end_of_its_socket_closes(
    path: Path,
) -> None:
    """A tracker killed with ``kill -9`` cannot stop its readers: they see their socket end."""
    async with _running(path) as pool:
        (pid,) = await _started(pool)
        (reader,) = pool._idle
        reader.broken = True  # not given out; its task stays on process.wait()
        reader.channel.shutdown(socket.SHUT_RDWR)
        assert await _ended(pid)


async def test_a_store_that_does_not_open_leaves_queries_to_threads_and_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "RETRY_START_S", 0.2)
    (tmp_path / "notes.txt").write_text("not a database, " * 1000)
    async with _running(tmp_path / "notes.txt") as pool:
        pool.want()
        with trio.fail_after(60):
            while caplog.text.count("did not start") < 2:
                await trio.sleep(0.05)
        assert "not a database" in caplog.text
        assert not pool.ready


def test_an_answer_travels_in_a_file_without_a_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is left in the scratch directory whoever is killed: the answer's file has
    no name, and its descriptor rides on the reply's header."""
    monkeypatch.setattr(reader, "SCRATCH", str(tmp_path))
    ours, theirs = socket.socketpair()
    with ours, theirs:
        answer = os.urandom(300_000)  # more than a socket holds at once
        reader._send_answer(theirs, answer)
        assert not list(tmp_path.iterdir())
        header, (descriptor,), _, _ = socket.recv_fds(ours, reader.HEADER.size, 1)
        assert reader.HEADER.unpack(header) == (reader.ANSWER, len(answer))
        try:
            assert os.pread(descriptor, len(answer) + 1, 0) == answer
        finally:
            os.close(descriptor)
