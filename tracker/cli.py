"""The ``tracker`` command: ``serve``, ``simulate``, ``demo``, ``token`` and ``revoke``.

Every option is generated from a field of a config Struct (``TrackerConfig``,
``FleetConfig``, ``SendConfig``), so flags, help, ``TRACKER_*`` environment variables and
validation are one list. Precedence: flag, then environment, then default. This module
is the only place that reads ``os.environ``.

``demo`` runs the server and the simulator in one nursery (``demo_nursery``): a signal
watcher, the server, and the simulator, which is cancelled first when shutdown begins
and begins it itself when its ``--duration`` is over (the server stops with it).

Secure by default: ``serve`` with no token secret or ingest key makes them up, prints an
admin URL with a token (as Jupyter does) and the ingest key; feeds need a token unless
``--open``. With the operator's own secrets nothing secret is printed: ``tracker token``
mints tokens. ``demo`` is open (it is for looking at) but its ingest still takes a key.

Errors a person can act on are one line on stderr, never a traceback: the option, what
is wrong and how to fix it. Exit status 2: the options are wrong (a bad value, missing
certificate files, a host that does not resolve); 1: the service could not start
(the port is in use, the address is not on this machine) or crashed.
"""

from __future__ import annotations

import argparse
import errno
import gc
import html
import logging
import os
import signal
import socket
import ssl
import sys
import tempfile
import types
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import httpx
import jwt
import msgspec
import trio

from simulator.city import City
from simulator.fleet import FleetConfig
from simulator.sender import SendConfig, Sender
from tracker.auth import Keyring, new_secret
from tracker.config import (
    BOOLEAN_WORDS,
    DEFAULT_HISTORY,
    DEFAULT_META,
    DEFAULT_REVOCATIONS,
    ENV_PREFIX,
    ConfigError,
    LogConfig,
    TrackerConfig,
    config_summary,
    convert,
    env_name,
    flag,
    load_config,
    parse_duration,
)
from tracker.devices.identity import Registry
from tracker.errors import TrackerError
from tracker.history.store import StoreError
from tracker.logs import configure_logging
from tracker.quic import QuicBindError
from tracker.server import serve
from tracker.service import CoreCrashed
from tracker.web import load_streets

__all__ = [
    "StartupError",
    "build_parser",
    "check_startup",
    "command_environ",
    "config_from",
    "iframe_snippet",
    "main",
]

logger = logging.getLogger(__name__)

SERVICE_DEFAULTS = {
    "HISTORY": DEFAULT_HISTORY,
    "REVOCATIONS_FILE": DEFAULT_REVOCATIONS,
    "META_FILE": DEFAULT_META,
}
"""What ``serve`` and ``demo`` change from the defaults: history kept in a local file (the
config's own default, history off, is for a tracker embedded in tests and benchmarks)."""
DEMO_DEFAULTS = {"VEHICLES": "2000", "OPEN_FEEDS": "true", "CORS_ORIGINS": "*"}
"""What ``demo`` changes from the defaults: a fleet to look at, readable by any page."""
TOKEN_SECRETS_HELP = (
    "Comma-separated secrets of the server's feed tokens: the first signs. Required: a "
    "token signed with any other secret does not verify."
)
ADMIN_TOKEN_TTL_S = 7 * 86_400
TOKEN_OPTIONS = ("token_secrets", "h3_resolution", "max_feed_cells")
EXAMPLE_BBOX = "13.30,52.48,13.50,52.56"


def _options(struct: type[msgspec.Struct]) -> list[tuple[str, type, Any, str]]:
    """(name, type, default, description) of every field of a config Struct."""
    hints = get_type_hints(struct, include_extras=True)
    rows = []
    for field in msgspec.structs.fields(struct):
        base, *meta = get_args(hints[field.name])
        if get_origin(base) in (Union, types.UnionType):  # "float | None" takes a float
            base = next(arg for arg in get_args(base) if arg is not type(None))
        description = next((m.description for m in meta if m.description), "")
        rows.append((field.name, base, field.default, description))
    return rows


