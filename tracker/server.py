"""Serving the app on Hypercorn's Trio machinery, in this process, with a deadline shutdown.

:func:`serve` starts the core (:meth:`Tracker.run`) and then the HTTP server, both in its
``service_nursery``, and runs until ``shutdown`` is set; then it begins the core's shutdown
(:meth:`Tracker.shutdown`: not ready, every feed ends with a final event), stops
accepting, and gives open responses ``shutdown_grace_s``: after that everything left is
cancelled and every socket write still blocked (a client that stopped reading) is
abandoned, so the process exits within the grace period whatever clients do. Only then
is the core stopped. If a core task crashes, the nursery cancels the HTTP server and the
error is raised out of :func:`serve`: the process exits non-zero rather than stay
half-alive.

The HTTP server is Hypercorn's ``worker_serve`` (0.18) cut down to what we use (TCP, one
worker; QUIC from tracker.quic) and built from ``tracker.transport``'s connections, which add the
connection cap, abortable writes, bounded HTTP/2 flow control and secured error
responses. Its nurseries: ``lifespan_nursery`` (the ASGI lifespan), ``server_nursery``
(one task per connection), ``accept_nursery`` (the accept loops, until shutdown): one for
the main port and, with ``--osmand-port``, one for the OsmAnd listener, whose connections
are the same but serve only ``/osmand`` (``tracker.devices.routes.OsmAndOnly``).

Listening sockets get two options that every accepted connection inherits:

* ``TCP_USER_TIMEOUT = write_timeout_s``: bytes (heartbeats included) that a peer does not
  acknowledge within this time make the kernel abort the connection. This is the write
  timeout that reaps dead peers (half-open TCP); HTTP/2 streams that get no window are
  reaped after the same time by ``tracker.h2flow``.
* ``SO_SNDBUF = sndbuf_bytes``: bounds the kernel memory a stalled client can pin.

The app runs behind :class:`~tracker.proxies.TrustedProxies`, which takes the client's
address and scheme from the forwarded headers of ``trusted_proxies`` only.
"""

from __future__ import annotations

import functools
import socket
import sys

import trio
from hypercorn.config import Sockets
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState, LifespanState
from hypercorn.utils import repr_socket_addr, wrap_app

from tracker.app import create_app
from tracker.config import TrackerConfig
from tracker.devices.routes import OsmAndOnly
from tracker.logs import AccessLog
from tracker.loopwatch import LoopWatch
from tracker.proxies import TrustedProxies
from tracker.quic import bind_quic, serve_quic
from tracker.service import Tracker
from tracker.transport import (
    Connection,
    ConnectionGate,
    TransportConfig,
    WriteAborts,
    connection_limit,
)

__all__ = ["SWITCH_INTERVAL_S", "serve"]

SWITCH_INTERVAL_S = 0.001
"""How long a thread holding the GIL keeps it from one that waits (CPython: 5 ms) while
serving. The event loop holds the GIL most of the time under full ingest; the threads a
history answer passes through (the reader pool's feeder and manager threads, then the
loop again) each waited up to 5 ms for it: a day track's hop to a reader process took
39 ms p50 with 5 ms and 29 ms with 1 ms (docs/performance.md, history queries)."""


class _SwitchInterval:
    """:data:`SWITCH_INTERVAL_S` while any tracker serves in this process; the
    interpreter's own interval again once the last one stops (trackers may overlap, as
    two instances in one test do, and stop in any order)."""

    def __init__(self) -> None:
        self._serving = 0
        self._saved = sys.getswitchinterval()

    def enter(self) -> None:
        if not self._serving:
            self._saved = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._serving += 1

    def exit(self) -> None:
        self._serving -= 1
        if not self._serving:
            sys.setswitchinterval(self._saved)


_switch = _SwitchInterval()


class _TunedConfig(TransportConfig):
    """The transport config, plus our socket options on every listening socket."""

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            _tune_socket(sock, self.tracker)
            sock.listen(self.backlog)
        return sockets


