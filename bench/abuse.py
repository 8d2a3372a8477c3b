"""Attacks on the transport, measured against a real ``tracker serve`` child process.

    python -m bench.abuse h2stall --connections 10 --streams 5 --seconds 30
    python -m bench.abuse slowbody --connections 1100 --nofile 1024 --seconds 20 [--phase headers]
    python -m bench.abuse shutdown --write-timeout 26

* ``h2stall``: h2c connections whose streams never get flow-control window
  (``--window zero``: SETTINGS_INITIAL_WINDOW_SIZE=0; ``--window default``: 64 KiB, then
  no WINDOW_UPDATE), each opening ``--streams`` feeds while a fleet moves. The client
  reads every byte the server sends (so TCP never stalls), it just never grants window.
  Prints the server's RSS over time, and conflations from /metrics.
* ``slowbody``: ``--connections`` POST /session requests whose body (``--phase headers``:
  whose request head) arrives one byte every 3 s, against a server whose file limit is
  ``--nofile``; meanwhile /healthz is
  asked every second. Prints how many slow connections the server still holds and the
  /healthz latency (or timeout) over time.
* ``shutdown``: one HTTP/1.1 feed client that never reads (small SO_RCVBUF), a fleet
  moving, then SIGTERM: prints how long the server takes to exit.

``--json`` prints the figures as JSON instead; ``--versions`` adds library versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import msgspec
import trio

from bench.common import INGEST_HEADERS, UNLIMITED, rss_bytes, serving_url

BBOX = "13.30,52.48,13.50,52.56"
MIB = 1024 * 1024
STDERR = subprocess.DEVNULL


async def start_server(*options: str, nofile: int | None = None) -> tuple[trio.Process, str]:
    """``tracker serve`` in a child process (optionally under a lower file limit)."""
    command = [sys.executable, "-m", "tracker", "serve", *UNLIMITED, "--port", "0", *options]

    def limit_files() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, stderr=STDERR, preexec_fn=limit_files
    )
    url = await serving_url(process)
    return process, url.split("/feed")[0].rstrip("/")


async def drive_fleet(url: str, vehicles: int, period_s: float) -> None:
    """Post ``vehicles`` moving vehicles in Berlin every ``period_s``, until cancelled."""
    rng = random.Random(1)
    fleet = [[52.49 + rng.random() * 0.06, 13.32 + rng.random() * 0.16] for _ in range(vehicles)]
    encoder = msgspec.msgpack.Encoder()
    async with httpx.AsyncClient(base_url=url, headers=INGEST_HEADERS, timeout=10) as client:
        while True:
            now = time.time()
            for position in fleet:
                position[0] += rng.uniform(-1e-4, 1e-4)
                position[1] += rng.uniform(-1e-4, 1e-4)
            pings = [
                {"vehicle_id": f"v{i}", "lat": lat, "lon": lon, "ts": now}
                for i, (lat, lon) in enumerate(fleet)
            ]
            await client.post("/ingest", content=encoder.encode(pings))
            await trio.sleep(period_s)


async def metric(client: httpx.AsyncClient, name: str) -> float:
    """One sample of ``tracker_<name>`` from /metrics (-1 if absent)."""
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(f"tracker_{name} ") or line.startswith(f"tracker_{name}_total "):
            return float(line.split()[-1])
    return -1.0


# --- h2stall -----------------------------------------------------------------------------


async def stalled_h2_connection(url: str, streams: int, window: str, received: list[int]) -> None:
    """Open ``streams`` feeds on one h2c connection and never grant them window."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket()
    await sock.connect((host, int(port)))
    stream = trio.SocketStream(sock)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0} if window == "zero" else {}
    conn.initiate_connection()
    if settings:
        conn.update_settings(settings)
    for _ in range(streams):
        stream_id = conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":scheme", "http"), (":authority", host)]
        conn.send_headers(stream_id, [*headers, (":path", f"/feed?bbox={BBOX}")], end_stream=True)
    await stream.send_all(conn.data_to_send())
    while data := await stream.receive_some(65536):
        received[0] += len(data)
        try:
            conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            return
        if out := conn.data_to_send():  # settings acks and pings; never WINDOW_UPDATE
            await stream.send_all(out)


