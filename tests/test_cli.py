"""The ``tracker`` command: options, environment, validation, and a real serve/stop cycle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
import trio

from tracker.cli import build_parser, config_from, main
from tracker.config import ConfigError, TrackerConfig


def test_serve_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for field in TrackerConfig.__struct_fields__:
        assert "--" + field.replace("_", "-") in text
        assert "TRACKER_" + field.upper() in text
    assert "--tick" in text and "--heartbeat" in text


def test_config_from_flags_over_environment_over_defaults() -> None:
    args = build_parser().parse_args(["serve", "--tick", "0.25"])
    env = {"TRACKER_TICK_S": "0.5", "TRACKER_PORT": "9001", "TRACKER_H3_RESOLUTION": "8"}
    config = config_from(args, env)
    assert config.tick_s == 0.25 and config.port == 9001 and config.h3_resolution == 8
    assert config.heartbeat_s == TrackerConfig().heartbeat_s


@pytest.mark.parametrize(
    "env",
    [
        {"TRACKER_PORT": "http"},
        {"TRACKER_H3_RESOLUTION": "5"},
        {"TRACKER_STALE_AFTER_S": "100", "TRACKER_REMOVE_AFTER_S": "50"},
        {"TRACKER_CERTFILE": "cert.pem"},
    ],
)
def test_config_from_rejects_bad_values(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        config_from(build_parser().parse_args(["serve"]), env)


async def test_tracker_serve_runs_and_stops_cleanly_on_sigint() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRACKER_PORT": "0"}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tracker", "serve", "--tick", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(20):
            while b"press Ctrl-C" not in output:
                chunk = await process.stdout.receive_some()
                assert chunk, output
                output += chunk
        url = next(word for word in output.decode().split() if word.startswith("http://127.0.0.1:"))
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/healthz")).json()["status"] == "ok"
        process.send_signal(signal.SIGINT)
        with trio.fail_after(15):
            while chunk := await process.stdout.receive_some():
                output += chunk
            assert await process.wait() == 0
        assert b"tracker: stopped" in output
        assert b"Traceback" not in output
    finally:
        process.kill()