def _add_options(
    parser: argparse.ArgumentParser,
    struct: type[msgspec.Struct],
    *,
    skip: Sequence[str] = (),
    only: Sequence[str] | None = None,
    defaults: Mapping[str, str] | None = None,
    descriptions: Mapping[str, str] | None = None,
) -> None:
    """One flag per field of ``struct``. ``defaults`` (``TRACKER_*`` names without the
    prefix, as :data:`DEMO_DEFAULTS`) and ``descriptions`` (by field) replace what the help
    says of some fields: a command whose defaults or meaning differ."""
    overrides = {k.lower(): v for k, v in (defaults or {}).items()}
    for name, kind, default, description in _options(struct):
        if name in skip or (only is not None and name not in only):
            continue
        shown = overrides.get(name, repr(default))
        description = (descriptions or {}).get(name, description)
        flags = ["--" + name.replace("_", "-")]
        if name.endswith("_s"):
            flags.append("--" + name[:-2].replace("_", "-"))
        if name == "open_feeds":
            flags.append("--open")
        accepted = f": {'/'.join(BOOLEAN_WORDS)}" if kind is bool else ""
        help_text = f"{description} [env {env_name(name)}{accepted}; default {shown}]"
        if kind is bool:
            parser.add_argument(*flags, dest=name, action="store_const", const=True, help=help_text)
        elif kind is float and name.endswith("_s"):  # seconds, or a duration: config parses it
            parser.add_argument(*flags, dest=name, metavar="SECONDS", help=help_text)
        else:
            parser.add_argument(
                *flags, dest=name, type=kind, metavar=kind.__name__.upper(), help=help_text
            )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one flag per config field, per command."""
    parser = argparse.ArgumentParser(
        prog="tracker",
        description="Real-time vehicle tracker: GPS pings in, live H3 area feeds out (SSE).",
        epilog="Every option can also be set with the environment variable shown in its "
        "help; a flag wins over the environment.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser = commands.add_parser(
        "serve", help="run the tracker HTTP service", description="Run the tracker service."
    )
    _add_options(serve_parser, TrackerConfig, defaults=SERVICE_DEFAULTS)
    _add_options(serve_parser, LogConfig)
    simulate_parser = commands.add_parser(
        "simulate",
        help="drive a simulated delivery fleet against a tracker",
        description="Simulate a logistics fleet and POST its pings to a running tracker.",
    )
    _add_options(simulate_parser, FleetConfig)
    _add_options(simulate_parser, SendConfig)
    _add_options(simulate_parser, LogConfig)
    demo_parser = commands.add_parser(
        "demo",
        help="run a tracker and a simulated fleet together (no configuration needed)",
        description="Run the tracker and a simulated fleet in one process.",
    )
    _add_options(demo_parser, TrackerConfig, defaults=SERVICE_DEFAULTS | DEMO_DEFAULTS)
    _add_options(demo_parser, FleetConfig, defaults=DEMO_DEFAULTS)
    _add_options(demo_parser, SendConfig, skip=("url", "ingest_key", "mqtt"))
    _add_options(demo_parser, LogConfig)
    token_parser = commands.add_parser(
        "token",
        help="mint a feed token and print feed and embed URLs with it",
        description="Mint a feed token signed with the server's first token secret.",
    )
    token_parser.add_argument(
        "--area",
        default="",
        help="what the token may watch, as a feed query: 'bbox=w,s,e,n', 'cells=...', "
        "'lat=..&lon=..&radius_m=..' (default: everything)",
    )
    token_parser.add_argument(
        "--admin",
        action="store_true",
        help="an admin token: sees every area and may change zones, webhooks and links "
        "(not with --area)",
    )
    token_parser.add_argument(
        "--vehicle",
        action="append",
        default=[],
        help="a tracking link: the token sees only this vehicle (wire id; repeat for more), "
        "wherever it goes (with --area: only inside it); revoke it with tracker revoke",
    )
    token_parser.add_argument(
        "--fleet",
        action="append",
        default=[],
        help="the token sees only this fleet's vehicles (repeat for more)",
    )
    token_parser.add_argument(
        "--ttl", default="1h", help="how long it is valid: 90s, 30m, 1h, 7d (default 1h)"
    )
    token_parser.add_argument(
        "--base-url",
        default="",
        help="the tracker's public URL in the printed URLs (default: http://HOST:PORT of "
        "TRACKER_HOST and TRACKER_PORT, https with TRACKER_CERTFILE; http://127.0.0.1:8000)",
    )
    _add_options(
        token_parser,
        TrackerConfig,
        only=TOKEN_OPTIONS,
        descriptions={"token_secrets": TOKEN_SECRETS_HELP},
    )
    revoke_parser = commands.add_parser(
        "revoke",
        help="revoke one token or tracking link on every instance, until it expires",
        description="Revoke a token by its id (jti, the id POST /links returns): DELETE "
        "/links/{id} on the running tracker, with an admin token minted from its secret.",
    )
    revoke_parser.add_argument("jti", help="the id of the token or link to revoke")
    revoke_parser.add_argument(
        "--base-url",
        default="",
        help="the tracker to ask (default: http://HOST:PORT of TRACKER_HOST and TRACKER_PORT)",
    )
    _add_options(
        revoke_parser,
        TrackerConfig,
        only=TOKEN_OPTIONS,
        descriptions={"token_secrets": TOKEN_SECRETS_HELP},
    )
    return parser


def _values(
    struct: type[msgspec.Struct], args: argparse.Namespace, environ: Mapping[str, str]
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, *_ in _options(struct):
        env_value = environ.get(env_name(name))
        if env_value is not None:
            values[name] = env_value
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    return values


def config_from(args: argparse.Namespace, environ: Mapping[str, str]) -> TrackerConfig:
    """The tracker config: flags over ``TRACKER_*`` environment over defaults, validated."""
    return load_config(_values(TrackerConfig, args, environ))


def _struct_from(
    struct: type[msgspec.Struct], args: argparse.Namespace, environ: Mapping[str, str]
) -> Any:
    return convert(struct, _values(struct, args, environ))


class StartupError(Exception):
    """The service could not start for a reason outside its options (exit status 1)."""


def check_startup(config: TrackerConfig) -> None:
    """What can be checked before starting: the host resolves, the devices file reads, the
    streets file loads, TLS files load as a pair.

    Raises :class:`ConfigError` naming the option, so that a typo ends in one line
    instead of a traceback from deep inside the server.
    """
    try:
        socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ConfigError(
            f"{flag('host')} {config.host!r} is neither an IP address nor a name this machine "
            f"resolves ({env_name('host')}); 127.0.0.1 serves this machine only, 0.0.0.0 "
            "every interface"
        ) from None
    Registry.for_config(config)  # the devices file reads and holds fleets
    if config.streets_file:
        load_streets(config.streets_file)
    if not config.certfile:
        return
    for name in ("certfile", "keyfile"):
        path = getattr(config, name)
        if not os.path.isfile(path):
            raise ConfigError(f"{flag(name)} {path!r}: no such file ({env_name(name)})")
        if not os.access(path, os.R_OK):
            raise ConfigError(
                f"{flag(name)} {path!r}: this user may not read it ({env_name(name)})"
            )
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            config.certfile, config.keyfile
        )
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{flag('certfile')} and {flag('keyfile')} must be a PEM certificate and its "
            f"private key ({env_name('certfile')}, {env_name('keyfile')}): "
            f"{exc.reason or exc}"
        ) from None


def _startup_failure(exc: BaseException, config: TrackerConfig) -> str | None:
    """One line saying why the server could not start (listen, or open its history
    store), if that is what ``exc`` is."""
    where = f"{config.host} port {config.port}"
    port, host = (
        f"({flag('port')}, {env_name('port')})",
        f"({flag('host')}, {env_name('host')})",
    )
    for leaf in _leaves(exc):
        if isinstance(leaf, StoreError):
            return (
                f"cannot open the history store ({flag('history')}, {env_name('history')}): {leaf}"
            )
        if isinstance(leaf, QuicBindError):
            return str(leaf)
        if not isinstance(leaf, OSError):
            continue
        if leaf.errno == errno.EADDRINUSE:
            return (
                f"cannot listen on {where}: it is in use {port}; stop the other server or "
                f"choose another port ({flag('port')} 0 takes any free one)"
            )
        if leaf.errno == errno.EADDRNOTAVAIL:
            return (
                f"cannot listen on {where}: {config.host} is not an address of this machine "
                f"{host}; use 127.0.0.1, 0.0.0.0 or one of its addresses"
            )
        if leaf.errno == errno.EACCES:
            return (
                f"cannot listen on {where}: permission denied {port}; ports below 1024 need "
                "privileges, choose 1024 or above (the default is 8000)"
            )
    return None


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``exc`` itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _run_service(config: TrackerConfig, main: Callable[..., Awaitable[None]], *args: Any) -> None:
    """``trio.run(main, config, *args)`` after :func:`check_startup`; failures to listen
    become a :class:`StartupError`."""
    check_startup(config)
    try:
        trio.run(main, config, *args)
    except (OSError, StoreError, BaseExceptionGroup) as exc:
        reason = _startup_failure(exc, config)
        if reason is None:
            raise
        raise StartupError(reason) from None


async def _wait_for_signal(shutdown: trio.Event) -> None:
    """Set ``shutdown`` on SIGINT or SIGTERM; return once it is set (by us or anyone)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as watch_nursery:

            async def watch() -> None:
                async for signum in signals:
                    logger.info("%s received: shutting down", signal.Signals(signum).name)
                    shutdown.set()
                    return

            watch_nursery.start_soon(watch)
            await shutdown.wait()
            watch_nursery.cancel_scope.cancel()