def _tune_socket(sock: socket.socket, config: TrackerConfig) -> None:
    """Set the per-connection write timeout and send-buffer bound (inherited on accept)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        timeout_ms = max(1, round(config.write_timeout_s * 1000))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout_ms)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.sndbuf_bytes)


def _listeners(config: _TunedConfig) -> tuple[list[trio.abc.Listener[trio.abc.Stream]], list[str]]:
    """Listeners on every configured address (TLS ones if a certificate is set), and URLs."""
    sockets = config.create_sockets()
    ssl_context = config.create_ssl_context()
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
    binds = []
    for sock in sockets.secure_sockets:
        plain = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        assert ssl_context is not None
        listeners.append(trio.SSLListener(plain, ssl_context, https_compatible=True))
        binds.append(f"https://{repr_socket_addr(sock.family, sock.getsockname())}")
    for sock in sockets.insecure_sockets:
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
    return listeners, binds


async def serve(
    config: TrackerConfig,
    shutdown: trio.Event,
    *,
    tracker: Tracker | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown`` is set; reports the bound URLs through ``task_status``.

    Returns at most ``shutdown_grace_s`` after ``shutdown`` (plus the app's own shutdown);
    raises whatever crashed the core (see the module docstring).
    """
    core = tracker or Tracker(config)
    app: ASGIFramework = create_app(core)
    if config.access_log:
        app = AccessLog(app)
    app = TrustedProxies(app, config.trusted_proxy_list)  # outermost: the log sees the client
    watch = LoopWatch()
    watch.install(core.metrics)
    _switch.enter()
    try:
        async with trio.open_nursery() as service_nursery:
            await service_nursery.start(core.run)
            await _serve_http(
                app,
                core,
                shutdown,
                task_status=task_status,
            )
            service_nursery.cancel_scope.cancel()
    finally:
        _switch.exit()
        watch.uninstall()


async def _serve_http(
    app: ASGIFramework,
    core: Tracker,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """Hypercorn's worker loop: accept until ``shutdown``, then the grace, then cancel."""
    config = core.config
    transport = _TunedConfig(config, core.metrics)
    asgi = wrap_app(app, transport.wsgi_max_body_size, "asgi")
    osmand_asgi = wrap_app(OsmAndOnly(app), transport.wsgi_max_body_size, "asgi")
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(asgi, transport, lifespan_state)
    context = WorkerContext(None)
    aborts = WriteAborts()
    gate = ConnectionGate(connection_limit(config), core.metrics)
    core.metrics.gauges["connections"] = ("Open client connections.", lambda: gate.open_count)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            served = [(asgi, *_listeners(transport))]
            if config.osmand_port:  # the same connections, serving only /osmand
                osmand = _TunedConfig(config, core.metrics, port=config.osmand_port)
                served.append((osmand_asgi, *_listeners(osmand)))
            for served_app, _, binds in served:
                for bind in binds:  # as Hypercorn logs it (on the hypercorn.error logger)
                    what = "OsmAnd protocol" if served_app is osmand_asgi else "Running"
                    await transport.log.info(f"{what} on {bind} (CTRL + C to quit)")
            if config.quic_bind:  # HTTP/3 (tracker.quic); sets Alt-Svc before TCP answers
                quic_socket = bind_quic(transport)
                await server_nursery.start(
                    functools.partial(
                        serve_quic,
                        asgi,
                        transport,
                        context,
                        ConnectionState(lifespan_state.copy()),
                        quic_socket,
                        gate=gate,
                    )
                )
                quic_at = repr_socket_addr(quic_socket.family, quic_socket.getsockname())
                await transport.log.info(f"Running on https://{quic_at} (QUIC)")
            task_status.started(served[0][2])
            try:
                async with trio.open_nursery() as accept_nursery:
                    for served_app, listeners, _ in served:
                        handler = functools.partial(
                            Connection,
                            served_app,
                            transport,
                            context,
                            ConnectionState(lifespan_state.copy()),
                            gate=gate,
                            aborts=aborts,
                        )
                        accept_nursery.start_soon(
                            functools.partial(
                                trio.serve_listeners,
                                handler,
                                listeners,
                                handler_nursery=server_nursery,
                            )
                        )
                    await shutdown.wait()
                    core.shutdown()  # not ready; every feed sends its final event and ends
                    accept_nursery.cancel_scope.cancel()
            finally:
                await context.terminated.set()
                deadline = trio.current_time() + config.shutdown_grace_s
                server_nursery.cancel_scope.deadline = deadline
                aborts.abort_at(deadline)
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
