"""Alerts: the durable log of zone events, and their delivery over SSE and webhooks.

* :mod:`tracker.alerts.log`: ``AlertLog``, the zone engine's event sink: ids, group
  commits to the database, retention, and the readers' view of the log;
* :mod:`tracker.alerts.store`: the tables (events, webhooks, cursors, dead letters);
* :mod:`tracker.alerts.streams`: ``GET /alerts`` streams, filtered and resumable;
* :mod:`tracker.alerts.webhooks`: delivery with signatures, retries, dead letters;
* :mod:`tracker.alerts.targets`: the webhook allow-list (SSRF);
* :mod:`tracker.alerts.wire`: the event's JSON and SSE framing;
* :mod:`tracker.alerts.routes`: the HTTP routes.

Formats and rules: ``docs/alerts.md``.
"""

__all__: list[str] = []