def _secured(config: TrackerConfig) -> tuple[TrackerConfig, list[str]]:
    """The config with a token secret and an ingest key, made up where none was given.

    Also returns what the operator needs to hear about them: the made-up ingest key (a
    configured one is theirs already, and is not echoed to logs).
    """
    notes = []
    changes: dict[str, str] = {}
    if not config.token_secret_list:
        changes["token_secrets"] = new_secret()
    if not config.ingest_key_list:
        changes["ingest_keys"] = new_secret()
        notes.append(
            f"tracker: ingest key (send it as X-Ingest-Key; --ingest-keys sets your own): "
            f"{changes['ingest_keys']}"
        )
    return msgspec.structs.replace(config, **changes), notes


def _admin_lines(config: TrackerConfig, url: str, *, secret_made_up: bool) -> list[str]:
    """How to look at the feeds: the open feed, an admin token, or how to mint one.

    An admin token is printed only for a secret this process made up (development): such
    a token dies with the process. With the operator's own secrets it would land in system
    logs and stay valid for days, revocable only by rotating the secret; they are told how
    to mint one instead.
    """
    feed = f"{url}/feed?bbox={EXAMPLE_BBOX}&format=json"
    if config.open_feeds:
        return [f"tracker: feeds are open to anyone: the map {url}/   curl -N '{feed}'"]
    if not secret_made_up:
        return [
            "tracker: feeds need a token; mint one with the same TRACKER_TOKEN_SECRETS:",
            f"  tracker token --area 'bbox={EXAMPLE_BBOX}' --ttl 1h --base-url {url}",
        ]
    token = Keyring.for_config(config).mint(ttl_s=ADMIN_TOKEN_TTL_S, admin=True)
    return [
        "tracker: feeds need a token; this admin token sees every area for 7 days or until "
        "the server stops (keep it secret; tracker token mints narrower ones):",
        f"  {url}/?token={token}",
        f"  curl -N '{feed}&token={token}'",
    ]


