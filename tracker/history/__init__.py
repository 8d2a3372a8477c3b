"""History: every accepted ping kept, and read back as tracks, area queries and replays.

* :mod:`tracker.history.store` -- what a store is (:class:`HistoryStore`) and what it
  returns (:class:`Track`, :class:`AreaPage`), apart from any database;
* :mod:`tracker.history.codec` -- the compressed track chunks both stores keep;
* :mod:`tracker.history.layout` -- raw batches and chunks: compaction and query logic
  that is the same in every store (grouping, merging, windows, area pages);
* :mod:`tracker.history.sqlite` -- the embedded default (one local file);
* :mod:`tracker.history.postgres` -- PostgreSQL, shared by several instances;
* :mod:`tracker.history.writer` -- the Trio side: bounded queue, group commit, retention;
* :mod:`tracker.history.routes` -- ``/vehicles/{id}/track`` and ``/history`` over HTTP,
  answering in :mod:`tracker.history.formats`, paged by :mod:`tracker.history.cursor`,
  tracks simplified by :mod:`tracker.history.simplify`;
* :mod:`tracker.history.replay` -- stored positions played back through a feed.

``docs/history.md`` explains the layout, the durability contract and the choices.
"""

__all__: list[str] = []
