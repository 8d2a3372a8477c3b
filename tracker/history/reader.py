"""A history reader process: answers the tracker's queries over one socket, one at a time.

Started by :class:`tracker.history.readers.ReaderPool` as ``python -m
tracker.history.reader FD``, with ``FD`` its end of a Unix socket pair. Why a socket of
its own and not ``concurrent.futures``: the executor hands every call and answer through
a feeder and a manager thread in the tracker, each of which waits for the GIL behind the
busy event loop (measured: a hop of 29 ms p50 / 67 ms p99 for 10 ms of work); the event
loop reads this socket itself.

The conversation (all integers big-endian; nothing on it is secret beyond the store's
target, which is why the target is not on the command line, where ``ps`` shows it):

* tracker -> reader: a request is a :data:`LENGTH` (4 bytes) and that many bytes of
  pickle. The first is the store's target (``str``); every later one a query, a callable
  of the store returning ``bytes`` (``tracker.history.pages``).
* reader -> tracker: a reply is a :data:`HEADER` (a kind byte and an 8-byte length):
  :data:`READY` (the store opened: length 0), :data:`ANSWER` (the answer's length; the
  answer itself is in an unnamed file in :data:`SCRATCH`, whose descriptor rides on the
  header as ``SCM_RIGHTS``), or :data:`ERROR` (that many bytes of a pickled exception
  follow: what the query, or opening the store, raised).

The answer goes through a file and not the socket because a socket carries about 200 KiB
at a time: 2 MB would take ten turns of the tracker's busy loop, a file one read. The file
has no name (``O_TMPFILE``, in memory where ``/dev/shm`` is), so nothing is left behind
whoever is killed: the kernel frees it with its last descriptor.

Its store keeps the chunks it decoded, by content, within
:data:`~tracker.history.decoded.READER_BYTES` (``tracker.history.decoded``): queries
come back to the same sealed hours.

The process ends when the tracker's end of the socket closes (the tracker stopped or was
killed) and ignores Ctrl-C (a terminal interrupts the whole process group; the tracker
stops its readers itself).
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import socket
import struct
import sys
import tempfile
from typing import BinaryIO, Final

from tracker.history.decoded import READER_BYTES, DecodedChunks
from tracker.history.store import HistoryStore, open_store

__all__ = [
    "ANSWER",
    "ERROR",
    "HEADER",
    "LENGTH",
    "READY",
    "SCRATCH",
    "main",
    "request",
]

SCRATCH: Final = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
"""Where answers are written (memory, where it can): files without a name."""

LENGTH: Final = struct.Struct("!I")
HEADER: Final = struct.Struct("!cQ")
READY: Final = b"R"
ANSWER: Final = b"A"
ERROR: Final = b"E"


def request(payload: object) -> bytes:
    """``payload`` framed as a request (what the tracker sends)."""
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    return LENGTH.pack(len(data)) + data


def main() -> None:
    """Open the store the first request names, then answer queries until the socket ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = socket.socket(fileno=int(sys.argv[1]))
    requests = channel.makefile("rb")
    target = _receive(requests)
    if not isinstance(target, str):
        return
    try:
        importlib.import_module("tracker.history.pages")  # what queries call: before the first
        store = open_store(target)
        store.migrate()  # reads the file's resolution and layout; a no-op on a current file
        store.decoded = DecodedChunks(READER_BYTES)
    except Exception as exc:
        _send_error(channel, exc)
        return
    channel.sendall(HEADER.pack(READY, 0))
    while (query := _receive(requests)) is not None:
        try:
            answer = _call(query, store)
        except Exception as exc:
            _send_error(channel, exc)
        else:
            _send_answer(channel, answer)


def _receive(requests: BinaryIO) -> object | None:
    """The next request's payload; None once the tracker's end is closed."""
    length = requests.read(LENGTH.size)
    if len(length) < LENGTH.size:
        return None
    (size,) = LENGTH.unpack(length)
    data = requests.read(size)
    return pickle.loads(data) if len(data) == size else None


def _call(query: object, store: HistoryStore) -> bytes:
    if not callable(query):
        raise TypeError(f"a history query is a callable, not {type(query).__name__}")
    answer = query(store)
    if not isinstance(answer, bytes):
        raise TypeError(f"a history query answers bytes, not {type(answer).__name__}")
    return answer


def _send_answer(channel: socket.socket, answer: bytes) -> None:
    """``answer`` written to an unnamed file whose descriptor goes with the header."""
    with tempfile.TemporaryFile(dir=SCRATCH, buffering=0) as file:
        view = memoryview(answer)
        while view:
            view = view[os.write(file.fileno(), view) :]
        socket.send_fds(channel, [HEADER.pack(ANSWER, len(answer))], [file.fileno()])


def _send_error(channel: socket.socket, error: Exception) -> None:
    """``error`` pickled for the tracker to raise (as a RuntimeError naming it if it does
    not pickle)."""
    try:
        data = pickle.dumps(error)
    except Exception:
        data = pickle.dumps(RuntimeError(f"history reader: {error!r}"))
    channel.sendall(HEADER.pack(ERROR, len(data)) + data)


if __name__ == "__main__":
    main()
