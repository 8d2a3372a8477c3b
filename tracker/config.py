"""One typed, frozen configuration object for the whole service.

``TrackerConfig`` is built once (by ``tracker.cli`` from flags, then ``TRACKER_*``
environment variables, then the defaults below) and passed down; nothing else reads
the environment. Each field carries its own help text and bounds, so the command line,
the environment and the validation cannot drift apart. Units are in the field names.
"""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse
from collections.abc import Mapping
from typing import Annotated, Any, Final, TypeVar

import msgspec

from tracker.alerts.targets import AllowList
from tracker.logs import LOG_FORMATS, LOG_LEVELS

_S = TypeVar("_S", bound=msgspec.Struct)

__all__ = [
    "BOOLEAN_WORDS",
    "DEFAULT_REVOCATIONS",
    "ENV_PREFIX",
    "ConfigError",
    "LogConfig",
    "TrackerConfig",
    "config_summary",
    "convert",
    "describe",
    "env_name",
    "flag",
    "load_config",
    "parse_duration",
    "without_password",
]

KIB = 1024
MIB = 1024 * KIB
DAY_S = 86_400.0
DEFAULT_HISTORY: Final = "tracker-data/history.sqlite3"
"""Where ``tracker serve`` and ``tracker demo`` keep history unless told otherwise."""
DEFAULT_STATE: Final = "tracker-data/state.sqlite3"
"""Where durable tables go when history is off (:attr:`TrackerConfig.database_target`)."""
DEFAULT_REVOCATIONS: Final = "tracker-data/revoked.jsonl"
"""Where ``tracker serve`` and ``tracker demo`` keep revoked token ids unless told otherwise."""
DEFAULT_META: Final = "tracker-data/vehicle-meta.jsonl"
"""Where ``tracker serve`` and ``tracker demo`` keep vehicle metadata unless told otherwise."""


def describe(description: str, **bounds: float) -> msgspec.Meta:
    """Field metadata: the help text every option shows, and its bounds."""
    meta: msgspec.Meta = msgspec.Meta(description=description, **bounds)  # type: ignore[call-overload]
    return meta


class TrackerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every tunable of the tracker, with its default."""

    host: Annotated[str, describe("Address to listen on (loopback by default).")] = "127.0.0.1"
    port: Annotated[
        int, describe("TCP port to listen on (0 picks a free port).", ge=0, le=65535)
    ] = 8000
    certfile: Annotated[
        str, describe("TLS certificate (PEM); with keyfile enables HTTPS and h2.")
    ] = ""
    keyfile: Annotated[str, describe("TLS private key (PEM) for certfile.")] = ""
    tick_s: Annotated[
        float, describe("Seconds between position batches sent to feeds.", ge=0.01, le=10)
    ] = 0.1
    h3_resolution: Annotated[
        int, describe("H3 resolution of the geo-index (7: ~5 km2 cells, see docs).", ge=7, le=10)
    ] = 7
    stale_after_s: Annotated[
        float, describe("A vehicle not heard from for this long is marked stale.", gt=0)
    ] = 60.0
    remove_after_s: Annotated[
        float, describe("A vehicle not heard from for this long is removed.", gt=0)
    ] = 300.0
    heartbeat_s: Annotated[
        float, describe("Seconds between SSE comment heartbeats on a quiet feed.", gt=0)
    ] = 15.0
    retry_ms: Annotated[
        int, describe("Reconnect delay suggested to SSE clients (the retry: field).", ge=0)
    ] = 2000
    write_timeout_s: Annotated[
        float,
        describe(
            "Abort a connection whose sent bytes stay unacknowledged this long (dead peer).", gt=0
        ),
    ] = 30.0
    idle_timeout_s: Annotated[
        float,
        describe(
            "Close a connection with no request in flight for this long: an idle keep-alive, "
            "or a client slow to send its request headers.",
            gt=0,
        ),
    ] = 5.0
    sndbuf_bytes: Annotated[
        int,
        describe("Kernel send buffer per connection; bounds memory of a stalled client.", ge=4096),
    ] = 256 * KIB
    direct_feeds: Annotated[
        bool,
        describe(
            "Write HTTP/1.1 feeds straight to the socket once authorised (tracker.direct); "
            "off: every feed goes through the framework, as HTTP/2 feeds do."
        ),
    ] = True
    outbox_max_ticks: Annotated[
        int, describe("Batches queued per feed before it is conflated into a snapshot.", ge=1)
    ] = 30
    outbox_max_bytes: Annotated[
        int, describe("Bytes queued per feed before it is conflated into a snapshot.", ge=1024)
    ] = 1 * MIB
    replay_ticks: Annotated[
        int, describe("Ticks of batches kept for Last-Event-ID resume.", ge=0)
    ] = 600
    replay_max_bytes: Annotated[
        int, describe("Bytes of batches kept for Last-Event-ID resume.", ge=0)
    ] = 64 * MIB
    max_feed_cells: Annotated[int, describe("Most index cells one feed may cover.", ge=1)] = 4000
    ingest_max_bytes: Annotated[int, describe("Largest accepted ingest body.", ge=1024)] = 8 * MIB
    body_timeout_s: Annotated[
        float,
        describe(
            "A request body must arrive within this, plus 1 s per body_min_rate_bytes_s "
            "bytes received (else 408).",
            gt=0,
        ),
    ] = 10.0
    body_min_rate_bytes_s: Annotated[
        int, describe("Slowest accepted request-body upload, in bytes per second.", ge=1)
    ] = 64 * KIB
    max_body_reads: Annotated[
        int, describe("Request bodies read at once; beyond it 503 (slow-upload floods).", ge=1)
    ] = 128
    ingest_max_pings: Annotated[int, describe("Most pings in one ingest batch.", ge=1)] = 50_000
    max_future_s: Annotated[
        float,
        describe(
            "Reject pings timestamped further ahead of server time than this; accepted "
            "ones are clamped to server time (a fast clock cannot freeze a vehicle).",
            ge=0,
        ),
    ] = 10.0
    max_age_s: Annotated[
        float, describe("Reject pings timestamped further behind server time than this.", gt=0)
    ] = 86_400.0
    shutdown_grace_s: Annotated[
        float, describe("Seconds open connections get to finish on shutdown.", ge=0)
    ] = 3.0
    backlog: Annotated[
        int, describe("Connections waiting to be accepted (many feeds reconnect at once).", ge=1)
    ] = 4096
    access_log: Annotated[
        bool,
        describe(
            "Log every request on the tracker.access logger (client, method, path without "
            "the query, status, duration)."
        ),
    ] = False
    max_connections: Annotated[
        int,
        describe(
            "Open connections at most; beyond it an idle one is closed, else the new one. "
            "0: the file limit (RLIMIT_NOFILE) less an eighth for the rest of the process.",
            ge=0,
        ),
    ] = 0
    bus: Annotated[
        str,
        describe(
            "How instances share pings: empty for one instance (in-process), or "
            "redis://host:port/db to scale out over Redis Pub/Sub."
        ),
    ] = ""
    bus_shard_resolution: Annotated[
        int,
        describe("H3 resolution of the bus's shards (one Redis channel each).", ge=0, le=10),
    ] = 5
    bus_timeout_s: Annotated[
        float,
        describe(
            "Deadline of every Redis call; past it the bus is degraded (served locally) "
            "until Redis answers again.",
            gt=0,
            le=60,
        ),
    ] = 2.0
    bus_queue_max_pings: Annotated[
        int,
        describe(
            "Pings waiting to be forwarded to Redis; beyond, the oldest batches are dropped "
            "(counted; the latest position of every vehicle is republished after an outage).",
            ge=1,
        ),
    ] = 100_000
    open_feeds: Annotated[
        bool,
        describe("Serve feeds without a token: anyone who reaches the port sees every vehicle."),
    ] = False
    token_secrets: Annotated[
        str,
        describe(
            "Comma-separated secrets of feed tokens: the first signs, every one verifies "
            "(key rotation). Empty: a random secret per start."
        ),
    ] = ""
    ingest_keys: Annotated[
        str,
        describe("Comma-separated keys accepted in the X-Ingest-Key header of POST /ingest."),
    ] = ""
    ingest_rate_per_key: Annotated[
        float,
        describe("Pings per second one ingest key may post (1 s of burst); 0: no limit.", ge=0),
    ] = 250_000.0
    max_streams_per_token: Annotated[
        int, describe("Feeds one token may hold open at once; 0: no limit.", ge=0)
    ] = 8
    max_streams_per_address: Annotated[
        int, describe("Feeds one client address may hold open at once; 0: no limit.", ge=0)
    ] = 64
    trusted_proxies: Annotated[
        str,
        describe(
            "Comma-separated addresses or CIDR networks of reverse proxies whose "
            "X-Forwarded-For and X-Forwarded-Proto are believed (client address, https). "
            "Empty: believe no one."
        ),
    ] = ""
    cors_origins: Annotated[
        str,
        describe(
            "Comma-separated origins whose pages may read feeds (CORS); * for any. "
            "Empty: same origin only."
        ),
    ] = ""
    tile_url: Annotated[
        str,
        describe(
            "Map tile URL template for the map page ({z}/{x}/{y}); empty: a plain background."
        ),
    ] = ""
    tile_attribution: Annotated[str, describe("Attribution shown for the tiles (HTML).")] = ""
    map_center: Annotated[str, describe("Where the map page opens without an area: 'lat,lon'.")] = (
        "52.52,13.405"
    )
    map_zoom: Annotated[
        int, describe("Zoom the map page opens at without an area.", ge=3, le=19)
    ] = 12
    web_dir: Annotated[
        str,
        describe(
            "Directory of the map page's files (default: the copy installed with the tracker: "
            "<prefix>/share/tracker/web, or web/ of a source checkout)."
        ),
    ] = ""
    frame_ancestors: Annotated[
        str,
        describe("Who may put /embed in a frame: a CSP frame-ancestors source list."),
    ] = "*"
    revocations_file: Annotated[
        str,
        describe(
            "Where revoked token ids are kept until their tokens expire (survives restarts; "
            "with --bus, Redis shares them between instances too): empty for memory only. "
            f"tracker serve and demo default to {DEFAULT_REVOCATIONS}."
        ),
    ] = ""
    revocations_max: Annotated[
        int,
        describe("Revoked tokens remembered at most (more: 503 until some expire).", ge=1),
    ] = 100_000
    meta_file: Annotated[
        str,
        describe(
            "Where vehicle metadata (PUT /meta/{id}: name, kind, plate, properties) is kept: "
            f"empty for memory only. tracker serve and demo default to {DEFAULT_META}."
        ),
    ] = ""
    meta_max: Annotated[int, describe("Vehicles with metadata at most (more: 503).", ge=1)] = (
        100_000
    )
    history: Annotated[
        str,
        describe(
            "Where every accepted ping is kept: empty or 'off' for nowhere; a file path "
            "(or sqlite:PATH) for the embedded store; postgresql://user@host/db for a "
            "database that several instances share. tracker serve and demo default to "
            f"{DEFAULT_HISTORY}."
        ),
    ] = ""
    history_retention_s: Annotated[
        float,
        describe(
            "How long history is kept (seconds, or a duration: 12h, 30d); older positions "
            "are deleted in small steps.",
            gt=0,
        ),
    ] = 30 * DAY_S
    history_commit_s: Annotated[
        float,
        describe(
            "Seconds between history commits: after a crash, at most the acknowledged pings "
            "of the last interval (and of the commit under way) are missing.",
            gt=0,
            le=60,
        ),
    ] = 1.0
    history_queue_pings: Annotated[
        int,
        describe(
            "Accepted pings waiting to be written to history, at most; beyond it ingest "
            "answers 503 with Retry-After (nothing acknowledged is dropped).",
            ge=1,
        ),
    ] = 1_000_000
    streets_file: Annotated[
        str,
        describe(
            "A GeoJSON file of streets (LineStrings, at most 4 MiB) the map draws under the "
            "vehicles, with no tile server needed; tracker demo serves its simulated city's."
        ),
    ] = ""

    zone_engine_thread: Annotated[
        bool,
        describe(
            "Run the zone engine in a worker thread of the tracker's process, where it "
            "shares the GIL with the event loop, instead of a process of its own "
            "(docs/zones.md)."
        ),
    ] = False
    alerts_queue_events: Annotated[
        int,
        describe(
            "Zone events waiting to be written to the alerts log, at most; beyond it ingest "
            "answers 503 with Retry-After and /healthz reports it (docs/alerts.md).",
            ge=1,
        ),
    ] = 100_000
    alerts_memory_events: Annotated[
        int,
        describe(
            "Newest alert events kept in memory for streams; older are read from the log.", ge=1
        ),
    ] = 10_000
    alerts_retention_s: Annotated[
        float,
        describe("How long alert events are kept in the log (seconds, or 12h, 30d).", gt=0),
    ] = 7 * DAY_S
    alerts_retention_events: Annotated[
        int, describe("Most alert events kept in the log; the oldest go first.", ge=1)
    ] = 1_000_000
    webhook_allow: Annotated[
        str,
        describe(
            "Comma-separated webhook targets allowed beyond public addresses: CIDR ranges "
            "(10.0.0.0/8, 127.0.0.1/32) open addresses; host names (hooks.example.com, "
            "*.example.com), if any, restrict targets to those names. Empty: any public "
            "address, never loopback, private, link-local or metadata ones."
        ),
    ] = ""
    webhook_timeout_s: Annotated[
        float,
        describe("Deadline of one webhook request (resolving, connecting, the answer).", gt=0),
    ] = 10.0
    webhook_attempts: Annotated[
        int,
        describe("Attempts per event and webhook; then it goes to the dead letters.", ge=1, le=50),
    ] = 8
    webhook_backoff_s: Annotated[
        float, describe("Wait before the second attempt; doubles each time (with jitter).", gt=0)
    ] = 1.0
    webhook_backoff_max_s: Annotated[
        float, describe("Longest wait between two attempts of one event.", gt=0)
    ] = 300.0
    webhook_concurrency: Annotated[
        int, describe("Webhook requests in flight at once, over every subscription.", ge=1)
    ] = 64
    webhook_max_subscriptions: Annotated[
        int, describe("Most webhook subscriptions (more: 409).", ge=1)
    ] = 256
    webhook_dead_letters: Annotated[
        int, describe("Dead letters kept per webhook; the oldest go first (counted).", ge=1)
    ] = 10_000

    osmand_port: Annotated[
        int,
        describe(
            "Also serve the OsmAnd protocol (Traccar Client, GPS units) on this port, at any "
            "path, as Traccar does on 5055; 0: off (it is always at /osmand of --port).",
            ge=0,
            le=65535,
        ),
    ] = 0
    devices_file: Annotated[
        str,
        describe(
            "JSON file of device fleets and keys (docs/devices.md). Empty: one fleet whose "
            "keys are the ingest keys and which registers devices on first sight."
        ),
    ] = ""
    device_rate_per_s: Annotated[
        float, describe("Pings per second one device may send (1 s of burst); 0: no limit.", ge=0)
    ] = 20.0
    device_max_registered: Annotated[
        int, describe("Devices registered on first sight, at most (more: 403).", ge=0)
    ] = 100_000
    mqtt: Annotated[
        str,
        describe(
            "Subscribe to OwnTracks on this MQTT broker: mqtt://[user:password@]host[:port]. "
            "Empty: no MQTT."
        ),
    ] = ""
    mqtt_topic: Annotated[
        str, describe("MQTT topic filter; the device id is the topic's last two levels.")
    ] = "owntracks/+/+"
    mqtt_fleet: Annotated[
        str,
        describe("Fleet of MQTT devices (the broker authenticates them); empty: the default."),
    ] = ""
    mqtt_queue_max: Annotated[
        int,
        describe("MQTT messages waiting to be ingested; more are dropped (counted).", ge=1),
    ] = 10_000
    gtfs_rt: Annotated[
        str,
        describe(
            "Comma-separated GTFS-realtime VehiclePositions feed URLs to poll, each as URL or "
            "name=URL (vehicle ids become name:id; gtfs:id without a name)."
        ),
    ] = ""
    gtfs_rt_interval_s: Annotated[
        float,
        describe("Seconds between polls of each GTFS-realtime feed (longer if it says so).", ge=1),
    ] = 15.0
    gtfs_rt_timeout_s: Annotated[
        float, describe("Deadline of one GTFS-realtime fetch, body included.", gt=0, le=300)
    ] = 10.0
    gtfs_rt_max_bytes: Annotated[
        int, describe("Largest GTFS-realtime feed body read; a larger one is refused.", ge=1024)
    ] = 32 * MIB
    quic_bind: Annotated[
        str,
        describe(
            "Also serve HTTP/3 (QUIC) on this UDP address, HOST:PORT or PORT (on --host), "
            "advertised to HTTP/1.1 and HTTP/2 clients by Alt-Svc; needs --certfile and "
            "--keyfile. Empty: no HTTP/3."
        ),
    ] = ""

    def __post_init__(self) -> None:
        if self.remove_after_s <= self.stale_after_s:
            raise _bad(
                "remove_after_s", "must be greater than --stale-after", also=("stale_after_s",)
            )
        if self.bus and (problem := _bus_url_problem(self.bus)):
            raise _bad(
                "bus",
                "must be empty (one instance) or redis://[:password@]host[:port][/db], "
                f"rediss://... or unix://path; {without_password(self.bus)!r}: {problem}",
            )
        if problem := _history_problem(self.history):
            raise _bad(
                "history",
                "must be empty or 'off', a file path, sqlite:PATH or "
                f"postgresql://[user[:password]@]host[:port]/db; "
                f"{without_password(self.history)!r}: {problem}",
            )
        if self.bus_shard_resolution > self.h3_resolution:
            raise _bad(
                "bus_shard_resolution",
                f"must not be finer than --h3-resolution ({self.h3_resolution})",
                also=("h3_resolution",),
            )
        if bool(self.certfile) != bool(self.keyfile):
            raise _bad(
                "certfile",
                "and --keyfile go together: both for HTTPS, or neither",
                also=("keyfile",),
            )
        try:
            lat, lon = self.map_center_latlon
        except ValueError:
            raise _bad("map_center", "must be 'lat,lon', e.g. '52.52,13.405'") from None
        if not (-85 <= lat <= 85 and -180 <= lon <= 180):
            raise _bad("map_center", "must be within latitude -85..85 and longitude -180..180")
        if any(len(secret) < 32 for secret in self.token_secret_list):
            raise _bad(
                "token_secrets",
                "needs at least 32 characters (256 bits) in each secret; "
                "leave it empty and tracker serve makes one up",
            )
        try:
            self.trusted_proxy_list  # noqa: B018 -- parsing is the check
        except ValueError as exc:
            raise _bad("trusted_proxies", f"must be addresses or CIDR networks: {exc}") from None
        if self.mqtt and (problem := _mqtt_url_problem(self.mqtt)):
            raise _bad(
                "mqtt",
                f"must be mqtt://[user:password@]host[:port]; {without_password(self.mqtt)!r}: "
                f"{problem}",
            )
        try:
            self.gtfs_rt_feeds  # noqa: B018 -- parsing is the check
        except ValueError as exc:
            raise _bad("gtfs_rt", f"must be comma-separated URL or name=URL: {exc}") from None
        try:
            AllowList(_split(self.webhook_allow))
        except ValueError as exc:
            raise _bad("webhook_allow", f"takes CIDR ranges and host names: {exc}") from None
        if self.osmand_port and self.osmand_port == self.port:
            raise _bad("osmand_port", "must differ from --port", also=("port",))
        if any(c in self.frame_ancestors for c in ";,\r\n"):
            raise _bad("frame_ancestors", "is one CSP source list: no ';', ',' or newline")
        if self.quic_bind:
            try:
                self.quic_address  # noqa: B018 -- parsing is the check
            except ValueError as exc:
                raise _bad("quic_bind", f"must be HOST:PORT or PORT: {exc}") from None
            if not self.certfile:
                raise _bad(
                    "quic_bind",
                    "needs --certfile and --keyfile: QUIC is always encrypted",
                    also=("certfile", "keyfile"),
                )

    @property
    def map_center_latlon(self) -> tuple[float, float]:
        """``map_center`` as numbers (ValueError if it is not two of them)."""
        lat, lon = (float(v) for v in self.map_center.split(","))
        return lat, lon

    @property
    def quic_address(self) -> tuple[str, int]:
        """``quic_bind`` as (host, port); ValueError if it is neither HOST:PORT nor PORT."""
        host, sep, port = self.quic_bind.strip().rpartition(":")
        host = host.strip("[]") if sep else self.host
        if not port.isdigit() or int(port) > 65535 or not host:
            raise ValueError(f"{self.quic_bind[:60]!r} has no port from 0 to 65535 or no host")
        return host, int(port)

    @property
    def history_target(self) -> str:
        """``history`` as a store URL or path; empty when history is off."""
        target = self.history.strip()
        return "" if target.lower() in HISTORY_OFF else target

    @property
    def database_target(self) -> str:
        """Where components keep durable tables (zones, alerts: ``tracker.database``):
        the history's store when history is on (one database to run and back up), else
        :data:`DEFAULT_STATE`, a local SQLite file next to the default history file."""
        return self.history_target or DEFAULT_STATE

    @property
    def gtfs_rt_feeds(self) -> list[tuple[str, str]]:
        """``gtfs_rt`` as (name, URL) pairs; unnamed feeds are gtfs, gtfs2, gtfs3...

        Raises ValueError for a URL that is not http(s) or a name used twice.
        """
        feeds: list[tuple[str, str]] = []
        for number, entry in enumerate(_split(self.gtfs_rt), start=1):
            name, sep, url = entry.partition("=")
            if not sep or "://" in name:
                name, url = ("gtfs" if number == 1 else f"gtfs{number}"), entry
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url[:80]!r} is not an http(s) URL")
            if not re.fullmatch(r"[\w.-]{1,32}", name) or name in dict(feeds):
                raise ValueError(f"the name {name[:40]!r} is used twice or is not a short word")
            feeds.append((name, url))
        return feeds

    @property
    def token_secret_list(self) -> list[str]:
        """``token_secrets`` split; the first one signs."""
        return _split(self.token_secrets)

    @property
    def ingest_key_list(self) -> list[str]:
        """``ingest_keys`` split."""
        return _split(self.ingest_keys)

    @property
    def trusted_proxy_list(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """``trusted_proxies`` as networks (a bare address is a network of one)."""
        return [ipaddress.ip_network(value, strict=False) for value in _split(self.trusted_proxies)]

    @property
    def cors_origin_list(self) -> list[str]:
        """``cors_origins`` split."""
        return _split(self.cors_origins)


SECRET_FIELDS = ("token_secrets", "ingest_keys")
"""Fields never written to a log or an error message (only how many values they hold)."""
URL_FIELDS = ("bus", "history", "mqtt")
"""Fields that may hold a URL with a password: logged through :func:`without_password`."""
HISTORY_OFF: Final = ("", "off")
"""What ``history`` takes to keep no history."""


def config_summary(config: TrackerConfig) -> dict[str, Any]:
    """What differs from the defaults, for the startup log: secrets counted, not shown."""
    summary: dict[str, Any] = {}
    defaults = TrackerConfig()
    for name in config.__struct_fields__:
        value = getattr(config, name)
        if value == getattr(defaults, name) and name not in SECRET_FIELDS:
            continue
        if name in SECRET_FIELDS:
            value = len(_split(value))
        elif name in URL_FIELDS:
            value = without_password(value)
        summary[name] = value
    return summary


def without_password(url: str) -> str:
    """A URL with any password in it replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # not a URL: hide whatever may be credentials
        return re.sub(r"(?<=://)[^@/]*@", "***@", url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class LogConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the process logs (``tracker.logs.configure_logging``); every command has these."""

    log_level: Annotated[
        str, describe("Least severe records logged: debug, info, warning or error.")
    ] = "info"
    log_format: Annotated[
        str, describe("text: readable lines on stderr; json: one JSON object per line.")
    ] = "text"

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise _bad("log_level", f"must be one of {', '.join(LOG_LEVELS)}", got=self.log_level)
        if self.log_format not in LOG_FORMATS:
            raise _bad(
                "log_format", f"must be one of {', '.join(LOG_FORMATS)}", got=self.log_format
            )


def _split(values: str) -> list[str]:
    return [value.strip() for value in values.split(",") if value.strip()]


class ConfigError(ValueError):
    """A configuration value that is out of range or inconsistent.

    Its message is one line for a person: the flag, what it must be, and the
    ``TRACKER_*`` variable that sets it too (``--tick must be at least 0.01 s
    (TRACKER_TICK_S); got '0.001'``).
    """


ENV_PREFIX: Final = "TRACKER_"
BOOLEAN_WORDS: Final = {
    "true": True,
    "false": False,
    "1": True,
    "0": False,
    "yes": True,
    "no": False,
}
"""What a boolean option takes from the environment (any case)."""


def flag(name: str) -> str:
    """The command-line flag of a config field: ``tick_s`` -> ``--tick``."""
    return "--" + name.removesuffix("_s").replace("_", "-")


def env_name(name: str) -> str:
    """The environment variable of a config field: ``tick_s`` -> ``TRACKER_TICK_S``."""
    return ENV_PREFIX + name.upper()


def _bad(name: str, problem: str, *, also: tuple[str, ...] = (), got: Any = None) -> ConfigError:
    """``--flag <problem> (TRACKER_FLAG, ...); got '<value>'`` as a ConfigError."""
    variables = ", ".join(env_name(n) for n in (name, *also))
    shown = "" if got is None or name in SECRET_FIELDS else f"; got {str(got)!r}"
    return ConfigError(f"{flag(name)} {problem} ({variables}){shown}")


def _mqtt_url_problem(url: str) -> str | None:
    """What is wrong with the form of an ``--mqtt`` URL (None: nothing)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- parsing is the check
    except ValueError as exc:
        return str(exc)
    if parts.scheme != "mqtt":
        return f"the scheme {parts.scheme or '(none)'!r} is not mqtt"
    return None if parts.hostname else "no host"


def _bus_url_problem(url: str) -> str | None:
    """What is wrong with the form of a ``--bus`` URL (None: nothing)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        return str(exc)
    try:
        port = parts.port
    except ValueError:
        return "the port is not a number from 0 to 65535"
    if parts.scheme == "unix":
        return None if parts.path else "no socket path"
    if parts.scheme not in ("redis", "rediss"):
        return f"the scheme {parts.scheme or '(none)'!r} is not redis, rediss or unix"
    if not parts.hostname:
        return "no host"
    if port == 0:
        return "port 0"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return f"the database {db!r} is not a number"
    return None


def _history_problem(value: str) -> str | None:
    """What is wrong with the form of a ``--history`` value (None: nothing)."""
    target = value.strip()
    if target.lower() in HISTORY_OFF:
        return None
    scheme = target.split(":", 1)[0].lower() if "://" in target else ""
    if scheme in ("postgresql", "postgres"):
        try:
            parts = urllib.parse.urlsplit(target)
            parts.port  # noqa: B018 -- parsing is the check
        except ValueError as exc:
            return str(exc)
        return None if parts.path.strip("/") else "no database name"
    if scheme:
        return f"the scheme {scheme!r} is not postgresql (a file needs no scheme)"
    path = target.removeprefix("sqlite:")
    if not path.strip():
        return "no file path"
    if "\0" in path:
        return "a NUL character in the file path"
    return None


_DURATION: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_DURATION_UNITS_S: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY_S}


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``1.5``, ``90s``, ``30m``, ``12h`` or ``30d`` (ValueError if not)."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90s, 30m, 12h or 30d")
    return float(match[1]) * _DURATION_UNITS_S[match[2]]


def _from_text(name: str, value: Any, booleans: set[str]) -> Any:
    """A boolean word as a bool and a duration (``30d``) of a ``*_s`` field as seconds;
    anything else unchanged (msgspec converts it, or says what is wrong)."""
    if not isinstance(value, str):
        return value
    if name in booleans:
        return BOOLEAN_WORDS.get(value.strip().lower(), value)
    if name.endswith("_s"):
        try:
            return parse_duration(value)
        except ValueError:
            return value
    return value


def convert(struct: type[_S], values: Mapping[str, Any]) -> _S:
    """A config Struct from field values (strings are converted, as from the environment).

    A ``*_s`` field (seconds) also takes a duration such as ``90s``, ``12h`` or ``30d``.
    Raises :class:`ConfigError` naming the flag and the variable of the first bad value.
    """
    booleans = _boolean_fields(struct)
    values = {k: _from_text(k, v, booleans) for k, v in values.items()}
    try:
        return msgspec.convert(values, struct, strict=False)
    except msgspec.ValidationError as exc:
        raise _explain(exc, struct, values) from exc


def load_config(values: Mapping[str, Any]) -> TrackerConfig:
    """Build a validated config from field values (strings are converted, as from env)."""
    return convert(TrackerConfig, values)


def _field_types(struct: type[msgspec.Struct]) -> dict[str, msgspec.inspect.Type]:
    """Each field's type (constraints included), with ``X | None`` read as ``X``."""
    types: dict[str, msgspec.inspect.Type] = {}
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        kind = field.type
        while True:
            if isinstance(kind, msgspec.inspect.Metadata):
                kind = kind.type
            elif isinstance(kind, msgspec.inspect.UnionType):
                kind = next(t for t in kind.types if not isinstance(t, msgspec.inspect.NoneType))
            else:
                break
        types[field.name] = kind
    return types


def _boolean_fields(struct: type[msgspec.Struct]) -> set[str]:
    return {n for n, t in _field_types(struct).items() if isinstance(t, msgspec.inspect.BoolType)}


def _explain(
    exc: msgspec.ValidationError, struct: type[msgspec.Struct], values: Mapping[str, Any]
) -> ConfigError:
    """The ValidationError of one field in words: flag, requirement, variable, value."""
    message = str(exc)
    at = re.search(r" - at `\$\.(\w+)`$", message)
    kind = _field_types(struct).get(at[1]) if at else None
    if at is None or kind is None:
        return ConfigError(message)  # a check across fields: its message names them
    name, got = at[1], values.get(at[1])
    if isinstance(kind, msgspec.inspect.BoolType):
        return _bad(name, f"must be one of {'/'.join(BOOLEAN_WORDS)}", got=got)
    if isinstance(kind, msgspec.inspect.IntType | msgspec.inspect.FloatType):
        return _bad(name, _number_requirement(name, kind, got), got=got)
    return _bad(name, f"is not valid: {message[: at.start()]}", got=got)


def _number_requirement(
    name: str, kind: msgspec.inspect.IntType | msgspec.inspect.FloatType, got: Any
) -> str:
    """``must be at least 0.01 s`` for a value below the bound, else the whole range."""
    unit = next((f" {u}" for s, u in _UNITS.items() if name.endswith(s)), "")
    low = (kind.ge, "at least") if kind.ge is not None else (kind.gt, "more than")
    high = (kind.le, "at most") if kind.le is not None else (kind.lt, "less than")
    try:
        number = float(got)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if low[0] is not None and (number < low[0] or (kind.gt is not None and number == kind.gt)):
        return f"must be {low[1]} {_number(low[0])}{unit}"
    if high[0] is not None and (number > high[0] or (kind.lt is not None and number == kind.lt)):
        return f"must be {high[1]} {_number(high[0])}{unit}"
    what = "a whole number" if isinstance(kind, msgspec.inspect.IntType) else "a number"
    if low[0] is not None and high[0] is not None:
        return f"must be {what} from {_number(low[0])} to {_number(high[0])}{unit}"
    if low[0] is not None:
        return f"must be {what}, {low[1]} {_number(low[0])}{unit}"
    return f"must be {what}{unit}"


_UNITS: Final = {"_ms": "ms", "_s": "s", "_bytes": "bytes"}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
