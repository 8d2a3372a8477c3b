"""History queries answered in processes of their own: they do not wait for the GIL.

Why: a day's track (86,400 positions) costs about 10 ms of CPU to read, decode and encode
(2 MB of msgpack), most of it holding the GIL. In a worker thread of the tracker's
process it competes for the GIL with the event loop, which under full ingest load is busy
most of the time, so the 10 ms took 30-70 ms (docs/performance.md).

How: :data:`READER_PROCESSES` processes (``python -m tracker.history.reader``), each of
which opens the store once and then answers one query at a time over a Unix socket pair
that the event loop reads itself: no executor, so no feeder or manager thread of ours
waits for the GIL on the way (the conversation is in ``tracker.history.reader``). A
query is a picklable callable of the store (a module-level function bound with
:func:`functools.partial`, see ``tracker.history.routes``) that returns the bytes to
send; the reader leaves them in an unnamed file in memory and passes its descriptor, the
loop reads them with one system call. SQLite in WAL mode lets readers in other processes
read while the writer commits; a PostgreSQL store is a server anyway. Readers see what
is committed, as threads do.

The processes start when :meth:`ReaderPool.want` is first called (``History.answer``
does, once a query answered in a thread took longer than :data:`READERS_AFTER_S`: a busy
loop or large pages; a tracker asked for small pages now and then never pays for
processes); until one has started (a second or two), queries are answered in threads as
before. Callers wait for an idle reader (the history's query limiter and deadline bound
how many wait, and how long). A query whose caller gives up (its deadline, a client gone)
finishes in its reader, whose answer is then read and dropped before the reader takes
another. A reader that dies is replaced; the query it was answering gets 503.

Tasks: :meth:`ReaderPool.run` (in ``History.run``'s nursery) holds one task per reader
(:meth:`ReaderPool._keep`: start it, wait for it to end, start another) and the tasks
dropping abandoned answers; cancelled, it kills the processes without waiting for their
queries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import sys
from collections.abc import Callable
from typing import Final

import trio

from tracker.errors import ServiceBusy
from tracker.history.reader import ANSWER, ERROR, HEADER, READY, SCRATCH, request
from tracker.history.store import HistoryStore

__all__ = [
    "READERS_AFTER_S",
    "READER_PROCESSES",
    "SCRATCH",
    "ReaderBroken",
    "ReaderPool",
]

logger = logging.getLogger(__name__)

READER_PROCESSES: Final = 2
"""Processes answering queries at once (more wait for one, within their deadline). Each
holds an interpreter with the store's libraries: about 60 MB."""

RETRY_START_S: Final = 30.0
"""Pause before starting a reader process again after one failed to start."""
START_TIMEOUT_S: Final = 60.0
"""A reader process that has not opened the store within this failed to start (it is
killed, and tried again after :data:`RETRY_START_S`)."""
REPLY_TIMEOUT_S: Final = 5.0
"""Most a request takes to be written, or a reply to be read once it began to arrive
(both are a few bytes to a few KB); beyond, the reader is taken for broken and killed."""
ABANDONED_ANSWER_S: Final = 30.0
"""Most a reader may take to answer a query its caller left (past the caller's own
deadline, 10 s); beyond, it is taken for stuck and killed, and another started: a stuck
reader would otherwise be out of service for good."""
READERS_AFTER_S: Final = 0.05
"""A query answered in a thread slower than this starts the reader processes."""


class ReaderBroken(Exception):
    """A reader process ended, or said something that is not a reply."""


