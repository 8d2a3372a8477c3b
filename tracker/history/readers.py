"""History queries answered in processes of their own: they do not wait for the GIL.

Why: a day's track (86,400 positions) costs about 15 ms of CPU to read, decode and encode
(2 MB of msgpack), most of it holding the GIL. In a worker thread of the tracker's
process it competes for the GIL with the event loop, which under full ingest load is busy
most of the time: Python hands the GIL over every 5 ms (``sys.getswitchinterval``), so
the thread gets about half of it and the 15 ms took 30-70 ms (docs/performance.md).

How: a :class:`concurrent.futures.ProcessPoolExecutor` (``spawn``) of
:data:`READER_PROCESSES` processes, each of which opens the store once
(:func:`_open_reader`). A query is a picklable callable of the store (a module-level
function bound with :func:`functools.partial`, see ``tracker.history.routes``) that
returns the bytes to send: the process runs it and leaves the bytes in a file in
:data:`SCRATCH`, the executor's thread reads them at once, and the event loop is woken
by the future's done callback (no thread of ours waits).
SQLite in WAL mode lets readers in other processes read while the writer commits; a
PostgreSQL store is a server anyway. Readers see what is committed, as threads do.

The pool starts when :meth:`ReaderPool.want` is first called (``History.answer`` does,
once a query answered in a thread took longer than :data:`READERS_AFTER_S`: a busy loop
or large pages; a tracker asked for small pages now and then never pays for processes);
until they have started (a second or two), queries are answered in threads as before. A
pool that broke (a reader killed) answers 503 and is replaced.

Tasks: :meth:`ReaderPool.run` (in ``History.run``'s nursery) starts the processes when
first wanted, replaces them when they break, and stops them (without waiting for their
queries) when cancelled.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import logging
import multiprocessing
import os
import signal
import tempfile
from collections.abc import Callable
from typing import Final

import trio

from tracker.errors import ServiceBusy
from tracker.history.store import HistoryStore, open_store

__all__ = [
    "ANSWER_PREFIX",
    "READERS_AFTER_S",
    "READER_PROCESSES",
    "SCRATCH",
    "ReaderPool",
    "remove_stale_answers",
    "stop_pool",
]

logger = logging.getLogger(__name__)

READER_PROCESSES: Final = 2
"""Processes answering queries at once (more wait in the pool's queue, within their
deadline). Each holds an interpreter with the store's libraries: about 60 MB."""

SCRATCH: Final = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
"""Where readers leave their answers for the tracker to read (memory, where it can)."""

RETRY_START_S: Final = 30.0
"""Pause before starting reader processes again after they failed to start."""
START_TIMEOUT_S: Final = 60.0
"""Reader processes that have not opened the store within this failed to start (they
are stopped, and tried again after :data:`RETRY_START_S`)."""
ANSWER_PREFIX: Final = "tracker-answer-"
"""Answer files are named ``tracker-answer-<tracker pid>-<random>``: a tracker that
starts its readers removes those of trackers no longer running (killed with an answer
in flight), and never another running tracker's."""
READERS_AFTER_S: Final = 0.05
"""A query answered in a thread slower than this starts the reader processes."""

_store: HistoryStore | None = None
"""In a reader process: its store, opened once by :func:`_open_reader`."""


def _open_reader(target: str) -> None:
    """Initializer of a reader process: open the store (reading its layout).

    Ctrl-C in a terminal interrupts the whole process group: a reader ignores it, so
    that it does not print a KeyboardInterrupt traceback; the tracker stops its readers
    itself (:meth:`ReaderPool.close`).
    """
    global _store
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    importlib.import_module("tracker.history.pages")  # what queries call: before the first
    store = open_store(target)
    store.migrate()  # reads the file's resolution and layout; a no-op on a current file
    _store = store


def _answer(query: Callable[[HistoryStore], bytes], scratch: str) -> str:
    """In a reader process: ``query`` on its store, written to a new file in ``scratch``
    (whose path it returns)."""
    assert _store is not None
    answer = query(_store)
    prefix = f"{ANSWER_PREFIX}{os.getppid()}-"  # the tracker's pid
    descriptor, path = tempfile.mkstemp(prefix=prefix, dir=scratch)
    with os.fdopen(descriptor, "wb") as file:
        file.write(answer)
    return path


def _take(path: str) -> bytes:
    """The answer a reader left in ``path``, read at once; the file is removed."""
    try:
        with open(path, "rb") as file:
            return file.read()
    finally:
        os.unlink(path)


def _started() -> bool:
    return _store is not None


