"""A lean SSE load client: thousands of feeds over raw sockets on one ``epoll``, every byte read.

    python -m bench.loadclient --url http://127.0.0.1:8000 --seconds 20 < queries.txt

Reads one feed query per line from stdin (``bbox=...``, ``token=...``), opens one HTTP/1.1
connection per query and serves them all from one plain non-blocking loop on
``select.epoll`` (no Trio, no HTTP library: at 10,000 feeds and 10 ticks a second the
per-read cost of an async framework was what the client could not afford). Every read
goes into one reusable buffer; every byte of every connection is read and counted,
de-chunked and split into SSE events. For every position received in the measured window
it takes the latency from the ping's timestamp to the moment its event was read (0.1 s
resolution: the wire's age step) into a fixed histogram. Prints one JSON object with its
counts and its own CPU time, so that the harness can show the client was not the
bottleneck.

Decoding each distinct frame once (``--verify-every K``): the tracker sends the same
frame, byte for byte, to every feed of a cell, so only every K-th feed decodes every frame
itself (:func:`record_event`); the others look each ``data:`` line up in a
:class:`FrameCache`, which decodes a line it has not seen and otherwise only counts it
(``CachedFrame.hits``: how many were read in each millisecond, turned into latencies in
bulk by :meth:`FrameCache.flush`). ``--bytes-only`` goes further for memory runs: those
feeds only count bytes and events, reading every byte all the same.

As a library: ``LoadClient(url, queries, warmup, seconds).run()`` (synchronous) returns
a :class:`ClientStats`.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import select
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import msgspec
import numpy as np

from tracker.pings import Ping
from tracker.wire import MOVE_DTYPE, RECORD_DTYPE, decode_frame

_ping_json = msgspec.json.Decoder(Ping)

OPENING_AT_ONCE = 200
"""Feeds being opened at once (connect, request, response head) per client process."""
HISTOGRAM_MS = 30_000
"""Latency histogram: one bin per millisecond up to 30 s; later ones land in the last bin."""
READ_BUFFER = 1 << 18
"""Bytes one read takes at most (a feed that fell behind is drained in several reads)."""
OPEN_TIMEOUT_S = 30.0
"""A feed not answering its request within this long is counted as an error."""


@dataclass
class ClientStats:
    """What all feeds of this client received in the measured window."""

    feeds: int = 0
    connected: int = 0
    bytes: int = 0
    events: int = 0
    frames: int = 0
    positions: int = 0
    snapshots_after_first: int = 0
    """Snapshots a feed received after its first: conflations (the client fell behind)."""
    verified_feeds: int = 0
    """Feeds that decoded every frame themselves (the rest used the frame cache)."""
    distinct_frames: int = 0
    """Frames decoded for the cache: each distinct frame once."""
    raw_bytes: int = 0
    """Every byte read in the window, HTTP framing included, on every feed."""
    ticks_seen: set[int] = field(default_factory=set)
    """Ticks whose batch a verified feed received in the window (any verified feed)."""
    errors: list[str] = field(default_factory=list)
    cpu_seconds: float = 0.0
    """This process's CPU time in the measured window (opening the feeds is not in it)."""
    latency_ms: np.ndarray = field(default_factory=lambda: np.zeros(HISTOGRAM_MS + 1, np.int64))


class Dechunker:
    """Turns an HTTP/1.1 chunked body, fed in arbitrary pieces, back into its bytes.

    The common case, one whole chunk per read, costs one ``find`` and one slice; a chunk
    split over reads (a large snapshot, a feed that fell behind) waits in a bytearray.
    """

    __slots__ = ("_buffer", "ended")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.ended = False
        """The last (empty) chunk arrived: the server ended the body."""

    @property
    def idle(self) -> bool:
        """No part of a chunk waits."""
        return not self._buffer and not self.ended

    def feed(self, data: bytes) -> bytes:
        """The body bytes completed by ``data``."""
        buffer: bytes | bytearray
        if self._buffer:
            self._buffer += data
            buffer = self._buffer
        else:
            buffer = data
        out = []
        position = 0
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                break
            size = int(buffer[position:line_end].split(b";")[0], 16)
            start = line_end + 2
            end = start + size
            if len(buffer) < end + 2:
                break
            if not size:
                self.ended = True
            out.append(buffer[start:end])
            position = end + 2
        if buffer is self._buffer:
            del self._buffer[:position]
        elif position < len(buffer):
            self._buffer += buffer[position:]
        if len(out) == 1:
            return bytes(out[0])
        return b"".join(out)


