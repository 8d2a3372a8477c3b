"""History on the map in a real Chromium: trails, a vehicle's day track, replay and back.

``tracker demo`` runs in a child process with its history in a temporary file and its
simulated fleet moving, so the map reads history the demo really stored.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page

from tests.browser import demo, watched_page
from tests.processes import free_port

BBOX = "13.33,52.48,13.47,52.56"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    history = tmp_path_factory.mktemp("history") / "history.sqlite3"
    options = ("--vehicles", "300", "--history", str(history), "--history-commit", "0.2")
    with demo(free_port(), *options) as running:
        time.sleep(4)  # some history to show
        yield running


@pytest.fixture
def page(browser: Browser, url: str) -> Iterator[Page]:
    with watched_page(browser) as page:
        page.goto(f"{url}/?bbox={BBOX}")
        page.wait_for_function("() => window.trackerMap?.feed?.table.vehicles.size > 50")
        yield page


def test_trails_appear_from_history_then_grow_live(page: Page) -> None:
    with page.expect_response(lambda r: "/history?" in r.url) as answer:
        page.check("#show-trails")
    assert answer.value.status == 200
    assert answer.value.json()["vehicles"]
    # Drawn at once from history: many vehicles with a trail of several points.
    page.wait_for_function(
        "() => [...trackerMap.history.trails.values()].filter(t => t.line).length > 50"
    )
    before = page.evaluate(
        "() => Math.max(...[...trackerMap.history.trails.values()].map(t => t.times.at(-1)))"
    )
    # Then extended from the live feed.
    page.wait_for_function(
        f"""() => Math.max(...[...trackerMap.history.trails.values()]
            .map(t => t.times.at(-1))) > {before}""",
        timeout=15_000,
    )
    page.uncheck("#show-trails")
    page.wait_for_function("() => trackerMap.history.trails.size === 0")


def test_clicking_a_vehicle_draws_its_day(page: Page) -> None:
    point = page.evaluate(
        """() => { const v = trackerMap.feed.table.vehicles.values().next().value;
            const p = trackerMap.map.latLngToContainerPoint([v.lat, v.lon]);
            return {x: p.x, y: p.y, id: v.id}; }"""
    )
    with page.expect_response(lambda r: "/track?" in r.url) as answer:
        page.mouse.click(point["x"], point["y"])
    assert answer.value.status == 200
    page.wait_for_function("() => trackerMap.history.trackLayer.getLayers().length > 0")
    assert page.evaluate("() => trackerMap.history.trackLayer.vehicleId") == point["id"]


def test_replay_plays_history_then_returns_to_live(page: Page) -> None:
    # One minute back (the slider's nearest), at 10x: six seconds of playback.
    page.evaluate(
        """() => { const s = document.getElementById('replay-time');
            s.value = '-1'; s.dispatchEvent(new Event('input')); }"""
    )
    page.select_option("#replay-speed", "10")
    page.click("#replay-play")
    page.wait_for_function("() => new URL(trackerMap.feed.url).searchParams.has('from')")
    query = page.evaluate("() => Object.fromEntries(new URL(trackerMap.feed.url).searchParams)")
    assert abs(float(query["from"]) - (time.time() - 60)) < 5 and query["speed"] == "10"
    assert page.get_attribute("#history-controls", "data-mode") == "replay"
    # It plays: the fleet appears as it was, in history time, behind the wall clock.
    page.wait_for_function(
        """() => trackerMap.feed.table.vehicles.size > 50 && Date.now() / 1000
            - Math.max(...[...trackerMap.feed.table.vehicles.values()].map(v => v.ts)) > 5""",
        timeout=15_000,
    )
    # The replay reaches the time it was started at: the feed says so and stops.
    page.wait_for_function(
        "() => document.getElementById('history-controls').dataset.mode === 'ended'",
        timeout=20_000,
    )
    assert page.evaluate("() => trackerMap.feed.state") == "ended"
    page.click("#replay-live")
    page.wait_for_function("() => !new URL(trackerMap.feed.url).searchParams.has('from')")
    page.wait_for_function("() => trackerMap.feed.state === 'live'")
    page.wait_for_function(
        """() => Math.max(...[...trackerMap.feed.table.vehicles.values()].map(v => v.ts))
            > Date.now() / 1000 - 3""",
        timeout=15_000,
    )
    assert page.get_attribute("#history-controls", "data-mode") == "live"


def test_the_embed_has_no_history_panel(browser: Browser, url: str) -> None:
    page = browser.new_page()
    page.goto(f"{url}/embed?bbox={BBOX}")
    page.wait_for_function("() => window.trackerMap?.feed?.table.vehicles.size > 10")
    assert page.locator("#history-controls").count() == 0
    page.close()
