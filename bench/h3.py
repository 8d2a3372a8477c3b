"""HTTP/3 load and cost: server CPU per feed per tick over HTTP/1.1, HTTP/2 and HTTP/3.

    python -m bench.h3 --feeds 300 --vehicles 2000 --seconds 10

Starts ``tracker serve`` in a child process with a throwaway certificate (trustme) and
``--quic-bind``, moves ``--vehicles`` vehicles every tick, and then, one transport at a
time, opens ``--feeds`` feeds over HTTP/1.1 (TLS), HTTP/2 (TLS) and HTTP/3 (QUIC), each
on its own connection and a random city viewport, reads them for ``--seconds`` and
reads the server's CPU time from ``/proc``. A phase with no feed first gives the cost of
the fleet alone; each transport's cost per feed per tick is its CPU above that, divided
by feeds and ticks. Every event of every feed is read and split; batches are counted.

:class:`H3Client` is a small HTTP/3 client on aioquic's sans-IO QUIC and H3 connections,
driven by Trio over a UDP socket; ``tests/test_http3.py`` uses it too. ``credit=False``
makes a client that never grants its peer more flow-control credit than its first
window: a feed to it stalls as to a client that stopped reading.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
import trustme
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, StreamReset

from bench.common import UNLIMITED, cpu_seconds, serving_url, viewport
from bench.feed_bytes import drive_fleet

__all__ = ["H3Client", "H3Response", "split_events"]


class _NoCreditConnection(QuicConnection):
    """A client connection that never raises a stream's flow-control window."""

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        return


@dataclass
class H3Response:
    """One request's response: status and headers, then its body as it arrives."""

    stream_id: int
    client: H3Client
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: bool = False
    headed: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def end(self, *, reset: bool = False) -> None:
        """The response is over: complete, reset by the server, or its connection closed."""
        self.ended = True
        self.reset = self.reset or reset
        self.headed.set()
        self._notify()

    async def read(self) -> bytes:
        """The body bytes received since the last read; b"" once the response ended."""
        while not self.body and not self.ended:
            await self.changed.wait()
        data = bytes(self.body)
        self.body.clear()
        return data

    async def read_all(self) -> bytes:
        """The whole (remaining) body."""
        chunks = []
        while chunk := await self.read():
            chunks.append(chunk)
        return b"".join(chunks)

    def cancel(self) -> None:
        """Abandon the response (STOP_SENDING and RESET_STREAM, H3_REQUEST_CANCELLED)."""
        self.client.cancel(self.stream_id)