async def _serve_until_signalled(config: TrackerConfig) -> None:
    secret_made_up = not config.token_secret_list
    config, notes = _secured(config)
    shutdown = trio.Event()
    async with trio.open_nursery() as main_nursery:
        main_nursery.start_soon(_wait_for_signal, shutdown)
        binds = await main_nursery.start(serve, config, shutdown)
        logger.info("serving on %s", " ".join(binds), extra=config_summary(config))
        for url in binds:
            print(f"tracker: serving on {url}  (feeds: {url}/feed?bbox=..., ingest: {url}/ingest)")
        for line in [*_admin_lines(config, binds[0], secret_made_up=secret_made_up), *notes]:
            print(line)
        print("tracker: press Ctrl-C to stop", flush=True)
    logger.info("stopped")
    print("tracker: stopped", flush=True)


async def _simulate_until_signalled(fleet: FleetConfig, send: SendConfig) -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as main_nursery:
        main_nursery.start_soon(_wait_for_signal, shutdown)
        await _run_until(shutdown, Sender(fleet, send).run)
        main_nursery.cancel_scope.cancel()


async def _run_until(shutdown: trio.Event, job: Callable[[], Awaitable[None]]) -> None:
    """Run ``job()`` until it returns or ``shutdown`` is set, whichever comes first."""
    async with trio.open_nursery() as job_nursery:

        async def job_then_stop() -> None:
            await job()
            job_nursery.cancel_scope.cancel()

        job_nursery.start_soon(job_then_stop)
        await shutdown.wait()
        job_nursery.cancel_scope.cancel()