class _Reader:
    """One reader process and the tracker's end of its socket (non-blocking)."""

    def __init__(self, process: trio.Process, channel: socket.socket) -> None:
        self.process = process
        self.channel = channel
        self.broken = False

    async def send(self, payload: object) -> None:
        """``payload`` as a request, written whole even if the caller is cancelled meanwhile
        (half a request would garble the conversation): an idle reader reads at once."""
        data = memoryview(request(payload))
        with trio.CancelScope(shield=True, deadline=trio.current_time() + REPLY_TIMEOUT_S):
            while data:
                try:
                    data = data[self.channel.send(data) :]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.channel)
                except OSError as exc:
                    raise ReaderBroken(f"writing to the history reader failed: {exc!r}") from exc
            return
        raise ReaderBroken("the history reader did not read its request")

    async def reply(self) -> tuple[bytes, bytes]:
        """The next reply: waiting for it to begin can be cancelled (nothing is read yet)."""
        await trio.lowlevel.wait_readable(self.channel)
        return await self.read_reply()

    async def read_reply(self) -> tuple[bytes, bytes]:
        """The reply that began to arrive, read whole even if the caller is cancelled
        meanwhile: its kind and content (an answer's bytes, read from the file whose
        descriptor came with it; an error's pickle; nothing for ready)."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + REPLY_TIMEOUT_S):
            kind, size, answer = await self._header()
            if answer is not None:
                return kind, _read_file(answer, size)
            return kind, await self._read(size)
        raise ReaderBroken("the history reader's reply was cut short")

    async def _header(self) -> tuple[bytes, int, int | None]:
        """Kind, length and, for an answer, the descriptor of its file (which comes with
        the header's first byte: read with ``recvmsg``, never plain ``recv``)."""
        while True:
            try:
                data, descriptors, flags, _ = socket.recv_fds(self.channel, HEADER.size, 1)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.channel)
            except OSError as exc:
                raise ReaderBroken(f"reading from the history reader failed: {exc!r}") from exc
        file = descriptors[0] if descriptors else None
        for extra in descriptors[1:]:
            os.close(extra)
        try:
            if not data:
                raise ReaderBroken("the history reader ended")
            kind, size = HEADER.unpack(data + await self._read(HEADER.size - len(data)))
            if flags & socket.MSG_CTRUNC or (kind == ANSWER) != (file is not None):
                raise ReaderBroken(f"the history reader sent a {kind!r} reply without its file")
            if kind not in (ANSWER, ERROR, READY):
                raise ReaderBroken(f"the history reader sent a reply of kind {kind!r}")
        except BaseException:
            if file is not None:
                os.close(file)
            raise
        return kind, size, file

    async def _read(self, size: int) -> bytes:
        """Exactly ``size`` bytes from the socket."""
        data = bytearray()
        while len(data) < size:
            try:
                more = self.channel.recv(size - len(data))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.channel)
                continue
            except OSError as exc:
                raise ReaderBroken(f"reading from the history reader failed: {exc!r}") from exc
            if not more:
                raise ReaderBroken("the history reader ended")
            data += more
        return bytes(data)

    def kill(self) -> None:
        """Take this reader out of service: its task (:meth:`ReaderPool._keep`) sees the
        process end, closes the socket and starts another."""
        self.broken = True
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    async def close(self) -> None:
        """Kill the process, reap it and close the socket (never blocks for long)."""
        self.kill()
        with trio.CancelScope(shield=True):
            await self.process.wait()
        trio.lowlevel.notify_closing(self.channel)
        self.channel.close()


def _read_file(descriptor: int, size: int) -> bytes:
    """The ``size`` bytes of an answer's file (one ``pread`` in practice); closes it."""
    try:
        parts = []
        offset = 0
        while offset < size:
            part = os.pread(descriptor, size - offset, offset)
            if not part:
                raise ReaderBroken(f"an answer of {size} bytes ended at {offset}")
            parts.append(part)
            offset += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        os.close(descriptor)


def _error(pickled: bytes) -> Exception:
    """The exception a reader sent (a RuntimeError if it does not unpickle here)."""
    try:
        error = pickle.loads(pickled)
    except Exception as exc:
        return RuntimeError(f"a history reader failed, and its error did not unpickle: {exc!r}")
    if isinstance(error, Exception):
        return error
    return RuntimeError(f"a history reader sent {type(error).__name__}, not an exception")