class H3Client:
    """An HTTP/3 connection to one server; see the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        cafile: str,
        *,
        server_name: str = "localhost",
        credit: bool = True,
        window: int = 1024 * 1024,
    ) -> None:
        configuration = QuicConfiguration(
            is_client=True,
            alpn_protocols=H3_ALPN,
            server_name=server_name,
            max_stream_data=window,
        )
        configuration.load_verify_locations(cafile)
        kind = QuicConnection if credit else _NoCreditConnection
        self.quic = kind(configuration=configuration)
        self.h3 = H3Connection(self.quic)
        self.address = (host, port)
        self.connected = trio.Event()
        self.closed = trio.Event()
        self.close_code: int | None = None
        self.responses: dict[int, H3Response] = {}
        self._sock = trio.socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM
        )
        self._wait: trio.CancelScope | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, host: str, port: int, cafile: str, **options: Any
    ) -> AsyncIterator[H3Client]:
        """An open, handshaken connection for the ``async with`` block."""
        client = cls(host, port, cafile, **options)
        refused: ConnectionRefusedError | None = None
        async with trio.open_nursery() as nursery:
            await client._sock.connect(client.address)
            client.quic.connect(client.address, now=trio.current_time())
            nursery.start_soon(client._run)
            await client._transmit()
            try:
                with trio.fail_after(10):
                    await client._handshake()
            except ConnectionRefusedError as error:
                refused = error
                nursery.cancel_scope.cancel()
            else:
                try:
                    yield client
                finally:
                    client.quic.close()
                    with trio.CancelScope(shield=True):  # the server frees it at once
                        await client._transmit()
                    nursery.cancel_scope.cancel()
        client._sock.close()
        if refused is not None:
            raise refused

    async def _handshake(self) -> None:
        """Wait for the handshake; ConnectionRefusedError if the server closes instead."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._set_when, self.connected, nursery.cancel_scope)
            nursery.start_soon(self._set_when, self.closed, nursery.cancel_scope)
        if not self.connected.is_set():
            raise ConnectionRefusedError(f"the server closed the connection ({self.close_code})")

    @staticmethod
    async def _set_when(event: trio.Event, scope: trio.CancelScope) -> None:
        await event.wait()
        scope.cancel()

    async def request(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        authority: str = "localhost",
    ) -> H3Response:
        """Send a request; returns once its response headers arrived."""
        stream_id = self.quic.get_next_available_stream_id()
        response = self.responses[stream_id] = H3Response(stream_id, self)
        fields = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
            *((name.lower().encode(), value.encode()) for name, value in headers),
        ]
        self.h3.send_headers(stream_id, fields, end_stream=not body)
        if body:
            self.h3.send_data(stream_id, body, end_stream=True)
        await self._transmit()
        await response.headed.wait()
        return response

    def cancel(self, stream_id: int) -> None:
        """Abandon a request's stream."""
        with contextlib.suppress(ValueError, AssertionError):
            self.quic.stop_stream(stream_id, 0x10C)
            self.quic.reset_stream(stream_id, 0x10C)
        self._poke(trio.current_time())

    async def _run(self) -> None:
        while True:
            timer = self.quic.get_timer()
            data = None
            with trio.move_on_at(math.inf if timer is None else timer) as self._wait:
                data = await self._sock.recv(65536)
            self._wait = None
            now = trio.current_time()
            if data is not None:
                self.quic.receive_datagram(data, self.address, now=now)
            elif timer is not None and now >= timer:
                self.quic.handle_timer(now=now)
            self._handle_events()
            await self._transmit()

    def _handle_events(self) -> None:
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                self.connected.set()
            elif isinstance(event, ConnectionTerminated):
                self.close_code = event.error_code
                self.closed.set()
                for response in self.responses.values():
                    response.end()
            elif isinstance(event, StreamReset) and event.stream_id in self.responses:
                self.responses[event.stream_id].end(reset=True)
            for h3_event in self.h3.handle_event(event):
                if isinstance(h3_event, HeadersReceived | DataReceived):
                    self._apply(h3_event)

    def _apply(self, event: HeadersReceived | DataReceived) -> None:
        response = self.responses.get(event.stream_id)
        if response is None:
            return
        if isinstance(event, HeadersReceived) and not response.headed.is_set():
            fields = dict(event.headers)
            response.status = int(fields.pop(b":status", b"0"))
            response.headers = fields
            response.headed.set()
        elif isinstance(event, DataReceived):
            response.body += event.data
        if event.stream_ended:
            response.end()
        response._notify()

    async def _transmit(self) -> None:
        for data, _ in self.quic.datagrams_to_send(now=trio.current_time()):
            with contextlib.suppress(OSError):
                await self._sock.send(data)
        timer = self.quic.get_timer()
        if timer is not None:
            self._poke(timer)

    def _poke(self, when: float) -> None:
        if self._wait is not None:
            self._wait.deadline = min(self._wait.deadline, when)


def split_events(buffer: bytearray) -> list[bytes]:
    """Take the complete SSE events (up to a blank line) out of ``buffer``."""
    *events, rest = bytes(buffer).split(b"\n\n")
    buffer[:] = rest
    return events


def event_fields(event: bytes) -> tuple[str, str]:
    """An SSE event's name and its data (lines joined by newlines)."""
    name, data = "message", []
    for line in event.decode().split("\n"):
        key, _, value = line.partition(": ")
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
    return name, "\n".join(data)


# The benchmark.

TRANSPORTS = ("h1", "h2", "h3")


@dataclass
class Counts:
    """What the feeds of one phase received."""

    bytes: int = 0
    batches: int = 0
    errors: list[str] = field(default_factory=list)


def _certificate(directory: Path) -> tuple[str, str, str]:
    """A CA file, a certificate and key for 127.0.0.1/localhost, written to ``directory``."""
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1", "localhost")
    paths = [directory / name for name in ("ca.pem", "cert.pem", "key.pem")]
    authority.cert_pem.write_to_path(paths[0])
    cert.private_key_and_cert_chain_pem.write_to_path(paths[1])
    cert.private_key_pem.write_to_path(paths[2])
    return str(paths[0]), str(paths[1]), str(paths[2])


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _count(read: Any, counts: Counts) -> None:
    """Read a feed until cancelled: every byte, every event split, batches counted."""
    buffer = bytearray()
    while chunk := await read():
        counts.bytes += len(chunk)
        buffer += chunk
        counts.batches += sum(e.startswith(b"event: batch") for e in split_events(buffer))
    counts.errors.append("feed ended")