class CachedFrame:
    """One distinct frame, decoded once, and when it was read (counted in bulk)."""

    __slots__ = ("ages_ms", "counts", "positions", "reads", "snapshot_reads", "t_ms")

    def __init__(self, t_ms: int, ages: np.ndarray) -> None:
        self.t_ms = t_ms
        self.positions = len(ages)
        counts = np.bincount(ages)
        present = np.flatnonzero(counts)
        self.ages_ms = present * 100  # the wire's age step is 0.1 s
        self.counts = counts[present]
        self.reads: list[int] = []
        """The millisecond (Unix time) of each read of this frame in a batch."""
        self.snapshot_reads = 0
        """Reads in a snapshot (positions counted, no latency: they are not news)."""


class FrameCache:
    """Decoded frames by their ``data:`` line.

    Bounded: :meth:`flush` (every second while measuring) counts the reads and forgets the
    frames nobody read since the last flush (a frame belongs to one tick).
    """

    def __init__(self, stats: ClientStats) -> None:
        self.frames: dict[bytes, CachedFrame] = {}
        """By line: look a line up here first (a hit is the common case), then :meth:`get`."""
        self._stats = stats

    def get(self, line: bytes) -> CachedFrame:
        """The frame of a ``data: <base64>`` line, decoded if it was not seen before."""
        cached = self.frames.get(line)
        if cached is None:
            frame = decode_frame(base64.b64decode(line[6:]))
            ages = np.concatenate(
                (
                    np.frombuffer(frame.positions, RECORD_DTYPE)["age"],
                    np.frombuffer(frame.moves, MOVE_DTYPE)["age"],
                )
            ).astype(np.int64)
            cached = CachedFrame(frame.t_ms, ages)
            self.frames[line] = cached
            self._stats.distinct_frames += 1
        return cached

    def flush(self) -> None:
        """Count the reads recorded so far (frames, positions, latencies, with one
        ``bincount``) and forget the frames not read since the last flush."""
        stats = self._stats
        bins, weights, kept = [], [], {}
        for line, frame in self.frames.items():
            if not (frame.reads or frame.snapshot_reads):
                continue
            kept[line] = frame
            reads = frame.snapshot_reads + len(frame.reads)
            stats.frames += reads
            stats.positions += reads * frame.positions
            if frame.reads:
                read_ms, times = np.unique(np.array(frame.reads, np.int64), return_counts=True)
                bins.append((read_ms[:, None] - frame.t_ms + frame.ages_ms[None, :]).ravel())
                weights.append((times[:, None] * frame.counts[None, :]).ravel())
            frame.reads = []
            frame.snapshot_reads = 0
        self.frames = kept
        if bins:
            counts = np.bincount(
                np.clip(np.concatenate(bins), 0, HISTOGRAM_MS),
                np.concatenate(weights),
                minlength=HISTOGRAM_MS + 1,
            )
            stats.latency_ms += counts.astype(np.int64)


def record_cached_lines(lines: list[bytes], read_ms: int, cache: FrameCache) -> int:
    """Record the frames of the events whose lines these are, through the cache (counted
    at ``cache.flush()``): the load client's hot path. Returns the snapshots among them.

    Line by line, a frame's ``data:`` line looked up first (the common case); ``event:``
    lines say whether the frames that follow are news (a batch) or a snapshot.
    """
    frames, snapshots, in_snapshot = cache.frames, 0, False
    for line in lines:
        frame = frames.get(line)
        if frame is None:
            if line.startswith(b"data: ") and len(line) > 6:
                frame = cache.get(line)
            else:
                if line.startswith(b"event: "):
                    in_snapshot = line == b"event: snapshot"
                    snapshots += in_snapshot
                continue
        if in_snapshot:
            frame.snapshot_reads += 1
        else:
            frame.reads.append(read_ms)
    return snapshots


def record_cached_event(
    event: bytes, stats: ClientStats, received: float, measuring: bool, cache: FrameCache
) -> bool:
    """:func:`record_event` through the frame cache (counted at ``cache.flush()``); True if
    it was a snapshot."""
    is_snapshot = event.startswith(b"event: snapshot")
    if measuring and (is_snapshot or event.startswith(b"event: batch")):
        record_cached_lines(event.split(b"\n"), int(received * 1000), cache)
    return is_snapshot