class ReaderPool:
    """Reader processes over the store ``target`` (see the module docstring)."""

    def __init__(self, target: str, processes: int = READER_PROCESSES) -> None:
        self._target = target
        self._processes = processes
        self._wanted = trio.Event()
        self._live = 0
        self._idle: list[_Reader] = []
        self._returned = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None

    @property
    def ready(self) -> bool:
        """Whether queries can go to the processes (at least one has started)."""
        return self._live > 0

    def want(self) -> None:
        """Have :meth:`run` start the processes (if they are not running or starting)."""
        self._wanted.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the processes once wanted, replace any that ends, and kill them when
        cancelled."""
        task_status.started()
        await self._wanted.wait()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for number in range(self._processes):
                    nursery.start_soon(self._keep, name=f"history reader {number}")
        finally:
            self._nursery = None

    async def _keep(self) -> None:
        """One reader, always: started, given out while it lives, replaced when it ends.
        A reader that cannot start (the store does not open in it, or not within
        :data:`START_TIMEOUT_S`) is logged and tried again after :data:`RETRY_START_S`;
        queries go to threads meanwhile if no other reader runs."""
        while True:
            try:
                reader = await self._start()
            except Exception as exc:
                logger.error("a history reader process did not start: %r", exc)
                await trio.sleep(RETRY_START_S)
                continue
            self._live += 1
            try:
                self._give(reader)
                status = await reader.process.wait()
            finally:
                self._live -= 1
                with contextlib.suppress(ValueError):
                    self._idle.remove(reader)
                await reader.close()
            logger.error("a history reader process ended (status %s); starting another", status)

    async def _start(self) -> _Reader:
        """A reader process that has opened the store (the first request names it)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tracker.history.reader", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader = _Reader(process, ours)
        try:
            with trio.fail_after(START_TIMEOUT_S):
                await reader.send(self._target)
                kind, content = await reader.reply()
            if kind == ERROR:
                raise _error(content)
            if kind != READY:
                raise ReaderBroken(f"the history reader replied {kind!r} to its start")
        except BaseException:
            await reader.close()
            raise
        return reader

    async def call(self, query: Callable[[HistoryStore], bytes]) -> bytes:
        """``query(store)`` in a reader process (only when :attr:`ready`); 503 if its
        reader ended meanwhile (another is started).

        Cancelled while its reader works, the answer is dropped when it comes (by a task
        of :meth:`run`) and only then is the reader given another query.
        """
        reader: _Reader | None = await self._take()
        assert reader is not None
        try:
            await reader.send(query)
            try:
                await trio.lowlevel.wait_readable(reader.channel)
            except trio.Cancelled:
                self._drop_answer(reader)
                reader = None
                raise
            kind, content = await reader.read_reply()
            if kind == READY:
                raise ReaderBroken("the history reader answered a query with ready")
        except (ReaderBroken, trio.ClosedResourceError) as broken:
            if reader is not None:
                reader.kill()
                reader = None
            logger.error("a history reader stopped answering: %s", broken)
            raise ServiceBusy("a history reader stopped; retry", retry_after_s=1) from broken
        finally:
            if reader is not None:
                self._give(reader)
        if kind == ERROR:
            raise _error(content)
        return content

    async def _take(self) -> _Reader:
        """An idle reader, waiting for one."""
        while True:
            while not self._idle:
                await self._returned.park()
            reader = self._idle.pop()
            if not reader.broken:
                return reader

    def _give(self, reader: _Reader) -> None:
        """``reader`` is idle again (unless it was taken out of service)."""
        if not reader.broken:
            self._idle.append(reader)
            self._returned.unpark()

    def _drop_answer(self, reader: _Reader) -> None:
        """Read and drop the answer of a query whose caller left, then give the reader out
        again (in a task of :meth:`run`; when it is stopping, the reader is killed)."""
        if self._nursery is None:
            reader.kill()
            return
        try:
            self._nursery.start_soon(self._drop, reader, name="history reader answer dropped")
        except RuntimeError:  # the nursery is closing
            reader.kill()

    async def _drop(self, reader: _Reader) -> None:
        with trio.move_on_after(ABANDONED_ANSWER_S):
            try:
                await reader.reply()
            except (ReaderBroken, trio.ClosedResourceError):
                reader.kill()
                return
            self._give(reader)
            return
        logger.error(
            "a history reader did not answer a query its caller left within %g s; "
            "killed, starting another",
            ABANDONED_ANSWER_S,
        )
        reader.kill()
