"""The ``tracker`` command: options, environment, validation, and a real serve/stop cycle."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import httpx
import jwt
import pytest

from tests.processes import run_tracker, tracker_process
from tracker.cli import build_parser, command_environ, config_from, main
from tracker.config import DEFAULT_HISTORY, ConfigError, TrackerConfig, config_summary


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


def test_config_from_takes_durations_for_every_seconds_option() -> None:
    args = build_parser().parse_args(["serve", "--history-retention", "30d", "--tick", "0.5"])
    config = config_from(args, {"TRACKER_STALE_AFTER_S": "2m", "TRACKER_REMOVE_AFTER_S": "1h"})
    assert config.history_retention_s == 30 * 86_400 and config.tick_s == 0.5
    assert (config.stale_after_s, config.remove_after_s) == (120, 3600)


@pytest.mark.parametrize("value", ["soon", "-1d", "0", "1e999", "12x"])
def test_config_from_explains_a_bad_duration(value: str) -> None:
    args = build_parser().parse_args(["serve", f"--history-retention={value}"])
    with pytest.raises(ConfigError, match=r"^--history-retention .*TRACKER_HISTORY_RETENTION_S"):
        config_from(args, {})


def test_history_is_a_local_file_for_serve_and_demo_and_off_elsewhere() -> None:
    for command in ("serve", "demo"):
        args = build_parser().parse_args([command])
        config = config_from(args, command_environ(command, {}))
        assert config.history_target == DEFAULT_HISTORY
        off = config_from(args, command_environ(command, {"TRACKER_HISTORY": "off"}))
        assert off.history_target == ""
    assert TrackerConfig().history_target == ""
    assert "TRACKER_VEHICLES" not in command_environ("serve", {})


@pytest.mark.parametrize(
    "value", ["history.sqlite3", "sqlite:/tmp/h.db", "postgresql://u:pw@db:5432/t", " OFF "]
)
def test_history_takes_a_path_or_a_postgresql_url(value: str) -> None:
    assert TrackerConfig(history=value).history_target == ("" if "OFF" in value else value)


@pytest.mark.parametrize(
    "value",
    [
        "sqlite:",
        "redis://u:hunter2@h/0",
        "postgresql://u:hunter2@h:99999/db",
        "postgresql://u:hunter2@h",
        "a\0b",
    ],
)
def test_history_explains_a_bad_value_in_one_line_without_the_password(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        TrackerConfig(history=value)
    message = str(raised.value)
    assert message.startswith("--history must be") and "(TRACKER_HISTORY)" in message
    assert "hunter2" not in message and "\n" not in message


def test_config_summary_hides_the_history_password() -> None:
    summary = config_summary(TrackerConfig(history="postgresql://u:hunter2@h/db"))
    assert summary["history"] == "postgresql://u:***@h/db"


async def test_tracker_serve_is_secure_by_default_and_stops_cleanly_on_sigint() -> None:
    """No configuration: it makes up a secret and a key, and prints what to use them with."""
    async with tracker_process("serve", "--port", "0", "--tick", "0.1", timeout=20) as tracker:
        text = tracker.output.decode()
        token = re.search(r"/\?token=(\S+)", text)
        key = re.search(r"ingest key .*: (\S+)", text)
        assert token and key, text
        async with httpx.AsyncClient(base_url=tracker.url) as client:
            assert (await client.get("/healthz")).json()["status"] == "ok"
            anonymous = await client.get("/feed?bbox=13.3,52.4,13.5,52.6&format=json")
            assert anonymous.status_code == 401
            async with client.stream(
                "GET", f"/feed?bbox=13.3,52.4,13.5,52.6&token={token[1]}"
            ) as feed:
                assert feed.status_code == 200
            keyless = await client.post("/ingest", json=[])
            keyed = await client.post("/ingest", json=[], headers={"X-Ingest-Key": key[1]})
            assert (keyless.status_code, keyed.status_code) == (401, 200)
        assert await tracker.interrupt(timeout=15) == 0
    assert b"tracker: stopped" in tracker.output
    assert b"Traceback" not in tracker.output


async def test_tracker_serve_with_configured_secrets_prints_no_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A printed token would land in system logs, revocable only by rotating the secret."""
    secret = "c" * 40
    monkeypatch.setenv("TRACKER_TOKEN_SECRETS", secret)
    async with tracker_process("serve", "--port", "0", "--tick", "0.1", timeout=20) as tracker:
        text = tracker.output.decode()
        assert "tracker token" in text, text
        assert "token=" not in text and "eyJ" not in text, text  # no JWT anywhere
        # What it says to run works against it.
        assert main(["token", "--ttl", "5m", "--base-url", tracker.url]) == 0
        token = capsys.readouterr().out.split()[0]
        async with (
            httpx.AsyncClient(base_url=tracker.url) as client,
            client.stream(
                "GET",
                "/feed?bbox=13.3,52.4,13.5,52.6",
                headers={"Authorization": f"Bearer {token}"},
            ) as feed,
        ):
            assert feed.status_code == 200
        assert await tracker.interrupt(timeout=15) == 0
    assert "eyJ" not in tracker.output.decode()


