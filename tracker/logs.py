"""Where log records go and how they look; helpers that keep repeats from flooding the log.

Every module logs to its own named logger (``logging.getLogger(__name__)``). Only
:func:`configure_logging`, called once by ``tracker.cli`` before the service starts,
decides where records go and how they look (library code never adds handlers):

* ``text`` (the default): one readable line per record on stderr,
  ``2026-11-25 22:54:45.123 WARNING tracker.bus: message key=value ...``, the record's
  extra fields as ``key=value`` after the message;
* ``json``: one JSON object per line (encoded by msgspec) for log shippers, with ``time``
  (ISO 8601, UTC), ``level``, ``logger``, ``message``, every extra field, and
  ``exception`` (the formatted traceback) when there is one.

Two helpers keep a condition that repeats many times a second from flooding the log:

* :class:`Episode` -- a condition that lasts a while (Redis unreachable): one record when
  it starts, one when it ends saying how long it lasted and how many it counted (dropped
  pings);
* :class:`Throttle` -- an event that may repeat often (a refused token): at most one
  record per interval, each saying how many like it were not logged since the last one.

Owns no tasks. Both helpers are synchronous, cheap when nothing is logged, and take their
clock as an argument, so tests drive time.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Final

import msgspec
from hypercorn.typing import (
    ASGIFramework as ASGIApp,
)
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    HTTPScope,
    Scope,
)

__all__ = [
    "ACCESS_LOGGER",
    "CHATTY_LOGGERS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "AccessLog",
    "Episode",
    "JsonFormatter",
    "TextFormatter",
    "Throttle",
    "configure_logging",
    "extra_fields",
]

LOG_FORMATS: Final = ("text", "json")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")

CHATTY_LOGGERS: Final = ("httpx", "httpcore")
"""Libraries that log every request at INFO (the simulator's POSTs): WARNING unless debug."""

_RECORD_ATTRIBUTES: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)
"""Attributes every LogRecord has; anything else on a record came from ``extra=``."""

_json = msgspec.json.Encoder(enc_hook=repr)  # an extra field msgspec cannot encode: repr


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call passed with ``extra=``, in the order they were given."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES}


def _utc_iso(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc_iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _json.encode(entry).decode()


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``, then the traceback, if any."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.default_msec_format = "%s.%03d"

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = extra_fields(record)
        if fields:
            line += " " + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        return line


def _text_value(value: Any) -> str:
    """A value as it reads in a text line: quoted (JSON) only if it has spaces or quotes."""
    text = value if isinstance(value, str) else repr(value)
    if text and not any(c in text for c in ' "=\n\t'):
        return text
    return _json.encode(text).decode()


class _TrackerHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs (so a second call replaces it)."""


def configure_logging(
    *,
    level: str = "info",
    log_format: str = "text",
    stream: IO[str] | None = None,
) -> None:
    """Send every logger's records to ``stream`` (stderr) in ``log_format`` from ``level``.

    Configures the root logger, so the libraries' records (Hypercorn's errors, coredis)
    come out in the same format. Calling it again replaces the previous setup.
    """
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = _TrackerHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _TrackerHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for chatty in CHATTY_LOGGERS:  # their INFO is one record per request: only in debug
        logging.getLogger(chatty).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    logging.captureWarnings(True)


ACCESS_LOGGER: Final = "tracker.access"


class AccessLog:
    """ASGI middleware: one INFO record on ``tracker.access`` per finished HTTP request.

    Logged when the app is done with the request (a feed: when it closes), with the
    client, method, path, protocol, status (0: no response started, e.g. the client left
    first), bytes of body sent and duration as fields. The query string is left out:
    feed tokens travel in it. Requests that Hypercorn answers itself (malformed ones)
    never reach the app and are not logged here.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.logger = logging.getLogger(ACCESS_LOGGER)

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http" or not self.logger.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        sent = 0

        async def counting_send(message: ASGISendEvent) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self._log(scope, status, sent, time.perf_counter() - started)

    def _log(self, scope: HTTPScope, status: int, sent: int, duration: float) -> None:
        client = scope.get("client")
        address = client[0] if client else "-"
        protocol = f"HTTP/{scope['http_version']}"
        self.logger.info(
            '%s "%s %s %s" %s %d B %.3f s',
            address,
            scope["method"],
            scope["path"],
            protocol,
            status or "-",
            sent,
            duration,
            extra={
                "client": ":".join(str(part) for part in client) if client else None,
                "method": scope["method"],
                "path": scope["path"],
                "protocol": protocol,
                "status": status,
                "bytes": sent,
                "duration_s": round(duration, 6),
                "user_agent": _header(scope, b"user-agent"),
            },
        )


def _header(scope: HTTPScope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class Episode:
    """A condition that lasts a while, logged once when it starts and once when it ends.

    Call :meth:`happened` every time the condition is seen (with how many things it cost,
    e.g. dropped pings) and :meth:`over` whenever things work again; only the first
    :meth:`happened` of an episode and the first :meth:`over` after it write a record::

        outage = Episode(logger, "Redis unreachable: pings to other instances are dropped",
                         "Redis reachable again", unit="pings dropped")
        outage.happened(len(batch), error=str(exc))  # a WARNING, once
        outage.over()  # "Redis reachable again after 12.3 s (5000 pings dropped)", INFO
    """

    def __init__(
        self,
        logger: logging.Logger,
        started: str,
        ended: str,
        *,
        unit: str = "times",
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._started = started
        self._ended = ended
        self._unit = unit
        self._level = level
        self._clock = clock
        self._since: float | None = None
        self.count = 0
        """What the current (or last) episode counted so far."""

    @property
    def active(self) -> bool:
        """Whether the condition holds now (seen, and not over since)."""
        return self._since is not None

    def happened(self, count: int = 1, **fields: Any) -> None:
        """The condition holds (again); ``count`` adds to what the episode cost."""
        if self._since is None:
            self._since = self._clock()
            self.count = 0
            self._logger.log(self._level, self._started, extra=fields)
        self.count += count

    def over(self, **fields: Any) -> None:
        """The condition no longer holds; logs the episode's end if one was going on."""
        if self._since is None:
            return
        duration = self._clock() - self._since
        self._since = None
        self._logger.info(
            "%s after %.1f s (%d %s)",
            self._ended,
            duration,
            self.count,
            self._unit,
            extra={"count": self.count, "duration_s": round(duration, 3), **fields},
        )


class Throttle:
    """At most one record per ``interval_s``; the next one says how many were not logged.

    For events that a client can cause at will (a wrong token on every request): the
    first is logged at once, repeats within the interval are only counted::

        refused = Throttle(logger, interval_s=10)
        refused.log("refused a feed token: %s", reason, address=address)
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = 10.0,
        level: int = logging.INFO,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._level = level
        self._clock = clock
        self._next_at = float("-inf")
        self.suppressed = 0
        """Events not logged since the last record."""

    def log(self, message: str, *args: Any, **fields: Any) -> bool:
        """Log ``message % args`` unless one was logged less than ``interval_s`` ago."""
        if not self._logger.isEnabledFor(self._level):
            return False
        now = self._clock()
        if now < self._next_at:
            self.suppressed += 1
            return False
        self._next_at = now + self._interval_s
        if self.suppressed:
            fields["suppressed"] = self.suppressed
            message += f" ({self.suppressed} more like it not logged)"
            self.suppressed = 0
        self._logger.log(self._level, message, *args, extra=fields)
        return True