class ReaderPool:
    """Reader processes over the store ``target`` (see the module docstring)."""

    def __init__(self, target: str, processes: int = READER_PROCESSES) -> None:
        self._target = target
        self._processes = processes
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._wanted = trio.Event()
        self._broken = trio.Event()

    @property
    def ready(self) -> bool:
        """Whether queries can go to the processes (started, not broken)."""
        return self._executor is not None

    def want(self) -> None:
        """Have :meth:`run` start the processes (if they are not running or starting)."""
        self._wanted.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the processes once wanted, start new ones when they break, and stop them
        when cancelled. Started in a worker thread: spawning interpreters would take the
        loop's time (0.8 s measured on a busy machine). Processes that cannot start (the
        store does not open in them) are logged and tried again after
        :data:`RETRY_START_S`; queries are answered in threads meanwhile."""
        task_status.started()
        try:
            await self._wanted.wait()
            while True:
                try:
                    self._executor = await trio.to_thread.run_sync(
                        self._start, abandon_on_cancel=True
                    )
                except Exception as exc:
                    logger.error("history reader processes did not start: %r", exc)
                    await trio.sleep(RETRY_START_S)
                    continue
                await self._broken.wait()
                self._broken = trio.Event()
        finally:
            self.close()

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        """A new pool, once every process has opened the store (in a worker thread).
        First, answer files that stopped trackers left behind are removed."""
        remove_stale_answers(SCRATCH)
        executor = concurrent.futures.ProcessPoolExecutor(
            self._processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_open_reader,
            initargs=(self._target,),
        )
        try:
            for started in [executor.submit(_started) for _ in range(self._processes)]:
                started.result(timeout=START_TIMEOUT_S)
        except BaseException:
            stop_pool(executor)
            raise
        return executor

    async def call(self, query: Callable[[HistoryStore], bytes]) -> bytes:
        """``query(store)`` in a reader process (only when :attr:`ready`); 503 if the
        pool broke (it is replaced).

        The answer comes back as a file in :data:`SCRATCH` (memory on Linux), read with
        one system call in the executor's thread: through the executor's pipe, 2 MB
        took 32 reads of 64 KiB, each waiting to take the GIL back from a busy event
        loop (up to 5 ms each). Cancelled, the query is withdrawn if it has not started;
        one under way finishes in its process and its answer is dropped.
        """
        executor = self._executor
        assert executor is not None, "call only when ready"
        try:
            future = executor.submit(_answer, query, SCRATCH)
        except concurrent.futures.BrokenExecutor as broken:
            self._broke(executor, broken)
            raise ServiceBusy("history readers restarting", retry_after_s=1) from broken
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()
        answer: list[bytes] = []
        failed: list[BaseException] = []

        def finished(future: concurrent.futures.Future[str]) -> None:
            """In the executor's thread: take the answer's file (whoever waits or not)."""
            try:
                if not future.cancelled():
                    answer.append(_take(future.result()))
            except BaseException as error:  # handed to the waiting task
                failed.append(error)
            _soon(token, done.set)

        future.add_done_callback(finished)
        try:
            await done.wait()
        finally:
            future.cancel()
        if failed:
            if isinstance(failed[0], concurrent.futures.BrokenExecutor):
                self._broke(executor, failed[0])
                raise ServiceBusy("a history reader stopped; retry", retry_after_s=1)
            raise failed[0]
        return answer[0]

    def _broke(self, executor: concurrent.futures.ProcessPoolExecutor, error: Exception) -> None:
        """Drop a broken pool: :meth:`run` starts new processes (threads meanwhile)."""
        if self._executor is executor:
            logger.error("history reader processes broke (%s); starting new ones", error)
            self._executor = None
            self._broken.set()
            stop_pool(executor)

    def close(self) -> None:
        """Stop the processes without waiting for queries under way (never blocks)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            stop_pool(executor)


def remove_stale_answers(scratch: str) -> int:
    """Remove the answer files in ``scratch`` of trackers that are no longer running (a
    tracker killed with ``kill -9`` while an answer was in flight leaves its file);
    returns how many. Files of running trackers, this one included, are left alone."""
    removed = 0
    with os.scandir(scratch) as entries:
        for entry in entries:
            owner = _answer_owner(entry.name)
            if owner is None or _running(owner):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    if removed:
        logger.info("removed %d answer files left by stopped trackers in %s", removed, scratch)
    return removed


def _answer_owner(name: str) -> int | None:
    """The tracker pid in an answer file's name (None for any other file)."""
    if not name.startswith(ANSWER_PREFIX):
        return None
    pid, _, rest = name[len(ANSWER_PREFIX) :].partition("-")
    return int(pid) if pid.isdigit() and rest and int(pid) > 0 else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stop_pool(executor: concurrent.futures.ProcessPoolExecutor) -> None:
    """Stop a pool's processes at once: a query under way would keep one busy a while."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.kill()


def _soon(token: trio.lowlevel.TrioToken, call: Callable[..., object], *args: object) -> None:
    """``call(*args)`` on the event loop, from the executor's thread; nothing if the loop
    has ended (a future finishing after the tracker stopped)."""
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(call, *args)
