"""tracker.logs: both formats, the setup, and the helpers against repeated records."""

from __future__ import annotations

import io
import json
import logging

import httpx
import pytest
import trio

from tests.conftest import BERLIN_BBOX, RunningServer, StartServer
from tracker.logs import ACCESS_LOGGER, Episode, Throttle, configure_logging

logger = logging.getLogger("tracker.test_logs")


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Opaque:
    """A value JSON has no form for."""

    def __repr__(self) -> str:
        return "<opaque>"


@pytest.mark.usefixtures("restore_root_logger")
def test_configure_logging_json_writes_one_object_per_line() -> None:
    out = io.StringIO()
    configure_logging(level="info", log_format="json", stream=out)
    logger.info("served %d feeds", 3, extra={"address": "10.0.0.1", "odd": Opaque()})
    logger.debug("not shown at info")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logger.exception("crashed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "served 3 feeds"
    assert (first["level"], first["logger"]) == ("info", "tracker.test_logs")
    assert first["address"] == "10.0.0.1" and first["odd"] == "<opaque>"
    assert first["time"].endswith("Z") and first["time"][:2] == "20"
    assert second["level"] == "error" and "RuntimeError: boom" in second["exception"]


@pytest.mark.usefixtures("restore_root_logger")
def test_configure_logging_text_is_one_readable_line_with_fields() -> None:
    out = io.StringIO()
    configure_logging(level="debug", log_format="text", stream=out)
    logger.debug("refused a token", extra={"address": "10.0.0.1", "reason": "has expired"})
    (line,) = out.getvalue().splitlines()
    assert " DEBUG   tracker.test_logs: refused a token address=10.0.0.1" in line
    assert line.endswith(' reason="has expired"')


@pytest.mark.usefixtures("restore_root_logger")
def test_configure_logging_twice_replaces_its_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(stream=first)
    configure_logging(level="warning", stream=second)
    logger.warning("once")
    logger.info("filtered")
    assert first.getvalue() == "" and second.getvalue().count("\n") == 1


@pytest.mark.usefixtures("restore_root_logger")
def test_configure_logging_keeps_per_request_library_records_for_debug() -> None:
    out = io.StringIO()
    configure_logging(level="info", stream=out)
    logging.getLogger("httpx").info("HTTP Request: POST /ingest")
    assert out.getvalue() == ""
    configure_logging(level="debug", stream=out)
    logging.getLogger("httpx").info("HTTP Request: POST /ingest")
    assert "POST /ingest" in out.getvalue()


def test_configure_logging_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="debug, info, warning, error"):
        configure_logging(level="verbose")
    with pytest.raises(ValueError, match="text, json"):
        configure_logging(log_format="xml")


def test_episode_logs_its_start_once_and_its_end_with_count_and_duration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    outage = Episode(logger, "Redis down", "Redis back", unit="pings dropped", clock=clock)
    outage.over()  # nothing going on: nothing to say
    with caplog.at_level(logging.INFO, logger=logger.name):
        for _ in range(1000):
            outage.happened(5, error="refused")
            clock.now += 0.01
        assert outage.active and outage.count == 5000
        outage.over()
        outage.over()
    start, end = caplog.records
    assert (start.levelno, start.getMessage()) == (logging.WARNING, "Redis down")
    assert start.error == "refused"
    assert end.levelno == logging.INFO
    assert end.getMessage() == "Redis back after 10.0 s (5000 pings dropped)"
    assert (end.count, end.duration_s) == (5000, 10.0)
    assert not outage.active


def test_episode_a_second_episode_counts_from_zero(caplog: pytest.LogCaptureFixture) -> None:
    outage = Episode(logger, "down", "up", clock=FakeClock())
    with caplog.at_level(logging.INFO, logger=logger.name):
        outage.happened(7)
        outage.over()
        outage.happened(0)
        outage.happened(2)
        outage.over()
    assert [r.getMessage() for r in caplog.records] == [
        "down",
        "up after 0.0 s (7 times)",
        "down",
        "up after 0.0 s (2 times)",
    ]


def test_throttle_logs_one_record_per_interval_and_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    refused = Throttle(logger, interval_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger=logger.name):
        logged = [refused.log("refused %s", "token", address=f"10.0.0.{i}") for i in range(50)]
        clock.now += 10
        refused.log("refused %s", "key", address="10.0.0.99")
    assert logged.count(True) == 1 and refused.suppressed == 0
    first, second = caplog.records
    assert (first.getMessage(), first.address) == ("refused token", "10.0.0.0")
    assert second.getMessage() == "refused key (49 more like it not logged)"
    assert second.suppressed == 49


def test_throttle_below_the_logger_level_costs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    refused = Throttle(logger, level=logging.DEBUG, clock=FakeClock())
    with caplog.at_level(logging.INFO, logger=logger.name):
        assert not refused.log("refused")
    assert refused.suppressed == 0 and caplog.records == []


def _records_of(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    """The captured records of one logger: a busy machine may add others (the loop watch's
    long-step warnings, ``tracker.loopwatch``) that these tests are not about."""
    return [record for record in caplog.records if record.name == name]


async def test_access_log_names_each_request_without_its_query(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(access_log=True)
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
            health = await client.get("/healthz?token=s3cret", headers={"User-Agent": "probe/1"})
            await client.get("/nowhere")
        with trio.fail_after(5):
            while len(_records_of(caplog, ACCESS_LOGGER)) < 2:
                await trio.sleep(0.01)
    healthz, nowhere = _records_of(caplog, ACCESS_LOGGER)
    assert (healthz.method, healthz.path, healthz.status) == ("GET", "/healthz", 200)
    assert healthz.protocol == "HTTP/1.1" and healthz.user_agent == "probe/1"
    assert healthz.client.startswith("127.0.0.1:") and 0 <= healthz.duration_s < 5
    assert healthz.bytes == len(health.content)
    assert '"GET /healthz HTTP/1.1" 200' in healthz.getMessage()
    assert nowhere.status == 404
    assert "s3cret" not in caplog.text


async def test_access_log_is_off_by_default(
    server: RunningServer, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        await client.get("/healthz")
        await trio.sleep(0.05)
    assert not [r for r in caplog.records if r.name == ACCESS_LOGGER]


async def test_refused_credentials_are_logged_once_per_interval(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(open_feeds=False)
    with caplog.at_level(logging.INFO, logger="tracker.app"):
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
            for _ in range(20):
                feed = await client.get(f"/feed?bbox={BERLIN_BBOX}&token=forged")
                assert feed.status_code == 401
            ingest = await client.post("/ingest", json=[], headers={"X-Ingest-Key": "wrong"})
            assert ingest.status_code == 401
    (refused,) = _records_of(caplog, "tracker.app")
    assert refused.getMessage().startswith("refused GET /feed: the token is not a JWT")
    assert (refused.address, refused.code) == ("127.0.0.1", "unauthorized")
    assert "forged" not in caplog.text