async def _feed(
    transport: str,
    target: tuple[str, int],
    query: str,
    cafile: str,
    counts: Counts,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One feed on its own connection, reported started once its headers arrived."""
    url, port = target
    try:
        if transport == "h3":
            async with H3Client.connect("127.0.0.1", port, cafile) as client:
                response = await client.request("GET", f"/feed?{query}")
                task_status.started()
                await _count(response.read, counts)
            return
        http2 = transport == "h2"
        async with (
            httpx.AsyncClient(
                base_url=url, http1=not http2, http2=http2, verify=cafile, timeout=None
            ) as client,
            client.stream("GET", f"/feed?{query}") as response,
        ):
            task_status.started()
            chunks = response.aiter_raw()
            await _count(functools.partial(anext, chunks, b""), counts)
    except (OSError, httpx.HTTPError, trio.TooSlowError) as error:
        counts.errors.append(repr(error)[:200])
        task_status.started()


async def _phase(
    transport: str,
    args: argparse.Namespace,
    target: tuple[str, int],
    cafile: str,
    pid: int,
) -> dict[str, Any]:
    """Open ``--feeds`` feeds over ``transport`` (none: no feed), all of them before the
    warm-up; then measure the server's CPU and the batches received over ``--seconds``."""
    rng = random.Random(11)
    counts = Counts()
    async with trio.open_nursery() as nursery:
        opening = trio.Semaphore(args.handshakes)

        async def open_one(query: str) -> None:
            async with opening:
                await nursery.start(_feed, transport, target, query, cafile, counts)

        async with trio.open_nursery() as openers:
            for _ in range(0 if transport == "none" else args.feeds):
                openers.start_soon(open_one, viewport(rng))
        opened = args.feeds - len(counts.errors) if transport != "none" else 0
        await trio.sleep(args.warmup)
        cpu_start, batches_start = cpu_seconds(pid), counts.batches
        await trio.sleep(args.seconds)
        cpu = cpu_seconds(pid) - cpu_start
        batches = counts.batches - batches_start
        nursery.cancel_scope.cancel()
    return {
        "cpu_s": cpu,
        "batches": batches,
        "feeds": opened,
        "errors": counts.errors[:3],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        cafile, certfile, keyfile = _certificate(Path(directory))
        port = _free_udp_port()
        command = [sys.executable, "-m", "tracker", "serve", *UNLIMITED, "--port", "0"]
        command += [
            "--certfile",
            certfile,
            "--keyfile",
            keyfile,
            "--tick",
            str(args.tick),
        ]
        command += ["--quic-bind", f"127.0.0.1:{port}", "--max-connections", "0"]
        async with trio.open_nursery() as nursery:
            run_process = functools.partial(
                trio.run_process,
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                check=False,
            )
            process: trio.Process = await nursery.start(run_process)
            url = await serving_url(process, scheme="https", timeout_s=30)
            nursery.start_soon(
                drive_fleet,
                url,
                args.vehicles,
                args.tick,
                trio.current_time() + 3600,
                cafile,
            )
            await trio.sleep(2)
            phases: dict[str, list[dict[str, Any]]] = {}
            for _ in range(args.rounds):
                for name in ("none", *args.transports):
                    phases.setdefault(name, []).append(
                        await _phase(name, args, (url, port), cafile, process.pid)
                    )
            nursery.cancel_scope.cancel()
    return _report(args, phases)


def _report(args: argparse.Namespace, phases: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    ticks = args.seconds / args.tick
    idle = statistics.median(p["cpu_s"] for p in phases["none"])
    result: dict[str, Any] = {
        "feeds": args.feeds,
        "vehicles": args.vehicles,
        "tick_s": args.tick,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "fleet_only_cpu_s": round(idle, 3),
        "machine": f"{platform.machine()} {platform.python_version()}",
    }
    for name in args.transports:
        runs = [p for p in phases[name] if p["feeds"]]
        costs = [(p["cpu_s"] - idle) / (p["feeds"] * ticks) * 1e6 for p in runs]
        delivered = [p["batches"] / (p["feeds"] * ticks) for p in runs]
        per_event = [(p["cpu_s"] - idle) / max(1, p["batches"]) * 1e6 for p in runs]
        result[name] = {
            "us_per_event_median": round(statistics.median(per_event), 1) if runs else None,
            "us_per_event_runs": [round(c, 1) for c in per_event],
            "us_per_feed_per_tick_median": round(statistics.median(costs), 1) if costs else None,
            "us_per_feed_per_tick_runs": [round(c, 1) for c in costs],
            "feeds_opened": [p["feeds"] for p in phases[name]],
            "batches_per_feed_per_tick": round(statistics.median(delivered), 2) if runs else None,
            "errors": [e for p in phases[name] for e in p["errors"]][:3],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--feeds", type=int, default=300)
    parser.add_argument("--vehicles", type=int, default=2000)
    parser.add_argument("--tick", type=float, default=0.2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    parser.add_argument(
        "--handshakes",
        type=int,
        default=8,
        help="connections opening at once (TLS handshakes)",
    )
    args = parser.parse_args()
    print(json.dumps(trio.run(run, args), indent=2))


if __name__ == "__main__":
    main()