def test_token_command_mints_a_token_for_an_area(capsys: pytest.CaptureFixture[str]) -> None:
    secret = "k" * 40
    area = "bbox=13.38,52.51,13.42,52.53"
    argv = ["token", "--area", area, "--ttl", "2h", "--token-secrets", secret]
    assert main(argv) == 0
    token, feed, embed, iframe = capsys.readouterr().out.splitlines()
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert claims["area"] == {"bbox": ["13.38,52.51,13.42,52.53"]}
    assert 7100 < claims["exp"] - time.time() <= 7200
    assert feed.endswith(f"/feed?{area}&token={token}")
    assert embed.endswith(f"/embed?{area}&token={token}")
    assert feed.split()[1].startswith("http://127.0.0.1:8000/")
    snippet = iframe.removeprefix("iframe: ")
    assert snippet == (
        f'<iframe src="http://127.0.0.1:8000/embed?{area}&amp;token={token}" width="600" '
        'height="400" style="border:0" title="Live fleet map"></iframe>'
    )
    docs = (Path(__file__).parent.parent / "docs" / "web-client.md").read_text()
    shown = re.search(r"<iframe src=\"https://tracker.example/embed\?[^\"]*\"([^\n]*)", docs)
    assert shown and snippet.endswith(shown[1])  # what the docs show, closed


def test_token_command_mints_an_admin_token(capsys: pytest.CaptureFixture[str]) -> None:
    secret = "k" * 40
    assert main(["token", "--admin", "--token-secrets", secret]) == 0
    token = capsys.readouterr().out.splitlines()[0]
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert claims["admin"] is True and "area" not in claims
    assert main(["token", "--admin", "--area", "bbox=1,2,3,4", "--token-secrets", secret]) == 2
    assert "an admin token sees every area" in capsys.readouterr().err


def test_token_urls_follow_the_configured_port_and_scheme(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRACKER_TOKEN_SECRETS", "k" * 40)
    monkeypatch.setenv("TRACKER_PORT", "9100")
    assert main(["token"]) == 0
    assert "feed:   http://127.0.0.1:9100/feed?" in capsys.readouterr().out
    monkeypatch.setenv("TRACKER_HOST", "::")
    monkeypatch.setenv("TRACKER_CERTFILE", "cert.pem")
    monkeypatch.setenv("TRACKER_KEYFILE", "key.pem")
    assert main(["token"]) == 0
    assert "embed:  https://[::1]:9100/embed?" in capsys.readouterr().out
    assert main(["token", "--base-url", "https://tracker.example/"]) == 0
    assert "feed:   https://tracker.example/feed?" in capsys.readouterr().out


def test_token_and_demo_help_say_what_those_commands_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in (["token", "--help"], ["demo", "--help"], ["serve", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    token_help, demo_help, serve_help = (
        " ".join(part.split()) for part in capsys.readouterr().out.split("usage: ")[1:]
    )
    assert "a random secret" not in token_help and "Required" in token_help
    assert "TRACKER_PORT" in token_help and "http://127.0.0.1:8000" in token_help
    assert "TRACKER_VEHICLES; default 2000]" in demo_help
    assert "TRACKER_OPEN_FEEDS: true/false/1/0/yes/no; default true]" in demo_help
    assert "share/tracker/web" in serve_help


def test_demo_with_a_duration_stops_the_server_too() -> None:
    started = time.monotonic()
    result = run_tracker("demo", "--port", "0", "--duration", "2", "--vehicles", "20", timeout=30)
    assert result.returncode == 0, result.stderr
    assert "tracker demo: stopped" in result.stdout
    assert time.monotonic() - started < 20


@pytest.mark.parametrize(
    "argv",
    [
        ["token"],  # no secret
        ["token", "--token-secrets", "k" * 40, "--ttl", "soon"],
        ["token", "--token-secrets", "k" * 40, "--ttl", "0s"],
        ["token", "--token-secrets", "k" * 40, "--ttl", "9" * 400 + "d"],
        ["token", "--token-secrets", "k" * 40, "--area", "bbox=1,2"],
    ],
)
def test_token_command_explains_what_is_wrong(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tracker: bad configuration" in err
    if "0s" in argv:
        assert "must be positive" in err and "not a duration" not in err


async def test_tracker_serve_logs_json_startup_and_shutdown_without_secrets() -> None:
    secret, key = "s" * 40, "the-ingest-key"
    args = ("serve", "--port", "0", "--log-format", "json", "--access-log")
    env = {"TRACKER_TOKEN_SECRETS": secret, "TRACKER_INGEST_KEYS": key}
    async with tracker_process(*args, env=env, timeout=20) as tracker:
        async with httpx.AsyncClient(base_url=tracker.url) as client:
            assert (await client.get("/healthz")).status_code == 200
        assert await tracker.interrupt(timeout=15) == 0
    records = [json.loads(line) for line in tracker.output.decode().splitlines() if line[:1] == "{"]
    by_message = {record["message"].split(" ")[0]: record for record in records}
    started = by_message["serving"]
    assert started["logger"] == "tracker.cli" and started["level"] == "info"
    assert started["message"] == f"serving on {tracker.url}"
    assert (started["port"], started["token_secrets"], started["ingest_keys"]) == (0, 1, 1)
    assert by_message["127.0.0.1"]["path"] == "/healthz"  # the access log
    assert by_message["SIGINT"]["message"] == "SIGINT received: shutting down"
    assert records[-1]["message"] == "stopped"
    assert secret not in tracker.output.decode() and key not in tracker.output.decode()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"TRACKER_TICK_S": "0.001"},
            "--tick must be at least 0.01 s (TRACKER_TICK_S); got '0.001'",
        ),
        ({"TRACKER_TICK_S": "soon"}, "--tick must be a number from 0.01 to 10 s (TRACKER_TICK_S)"),
        ({"TRACKER_PORT": "http"}, "--port must be a whole number from 0 to 65535 (TRACKER_PORT)"),
        ({"TRACKER_PORT": "1e400"}, "--port must be at most 65535 (TRACKER_PORT)"),
        ({"TRACKER_HEARTBEAT_S": "0"}, "--heartbeat must be more than 0 s (TRACKER_HEARTBEAT_S)"),
        (
            {"TRACKER_OPEN_FEEDS": "maybe"},
            "--open-feeds must be one of true/false/1/0/yes/no (TRACKER_OPEN_FEEDS); got 'maybe'",
        ),
        (
            {"TRACKER_STALE_AFTER_S": "100", "TRACKER_REMOVE_AFTER_S": "50"},
            "--remove-after must be greater than --stale-after "
            "(TRACKER_REMOVE_AFTER_S, TRACKER_STALE_AFTER_S)",
        ),
        ({"TRACKER_CERTFILE": "cert.pem"}, "--certfile and --keyfile go together"),
        ({"TRACKER_BUS": "redis://:pw@h:port/0"}, "'redis://:***@h:port/0': the port is not a"),
        ({"TRACKER_BUS": "http://redis"}, "the scheme 'http' is not redis, rediss or unix"),
        ({"TRACKER_BUS": "redis://h/x"}, "the database 'x' is not a number (TRACKER_BUS)"),
        ({"TRACKER_TOKEN_SECRETS": "short-secret"}, "--token-secrets needs at least 32 characters"),
    ],
)
def test_config_errors_name_the_flag_and_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        config_from(build_parser().parse_args(["serve"]), env)
    assert message in str(error.value)
    assert "$." not in str(error.value) and "\n" not in str(error.value)
    assert "pw" not in str(error.value) and "short-secret" not in str(error.value)