async def _demo(config: TrackerConfig, fleet: FleetConfig, send: SendConfig) -> None:
    secret_made_up = not config.token_secret_list
    config, _ = _secured(config)
    shutdown = trio.Event()
    async with trio.open_nursery() as demo_nursery:
        demo_nursery.start_soon(_wait_for_signal, shutdown)
        (url, *_) = await demo_nursery.start(serve, config, shutdown)
        logger.info("serving on %s", url, extra=config_summary(config))
        lat, lon = fleet.center_lat, fleet.center_lon
        print(f"tracker demo: serving on {url} with {fleet.vehicles} simulated vehicles")
        print(f"  the map:     {url}/")
        print(f"  watch them:  curl -N '{url}/feed?lat={lat}&lon={lon}&radius_m=3000&format=json'")
        print(f"  health:      {url}/healthz   metrics: {url}/metrics")
        if not config.open_feeds:
            print("\n".join(_admin_lines(config, url, secret_made_up=secret_made_up)))
        print("tracker demo: press Ctrl-C to stop", flush=True)
        key = config.ingest_key_list[0]
        to = {"url": url, "ingest_key": key} | ({"mqtt": config.mqtt} if config.mqtt else {})
        sender = Sender(fleet, msgspec.structs.replace(send, **to))
        demo_nursery.start_soon(_drive_then_stop, shutdown, sender)
    logger.info("stopped")
    print("tracker demo: stopped", flush=True)


async def _drive_then_stop(shutdown: trio.Event, sender: Sender) -> None:
    """Run the demo's fleet until shutdown; when its ``--duration`` is over, stop it all."""
    await _run_until(shutdown, sender.run)
    if not shutdown.is_set():
        logger.info("the simulated fleet's duration is over: shutting down")
        shutdown.set()


GC_THRESHOLDS = (100_000, 50, 1000)
"""Collector thresholds for serving processes (CPython's default is (700, 10, 10))."""


def _tune_garbage_collector() -> None:
    """Make the cyclic garbage collector run far less often in a serving process.

    A tracker allocates a few objects per ping and holds one long-lived object per vehicle.
    With the default thresholds the collector runs every 700 allocations and keeps
    rescanning those vehicles: at 100k vehicles pinging at 1 Hz that cost more CPU than
    ingest itself and made the tracker fall behind (measured, docs/performance.md). Our
    objects rarely form cycles, so collecting less often frees the same memory.
    """
    gc.set_threshold(*GC_THRESHOLDS)


MAX_TTL_S = 3650 * 86_400
"""Longest ``--ttl``: ten years (a token's ``exp`` must stay a date every client can read)."""


