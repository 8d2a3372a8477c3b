"""The ``tracker`` command: options, environment, validation, and a real serve/stop cycle."""

from __future__ import annotations

import httpx
import pytest

from tests.processes import tracker_process
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
    async with tracker_process("serve", "--port", "0", "--tick", "0.1", timeout=20) as tracker:
        async with httpx.AsyncClient(base_url=tracker.url) as client:
            assert (await client.get("/healthz")).json()["status"] == "ok"
        assert await tracker.interrupt(timeout=15) == 0
    assert b"tracker: stopped" in tracker.output
    assert b"Traceback" not in tracker.output
