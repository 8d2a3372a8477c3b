"""Decoded track chunks kept by their content, within a byte budget: a query's decoding
saved.

Why: decoding is most of a track query's work (a day's track, 24 chunks of 3,600
positions: 7.8 ms of 12 ms to read, decode and encode it), and queries come back to the
same chunks: a dispatcher clicks the same vehicle again and again, a trail is asked for
every few seconds, and an hour once over is sealed and never changes.

How: :class:`DecodedChunks` maps a chunk's **blob** (its stored bytes) to its decoded
:class:`~tracker.history.codec.Positions`. Keyed by content, an entry can never be
stale, so nothing has to invalidate it: a chunk that compaction appends to gets a new
segment (another blob), one that sealing merges or a late ping re-seals is stored as a
new blob (another key), and one that retention deletes is simply never asked for again.
Entries nobody asks for any more leave as the least recently used once the budget is
spent. The budget counts the decoded columns (56 bytes a position) and the key blob;
entries are copies of their own (a decode's views would keep the whole decode alive), and
read-only, so that no caller can change what the next one reads.

Stores decode their chunks through one (``store.decoded``), with no budget by default: a
store in the tracker's process decodes as before; a history reader process
(``tracker.history.reader``) gives its store :data:`READER_BYTES`. Raw batches are not
kept: they are compacted within a minute, and each holds many vehicles.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from tracker.history import codec
from tracker.history.codec import Positions

__all__ = ["READER_BYTES", "DecodedChunks"]

READER_BYTES: Final = 64 * 1024 * 1024
"""A reader process's budget: about 1.2 million positions (13 days of a vehicle pinging
every second, or an hour of 2,000 vehicles pinging every three seconds)."""


class DecodedChunks:
    """Decoded chunks by blob, the least recently used dropped beyond ``max_bytes`` (0:
    nothing kept). Not thread-safe: one per store, used by one thread at a time (a
    reader process answers one query at a time)."""

    def __init__(self, max_bytes: int = 0) -> None:
        self.max_bytes = max_bytes
        self.kept_bytes = 0
        self._kept: OrderedDict[bytes, Positions] = OrderedDict()

    def __len__(self) -> int:
        """Chunks kept."""
        return len(self._kept)

    def decode_many(self, blobs: Sequence[bytes]) -> list[Positions]:
        """:func:`codec.decode_many` of ``blobs``, the kept ones not decoded again.

        Raises ValueError for a damaged blob, as decoding does (nothing is kept then).
        """
        if self.max_bytes <= 0:
            return codec.decode_many(blobs)
        found = [self._kept.get(blob) for blob in blobs]
        missing = [blob for blob, hit in zip(blobs, found, strict=True) if hit is None]
        decoded = iter(codec.decode_many(missing) if missing else ())
        answer = []
        for blob, hit in zip(blobs, found, strict=True):
            if hit is None:
                answer.append(self._keep(blob, next(decoded)))
            else:
                self._kept.move_to_end(blob)
                answer.append(hit)
        return answer

    def _keep(self, blob: bytes, positions: Positions) -> Positions:
        """``positions`` (the decode of ``blob``) copied, kept if they fit, returned."""
        size = len(blob) + sum(column.nbytes for column in positions)
        if size > self.max_bytes:
            return positions
        if blob in self._kept:  # the same blob twice in one call
            return self._kept[blob]
        columns: list[Any] = [np.array(column) for column in positions]
        for column in columns:
            column.flags.writeable = False
        own = Positions(*columns)
        self._kept[blob] = own
        self.kept_bytes += size
        while self.kept_bytes > self.max_bytes:
            oldest, dropped = self._kept.popitem(last=False)
            self.kept_bytes -= len(oldest) + sum(column.nbytes for column in dropped)
        return own
