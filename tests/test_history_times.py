"""Times in history requests: the one parser every history route shares, and its windows."""

from __future__ import annotations

import pytest

from tracker.errors import BadRequest
from tracker.history.times import check_window, parse_time

NOW = 1_764_012_345.0
DAY = 86_400.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1764012345", 1_764_012_345.0),
        ("1764012345.25", 1_764_012_345.25),
        (" 0 ", 0.0),
        ("2025-11-24T19:25:45Z", 1_764_012_345.0),
        ("2025-11-24T20:25:45+01:00", 1_764_012_345.0),
        ("2025-11-24T19:25:45.5", 1_764_012_345.5),  # no offset: UTC
        ("2025-11-24", 1_763_942_400.0),
    ],
)
def test_parse_time_reads_unix_seconds_and_iso_8601(text: str, expected: float) -> None:
    assert parse_time("from", text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "nan",
        "inf",
        "-1",
        "1e9",
        "9" * 13,
        "1" * 41,
        "2025-13-01T00:00:00Z",
        "2025-11-24T19:25:45+25:00",
        "\udcff",
        "１７６４０１２３４５",  # full-width digits: not Unix seconds, not ISO 8601
        "0001-01-01T00:00:00Z",
    ],
)
def test_parse_time_refuses_what_is_not_a_time(text: str) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_time("to", text)
    assert refused.value.message.startswith("to=")


def test_check_window_takes_a_window_inside_the_retention() -> None:
    check_window(NOW - DAY, NOW, now=NOW, retention_s=2 * DAY, max_window_s=DAY)


@pytest.mark.parametrize(
    ("start", "end", "words"),
    [
        (NOW, NOW, "must be before"),
        (NOW, NOW - 1, "must be before"),
        (NOW - 3 * DAY, NOW, "retention horizon"),
        (NOW - 1.5 * DAY, NOW, "longer than"),
        (NOW - DAY / 2, NOW + 3 * DAY, "far future"),
        (NOW - DAY / 2, NOW * 1000, "far future"),
    ],
)
def test_check_window_refuses_bad_windows(start: float, end: float, words: str) -> None:
    with pytest.raises(BadRequest) as refused:
        check_window(start, end, now=NOW, retention_s=2 * DAY, max_window_s=DAY)
    assert words in refused.value.message