@pytest.mark.parametrize("word", ["yes", "YES", "true", "1"])
def test_config_booleans_take_yes_as_well_as_true(word: str) -> None:
    config = config_from(build_parser().parse_args(["serve"]), {"TRACKER_OPEN_FEEDS": word})
    assert config.open_feeds is True


def test_serve_help_lists_what_a_boolean_takes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "TRACKER_OPEN_FEEDS: true/false/1/0/yes/no" in " ".join(capsys.readouterr().out.split())


def test_tracker_serve_on_a_busy_port_says_so_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_tracker("serve", "--port", str(port))
    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("tracker:")]
    assert line == (
        f"tracker: cannot listen on 127.0.0.1 port {port}: it is in use (--port, TRACKER_PORT); "
        "stop the other server or choose another port (--port 0 takes any free one)"
    )
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr


def test_tracker_serve_with_missing_certificate_files_names_the_option(tmp_path: Path) -> None:
    missing = str(tmp_path / "cert.pem")
    result = run_tracker("serve", "--certfile", missing, "--keyfile", missing)
    assert result.returncode == 2
    assert result.stderr == (
        f"tracker: bad configuration: --certfile '{missing}': no such file (TRACKER_CERTFILE)\n"
    )


def test_tracker_serve_with_a_host_that_does_not_resolve_names_the_option() -> None:
    result = run_tracker("serve", "--host", "no-such-host.invalid", "--port", "0")
    assert result.returncode == 2
    assert result.stderr.startswith(
        "tracker: bad configuration: --host 'no-such-host.invalid' is neither an IP address "
        "nor a name this machine resolves (TRACKER_HOST)"
    )
    assert result.stderr.count("\n") == 1


def test_tracker_serve_with_a_bad_environment_value_exits_2() -> None:
    result = run_tracker("serve", env={"TRACKER_TICK_S": "0.001"})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "tracker: bad configuration: --tick must be at least 0.01 s (TRACKER_TICK_S); got '0.001'\n"
    )


def test_tracker_serve_with_a_missing_streets_file_names_the_option(tmp_path: Path) -> None:
    result = run_tracker("serve", "--port", "0", "--streets-file", str(tmp_path / "none.json"))
    assert result.returncode == 2
    assert "--streets-file" in result.stderr and "TRACKER_STREETS_FILE" in result.stderr
    assert "Traceback" not in result.stderr