def record_event(event: bytes, stats: ClientStats, received: float, measuring: bool) -> bool:
    """Decode one SSE event; True if it was a snapshot."""
    if event.startswith(b"event: ping"):  # the naive baseline: one JSON ping per event
        if measuring:
            ping = _ping_json.decode(event.split(b"data: ", 1)[1])
            stats.positions += 1
            stats.latency_ms[min(HISTOGRAM_MS, max(0, int((received - ping.ts) * 1000)))] += 1
        return False
    is_snapshot = event.startswith(b"event: snapshot")
    if not (is_snapshot or event.startswith(b"event: batch")):
        return False
    ages, t_ms = [], 0
    for line in event.split(b"\n"):
        if not line.startswith(b"data: ") or len(line) <= 6:
            continue
        frame = decode_frame(base64.b64decode(line[6:]))
        ages.append(np.frombuffer(frame.positions, RECORD_DTYPE)["age"])
        ages.append(np.frombuffer(frame.moves, MOVE_DTYPE)["age"])
        t_ms = frame.t_ms  # every frame of an event belongs to the same tick
    if measuring and ages:
        stats.frames += len(ages) // 2
        all_ages = np.concatenate(ages)
        stats.positions += len(all_ages)
        if not is_snapshot:  # a snapshot's positions are not news
            _count_latencies(stats, received - (t_ms / 1000 - all_ages * 0.1))
    return is_snapshot


def _count_latencies(stats: ClientStats, seconds: np.ndarray) -> None:
    """Histogram once per event: a bincount per frame cost more than decoding the frame."""
    bins = np.clip((seconds * 1000).astype(np.int64), 0, HISTOGRAM_MS)
    counts = np.bincount(bins)
    stats.latency_ms[: len(counts)] += counts


class _Feed:
    """One connection: opening (connect, request, head), then its body, read as it comes."""

    __slots__ = ("dechunker", "head", "mode", "opened_at", "pending", "query", "snapshots")

    VERIFIED, CACHED, BYTES = 0, 1, 2

    def __init__(self, query: str, mode: int, opened_at: float) -> None:
        self.query = query
        self.mode = mode
        self.opened_at = opened_at
        self.head: bytes | None = b""  # None once the response head is read
        self.snapshots = 0
        self.dechunker: Dechunker | None = None  # only once a chunk is split over reads
        self.pending = b""  # the unfinished end of the SSE stream

    def body(self, data: bytes) -> bytes:
        """The body bytes ``data`` completes: the common case (exactly one whole chunk)
        costs a ``find`` and a slice."""
        if self.dechunker is None and data.endswith(b"\r\n"):
            line_end = data.find(b"\r\n")
            try:
                size = int(data[:line_end], 16)
            except ValueError:
                size = -1
            if size > 0 and line_end + 4 + size == len(data):
                return data[line_end + 2 : -2]
        if self.dechunker is None:
            self.dechunker = Dechunker()
        return self.dechunker.feed(data)

    def complete(self, body: bytes) -> bytes:
        """The events ``body`` completes, as a run of whole events; the rest waits."""
        if self.pending:
            body = self.pending + body
        if body.endswith(b"\n\n"):
            self.pending = b""
            return body
        cut = body.rfind(b"\n\n") + 2
        self.pending = body[cut:] if cut > 1 else body
        return body[:cut] if cut > 1 else b""

    @property
    def ended(self) -> bool:
        """The server sent the last chunk."""
        return self.dechunker is not None and self.dechunker.ended

    @property
    def at_boundary(self) -> bool:
        """Nothing waits (no part of a chunk or of an event): the next read starts a chunk."""
        return not self.pending and (self.dechunker is None or self.dechunker.idle)