async def h2stall(args: argparse.Namespace) -> dict[str, Any]:
    process, url = await start_server("--tick", str(args.tick), *args.server_options)
    samples = []
    received = [0]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drive_fleet, url, args.vehicles, args.tick)
            await trio.sleep(2)
            before = rss_bytes(process.pid)
            for _ in range(args.connections):
                nursery.start_soon(stalled_h2_connection, url, args.streams, args.window, received)
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                started = time.monotonic()
                while (elapsed := time.monotonic() - started) < args.seconds:
                    await trio.sleep(min(5.0, args.seconds - elapsed))
                    samples.append(
                        {
                            "t_s": round(time.monotonic() - started, 1),
                            "rss_mib": round(rss_bytes(process.pid) / MIB, 1),
                            "conflations": await metric(client, "conflations"),
                            "subscribers": await metric(client, "subscribers"),
                            "client_received_kib": received[0] // 1024,
                        }
                    )
            nursery.cancel_scope.cancel()
    finally:
        process.kill()
        await process.wait()
    return {"rss_before_mib": round(before / MIB, 1), "samples": samples}


# --- slowbody ----------------------------------------------------------------------------


async def slow_body(url: str, held: list[int], gap_s: float, phase: str) -> None:
    """POST /session announcing a 1 KiB body, then send it one byte every ``gap_s``.

    With ``phase="headers"`` the request head itself trickles in, a byte every ``gap_s``.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        stream = await trio.open_tcp_stream(host, int(port))
    except OSError:
        return
    held[0] += 1
    try:
        head = (
            f"POST /session HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1024\r\n\r\n"
        )
        trickle = head.encode() + b" " * 1024
        if phase == "body":
            await stream.send_all(trickle[: len(head)])
            trickle = trickle[len(head) :]
        for byte in trickle:
            await stream.send_all(bytes([byte]))
            with trio.move_on_after(gap_s):
                if not await stream.receive_some(4096):
                    return  # the server answered and closed
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return
    finally:
        held[0] -= 1
        await stream.aclose()


async def slowbody(args: argparse.Namespace) -> dict[str, Any]:
    process, url = await start_server(*args.server_options, nofile=args.nofile)
    held = [0]
    samples = []
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            await client.get("/healthz")  # warm up: lazy imports must not meet EMFILE
        async with trio.open_nursery() as nursery:
            for _ in range(args.connections):
                nursery.start_soon(slow_body, url, held, 3.0, args.phase)
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < args.seconds:
                async with httpx.AsyncClient(base_url=url) as client:
                    asked = time.monotonic()
                    try:
                        status: int | str = (await client.get("/healthz", timeout=3)).status_code
                    except httpx.HTTPError as exc:
                        status = type(exc).__name__
                    latency = time.monotonic() - asked
                samples.append(
                    {
                        "t_s": round(elapsed, 1),
                        "slow_connections_open": held[0],
                        "healthz": status,
                        "healthz_ms": round(latency * 1000),
                    }
                )
                await trio.sleep(max(0.0, 1.0 - latency))
            nursery.cancel_scope.cancel()
    finally:
        process.kill()
        await process.wait()
    return {"samples": samples}


# --- shutdown ----------------------------------------------------------------------------


async def shutdown(args: argparse.Namespace) -> dict[str, Any]:
    options = ["--write-timeout", str(args.write_timeout), "--tick", "0.1"]
    process, url = await start_server(*options, *args.server_options)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drive_fleet, url, args.vehicles, 0.1)
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect((host, int(port)))
            request = f"GET /feed?bbox={BBOX} HTTP/1.1\r\nHost: {host}\r\n\r\n"
            await sock.send(request.encode())
            await trio.sleep(args.fill_s)  # the server's send buffer fills; we never read
            nursery.cancel_scope.cancel()
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        with trio.move_on_after(120):
            await process.wait()
        exit_s = time.monotonic() - sent
        sock.close()
    finally:
        process.kill()
        await process.wait()
    return {"exit_after_sigterm_s": round(exit_s, 2), "returncode": process.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("attack", choices=["h2stall", "slowbody", "shutdown"])
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--streams", type=int, default=5)
    parser.add_argument("--window", choices=["zero", "default"], default="zero")
    parser.add_argument("--vehicles", type=int, default=3000)
    parser.add_argument("--tick", type=float, default=0.2)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--nofile", type=int, default=None)
    parser.add_argument("--phase", choices=["body", "headers"], default="body")
    parser.add_argument("--write-timeout", type=float, default=26.0)
    parser.add_argument("--fill-s", type=float, default=3.0)
    parser.add_argument("--server-options", nargs=argparse.REMAINDER, default=[])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--versions", action="store_true")
    args = parser.parse_args()
    attack = {"h2stall": h2stall, "slowbody": slowbody, "shutdown": shutdown}[args.attack]
    result = trio.run(attack, args)
    if args.versions:
        result["versions"] = {
            "python": platform.python_version(),
            **{name: version(name) for name in ("hypercorn", "h2", "h11", "trio")},
        }
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        if key == "samples":
            for sample in value:
                print("  ".join(f"{k}={v}" for k, v in sample.items()))
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