def _parse_ttl(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``30m``, ``1h`` or ``7d``: positive, at most ten years."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise ConfigError(f"--ttl {text!r} is not a duration like 90s, 30m, 1h or 7d") from None
    if seconds < 1:
        raise ConfigError(f"--ttl {text!r} must be positive: at least 1s (say 90s, 1h or 7d)")
    if seconds > MAX_TTL_S:
        raise ConfigError(f"--ttl {text!r} must be at most 3650d (ten years)")
    return seconds


def _base_url(config: TrackerConfig) -> str:
    """Where the configured server is reached from this machine (``--base-url``'s default)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(config.host, config.host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if config.certfile else "http"
    return f"{scheme}://{host}:{config.port}"


def iframe_snippet(embed_url: str) -> str:
    """The HTML that puts ``embed_url`` on another page (``docs/web-client.md`` shows it)."""
    return (
        f'<iframe src="{html.escape(embed_url)}" width="600" height="400" style="border:0" '
        'title="Live fleet map"></iframe>'
    )


def _mint(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """``tracker token``: a token for an area and the URLs that use it."""
    config = config_from(args, environ)
    if not config.token_secret_list:
        raise ConfigError(
            "no token secret: set TRACKER_TOKEN_SECRETS (or --token-secrets) to the "
            "server's secret; a secret made up by tracker serve dies with the server"
        )
    if args.admin and (args.area or args.vehicle or args.fleet):
        raise ConfigError(
            "--admin with --area, --vehicle or --fleet: an admin token sees every area"
        )
    if args.vehicle and args.fleet:
        raise ConfigError("--vehicle or --fleet, not both")
    area = urllib.parse.parse_qs(args.area, keep_blank_values=True) if args.area else None
    try:
        token = Keyring.for_config(config).mint(
            ttl_s=_parse_ttl(args.ttl),
            area=area,
            admin=args.admin,
            vehicles=args.vehicle or None,
            fleets=args.fleet or None,
        )
    except TrackerError as exc:
        raise ConfigError(f"--area, --vehicle or --fleet: {exc.message}") from exc
    base = (args.base_url or _base_url(config)).rstrip("/")
    query = f"{args.area}&" if args.area else f"bbox={EXAMPLE_BBOX}&"
    if args.vehicle:  # a tracking link: its page follows the vehicle, no area needed
        query = f"{args.area}&" if args.area else ""
        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
        print(f"id:     {jti}  (tracker revoke {jti})", file=sys.stderr)
    print(token)
    print(f"feed:   {base}/feed?{query}token={token}")
    print(f"embed:  {base}/embed?{query}token={token}")
    print(f"iframe: {iframe_snippet(f'{base}/embed?{query}token={token}')}")


def _revoke(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``tracker revoke``: ``DELETE /links/{jti}`` on the running tracker, as an admin."""
    config = config_from(args, environ)
    if not config.token_secret_list:
        raise ConfigError("no token secret: set TRACKER_TOKEN_SECRETS to the server's secret")
    admin = Keyring.for_config(config).mint(ttl_s=60, admin=True)
    base = (args.base_url or _base_url(config)).rstrip("/")
    url = f"{base}/links/{urllib.parse.quote(args.jti, safe='')}"
    try:
        reply = httpx.delete(url, headers={"Authorization": f"Bearer {admin}"}, timeout=10)
    except httpx.HTTPError as exc:
        print(f"tracker: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    print(reply.text)
    return 0 if reply.status_code == 200 else 1


def command_environ(command: str, environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` over the defaults of ``command`` (:data:`SERVICE_DEFAULTS` for serve and
    demo, :data:`DEMO_DEFAULTS` too for demo), as ``TRACKER_*`` variables."""
    defaults = {"serve": SERVICE_DEFAULTS, "demo": SERVICE_DEFAULTS | DEMO_DEFAULTS}
    return {ENV_PREFIX + k: v for k, v in defaults.get(command, {}).items()} | dict(environ)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tracker`` console script."""
    args = build_parser().parse_args(argv)
    _tune_garbage_collector()
    try:
        if args.command not in ("token", "revoke"):
            logs = _struct_from(LogConfig, args, os.environ)
            configure_logging(level=logs.log_level, log_format=logs.log_format)
        environ = command_environ(args.command, os.environ)
        if args.command == "serve":
            _run_service(config_from(args, environ), _serve_until_signalled)
        elif args.command == "simulate":
            fleet = _struct_from(FleetConfig, args, os.environ)
            trio.run(_simulate_until_signalled, fleet, _struct_from(SendConfig, args, os.environ))
        elif args.command == "token":
            _mint(args, os.environ)
        elif args.command == "revoke":
            return _revoke(args, os.environ)
        else:
            fleet = _struct_from(FleetConfig, args, environ)
            with tempfile.TemporaryDirectory(prefix="tracker-demo-") as scratch:
                streets = {env_name("streets_file"): _write_streets(fleet, Path(scratch))}
                environ = streets | environ
                config, send = config_from(args, environ), _struct_from(SendConfig, args, environ)
                if send.protocol == "owntracks-mqtt" and not config.mqtt:
                    raise ConfigError(
                        f"demo --protocol owntracks-mqtt needs {flag('mqtt')} ({env_name('mqtt')})"
                        ": the broker the simulator publishes to and the tracker subscribes to"
                    )
                _run_service(config, _demo, fleet, send)
    except ConfigError as exc:
        print(f"tracker: bad configuration: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"tracker: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        return _crashed(group)
    except CoreCrashed as exc:
        return _crashed(exc)
    return 0


def _write_streets(fleet: FleetConfig, directory: Path) -> str:
    """The demo city's streets as a GeoJSON file in ``directory``, for the map to draw."""
    city = City(fleet.center_lat, fleet.center_lon, fleet.radius_m, fleet.seed)
    path = directory / "streets.geojson"
    path.write_bytes(msgspec.json.encode(city.streets()))
    return str(path)


def _crashed(error: BaseException) -> int:
    """Exit status 1 for a core crash (its traceback is already logged); else re-raise."""
    if isinstance(error, BaseExceptionGroup):
        crashed, rest = error.split(CoreCrashed)
        if crashed is None or rest is not None:
            raise error
    print("tracker: stopped after a core task crashed (the log above says why)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