class LoadClient:
    """Every feed of this process on one ``epoll``; see the module docstring."""

    def __init__(
        self,
        url: str,
        queries: list[str],
        warmup: float,
        seconds: float,
        *,
        verify_every: int = 1,
        bytes_only: bool = False,
    ) -> None:
        parts = urlsplit(url)
        self._address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._queries = queries
        self._verify_every = max(1, verify_every)
        self._bytes_only = bytes_only
        self.stats = ClientStats(feeds=len(queries))
        self._cache = FrameCache(self.stats)
        self._epoll = select.epoll()
        self._feeds: dict[int, tuple[socket.socket, _Feed]] = {}
        self._opening = 0
        self._buffer = bytearray(READ_BUFFER)
        self._view = memoryview(self._buffer)
        start = time.monotonic()
        self._measure_from = start + warmup
        self._until = self._measure_from + seconds

    def run(self) -> ClientStats:
        """Open every feed (at most ``OPENING_AT_ONCE`` at a time) and read them all until
        the window ends: ``warmup + seconds``, counts over the last ``seconds``. Every
        ``verify_every``-th feed decodes each frame itself; the others use a shared
        :class:`FrameCache` (or, ``bytes_only``, count bytes and events only)."""
        queue = list(enumerate(self._queries))
        queue.reverse()
        poll, feeds, cached = self._epoll.poll, self._feeds, _Feed.CACHED
        buffer, view = self._buffer, self._view
        cpu_from: float | None = None
        flushed = self._measure_from
        try:
            while (now := time.monotonic()) < self._until:
                if now - flushed > 1.0:  # keeps the cache to the frames of the last second
                    self._cache.flush()
                    flushed = now
                while queue and self._opening < OPENING_AT_ONCE:
                    self._open(*queue.pop(), now)
                measuring = now >= self._measure_from
                if measuring and cpu_from is None:
                    cpu_from = time.process_time()
                for fd, mask in poll(min(0.05, self._until - now), 4096):
                    entry = feeds.get(fd)
                    if entry is None:
                        continue
                    sock, feed = entry
                    if feed.head is not None:
                        self._advance_opening(fd, sock, feed, mask)
                    elif not (measuring and feed.mode == cached and feed.at_boundary):
                        self._read(fd, sock, feed, measuring)
                    else:  # the hot path: a whole chunk of whole events, most of the time
                        try:
                            size = sock.recv_into(buffer)
                        except BlockingIOError:
                            continue
                        except OSError as exc:
                            self._fail(fd, sock, exc)
                            continue
                        data = view[:size].tobytes()
                        if not self._whole_chunk(feed, data, size):
                            self._received(fd, sock, feed, data, measuring)
                if queue or self._opening:
                    self._expire_openings(now)
        finally:
            if cpu_from is not None:
                self.stats.cpu_seconds = time.process_time() - cpu_from
            self._cache.flush()
            for sock, _ in self._feeds.values():
                sock.close()
            self._epoll.close()
        return self.stats

    # --- opening -------------------------------------------------------------------------

    def _open(self, number: int, query: str, now: float) -> None:
        verified = number % self._verify_every == 0
        self.stats.verified_feeds += verified
        mode = _Feed.VERIFIED if verified else _Feed.BYTES if self._bytes_only else _Feed.CACHED
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(self._address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.stats.errors.append(f"connect: {errno.errorcode.get(code, code)}")
            return
        self._feeds[sock.fileno()] = (sock, _Feed(query, mode, now))
        self._epoll.register(sock.fileno(), select.EPOLLOUT)
        self._opening += 1

    def _advance_opening(self, fd: int, sock: socket.socket, feed: _Feed, mask: int) -> None:
        """Connected: send the request; then read until the response head is complete."""
        try:
            if mask & select.EPOLLOUT:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, errno.errorcode.get(code, str(code)))
                host = self._address[0]
                request = f"GET /feed?{feed.query} HTTP/1.1\r\nHost: {host}\r\n"
                sock.send(f"{request}Accept: text/event-stream\r\n\r\n".encode())
                self._epoll.modify(fd, select.EPOLLIN)
                return
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed before the response head")
            assert feed.head is not None
            feed.head += data
            if b"\r\n\r\n" not in feed.head:
                return
            head, _, rest = feed.head.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))
        except (OSError, ConnectionError) as exc:
            self._fail(fd, sock, exc)
            return
        feed.head = None
        self._opening -= 1
        self.stats.connected += 1
        if rest:
            self._consume(sock, feed, rest, time.monotonic() >= self._measure_from)

    def _expire_openings(self, now: float) -> None:
        """Feeds whose opening took longer than ``OPEN_TIMEOUT_S`` are errors."""
        late = [
            (fd, sock)
            for fd, (sock, feed) in self._feeds.items()
            if feed.head is not None and now - feed.opened_at > OPEN_TIMEOUT_S
        ]
        for fd, sock in late:
            self._fail(fd, sock, TimeoutError("no response head in time"))

    def _fail(self, fd: int, sock: socket.socket, exc: BaseException) -> None:
        _, feed = self._feeds.pop(fd)
        if feed.head is not None:
            self._opening -= 1
        self._epoll.unregister(fd)
        sock.close()
        self.stats.errors.append(f"{type(exc).__name__}: {exc}")

    # --- reading -------------------------------------------------------------------------

    def _read(self, fd: int, sock: socket.socket, feed: _Feed, measuring: bool) -> None:
        """Everything the socket holds now (into the one buffer), counted and parsed."""
        while True:
            try:
                size = sock.recv_into(self._buffer)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(fd, sock, exc)
                return
            data = self._view[:size].tobytes()
            if not self._received(fd, sock, feed, data, measuring):
                return

    def _whole_chunk(self, feed: _Feed, data: bytes, size: int) -> bool:
        """A cached feed's read, if it is exactly one chunk of whole events (measuring):
        counted and recorded without copying the body; False for any other read."""
        if not (0 < size < READ_BUFFER and data.endswith(b"\n\n\r\n")):
            return False
        line_end = data.find(b"\r\n")
        body = size - line_end - 4
        try:
            if int(data[:line_end], 16) != body:
                return False
        except ValueError:
            return False
        stats = self.stats
        stats.raw_bytes += size
        stats.bytes += body
        # The chunk's own lines (its size, the closing CR) are neither data nor events; an
        # event ends with an empty line, and so does the split (after the last newline).
        lines = data.split(b"\n")
        stats.events += lines.count(b"") - 1
        snapshots = record_cached_lines(lines, int(time.time() * 1000), self._cache)
        if snapshots:
            self._snapshot(feed, snapshots)
        return True

    def _received(
        self, fd: int, sock: socket.socket, feed: _Feed, data: bytes, measuring: bool
    ) -> bool:
        """Any read: counted and parsed; True if the socket may hold more right now."""
        if not data:
            self._fail(fd, sock, ConnectionError("server closed the feed"))
            return False
        self._consume(sock, feed, data, measuring)
        if feed.ended:
            self._fail(fd, sock, ConnectionError("server ended the feed"))
            return False
        return len(data) == READ_BUFFER

    def _consume(self, sock: socket.socket, feed: _Feed, data: bytes, measuring: bool) -> None:
        """Count ``data`` and record the events it completes, by the feed's mode."""
        stats = self.stats
        if measuring:
            stats.raw_bytes += len(data)
        if feed.mode == _Feed.BYTES:
            self._count_only(feed, data, measuring)
            return
        body = feed.body(data)
        events = feed.complete(body)
        if not events:
            return
        if not measuring:  # the warm-up: only conflations are looked for
            self._snapshot(feed, events.count(b"event: snapshot"), measuring)
            return
        stats.bytes += len(body)
        stats.events += events.count(b"\n\n")
        if feed.mode == _Feed.CACHED:
            read_ms = int(time.time() * 1000)
            self._snapshot(feed, record_cached_lines(events.split(b"\n"), read_ms, self._cache))
            return
        received = time.time()
        for event in events.split(b"\n\n")[:-1]:
            if event.startswith(b"retry:"):
                event = event.partition(b"\n")[2]
            if event.startswith(b"event: batch\nid: "):
                stats.ticks_seen.add(int(event.split(b"\n", 2)[1].split(b".")[1]))
            self._snapshot(feed, record_event(event, stats, received, measuring))

    def _count_only(self, feed: _Feed, data: bytes, measuring: bool) -> None:
        """Bytes-only feeds: events counted by their ``event:`` lines."""
        self._snapshot(feed, data.count(b"event: snapshot"), measuring)
        if measuring:
            self.stats.events += data.count(b"event: ")

    def _snapshot(self, feed: _Feed, count: int, measuring: bool = True) -> None:
        """Count ``count`` snapshots of a feed; those after its first: conflations."""
        if count:
            feed.snapshots += count
            if measuring:
                self.stats.snapshots_after_first += min(count, feed.snapshots - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--verify-every",
        type=int,
        default=1,
        help="every K-th feed decodes each frame; the rest decode each distinct frame once",
    )
    parser.add_argument(
        "--bytes-only", action="store_true", help="unverified feeds count bytes and events only"
    )
    args = parser.parse_args()
    queries = [line.strip() for line in sys.stdin if line.strip()]
    stats = LoadClient(
        args.url,
        queries,
        args.warmup,
        args.seconds,
        verify_every=args.verify_every,
        bytes_only=args.bytes_only,
    ).run()
    result = asdict(stats)
    result["latency_ms"] = stats.latency_ms.tolist()
    result["ticks_seen"] = len(stats.ticks_seen)
    result["errors"] = stats.errors[:20]
    result["error_count"] = len(stats.errors)
    result["cpu_seconds_total"] = time.process_time()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
