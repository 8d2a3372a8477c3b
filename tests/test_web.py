"""The map page, the embed page and the browser feed client, in a real Chromium.

Each test drives Debian's Chromium (Playwright) against ``tracker demo`` in a child
process, with its simulated fleet moving: what a user sees, not a mock of it.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page

from tests.browser import demo, static_server, watched_page
from tests.processes import free_port

BBOX = "13.33,52.48,13.47,52.56"
FIND = "[...trackerMap.feed.table.vehicles.values()].find(v => v.id === id)"
"""The vehicle whose id is ``id``, in a page's feed (JavaScript)."""


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with demo(free_port(), "--vehicles", "1500") as running:
        wait_for_fleet(running, 1000)
        yield running


def wait_for_fleet(url: str, vehicles: int, timeout: float = 60) -> None:
    """Until the demo's simulated fleet has reported (a loaded machine takes its time)."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/healthz").json()["vehicles"] < vehicles:
        assert time.monotonic() < deadline, f"fewer than {vehicles} vehicles after {timeout} s"
        time.sleep(0.2)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    with watched_page(browser) as page:
        yield page


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^tracker_{name} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match[1])


def vehicles(page: Page) -> int:
    count: int = page.evaluate("() => window.trackerMap?.feed?.table.vehicles.size ?? 0")
    return count


def test_markers_appear_move_and_tell_what_they_are(page: Page, url: str) -> None:
    page.goto(f"{url}/?bbox={BBOX}")
    page.wait_for_function("() => window.trackerMap?.feed?.table.vehicles.size > 100")
    assert page.locator("#status .state").get_attribute("data-state") == "live"
    before = page.evaluate(
        "() => Object.fromEntries([...trackerMap.feed.table.vehicles.values()]"
        ".slice(0, 50).map(v => [v.id, [v.lat, v.lon]]))"
    )
    page.wait_for_function(
        """before => [...trackerMap.feed.table.vehicles.values()].filter(v => before[v.id]
            && (before[v.id][0] !== v.lat || before[v.id][1] !== v.lon)).length >= 10""",
        arg=before,
        timeout=15_000,
    )
    page.wait_for_function(
        "() => +document.getElementById('in-view').textContent.replaceAll(',', '') > 0"
    )
    # Click the first vehicle: a popup names it.
    point = page.evaluate(
        """() => { const v = trackerMap.feed.table.vehicles.values().next().value;
            const p = trackerMap.map.latLngToContainerPoint([v.lat, v.lon]);
            return {x: p.x, y: p.y, id: v.id}; }"""
    )
    page.mouse.click(point["x"], point["y"])
    popup = page.locator(".vehicle-popup")
    popup.wait_for()
    assert "km/h" in popup.inner_text() or "not reported" in popup.inner_text()
    assert "s ago" in popup.inner_text()


def test_the_feed_follows_the_view_without_flicker(page: Page, url: str) -> None:
    page.goto(f"{url}/?bbox={BBOX}")
    page.wait_for_function("() => window.trackerMap?.feed?.table.vehicles.size > 100")
    wide = metric(url, "watched_cells")
    page.evaluate(
        """() => { window.smallest = Infinity;
            trackerMap.feed.onUpdate((c, table) =>
                window.smallest = Math.min(window.smallest, table.vehicles.size)); }"""
    )
    page.evaluate("() => { trackerMap.map.setView([52.52, 13.405], 15); }")
    page.wait_for_function(f"() => !trackerMap.feed.url.includes('{BBOX}')")
    page.wait_for_function(
        "() => new URL(trackerMap.feed.url).searchParams.get('bbox') === "
        "new URLSearchParams(location.search).get('bbox')"
    )
    page.wait_for_function(
        "() => [...trackerMap.feed.table.vehicles.values()].every(v => "
        "v.lon > 13.3 && v.lon < 13.5)",
    )
    page.wait_for_timeout(1000)
    assert metric(url, "watched_cells") < wide
    assert page.evaluate("() => window.smallest") > 0  # old markers stayed until the snapshot


def test_a_link_reopens_the_same_view(page: Page, url: str) -> None:
    page.goto(f"{url}/?bbox=13.39,52.51,13.42,52.53")
    page.wait_for_function("() => window.trackerMap?.feed")
    bounds = page.evaluate("() => trackerMap.map.getBounds().toBBoxString()")
    west, south, east, north = (float(v) for v in bounds.split(","))
    assert west <= 13.39 and east >= 13.42 and south <= 52.51 and north >= 52.53


def test_too_large_a_view_clears_the_vehicles_and_asks_to_zoom_in(page: Page, url: str) -> None:
    page.goto(f"{url}/?bbox={BBOX}")
    page.wait_for_function("() => window.trackerMap?.feed?.table.vehicles.size > 100")
    page.evaluate("() => { trackerMap.map.setView([52.52, 13.405], 4); }")
    page.wait_for_function("() => document.getElementById('notice').textContent.includes('zoom')")
    assert page.evaluate("() => trackerMap.feed === null && trackerMap.vehiclesInView() === 0")
    assert page.locator("#status .state").get_attribute("data-state") == "paused"
    assert "bbox" not in page.evaluate("() => location.search")  # the link keeps no old area
    page.wait_for_function("() => document.getElementById('in-view').textContent === '0'")
    page.evaluate("() => { trackerMap.map.setView([52.52, 13.405], 14); }")  # back in: live again
    page.wait_for_function("() => trackerMap.feed?.table.vehicles.size > 10")
    assert page.evaluate("() => location.search").startswith("?bbox=")


def test_cells_toggle_draws_the_subscribed_cells(page: Page, url: str) -> None:
    page.goto(f"{url}/?bbox={BBOX}")
    page.wait_for_function("() => window.trackerMap?.feed")
    page.check("#show-cells")
    page.wait_for_function("() => document.querySelectorAll('path.h3-cell').length > 10")


def test_reconnecting_then_recovering_with_the_right_vehicles(browser: Browser) -> None:
    port = free_port()
    context = browser.new_context()
    page = context.new_page()
    state = page.locator("#status .state")
    with demo(port, "--vehicles", "300") as url:
        page.goto(f"{url}/?bbox={BBOX}")
        page.wait_for_function("() => window.trackerMap?.feed?.table.vehicles.size > 20")
    page.wait_for_function(
        "() => document.querySelector('#status .state').dataset.state === 'reconnecting'",
        timeout=15_000,
    )
    with demo(port, "--vehicles", "120", "--seed", "9") as url:
        page.wait_for_function(
            "() => document.querySelector('#status .state').dataset.state === 'live'",
            timeout=20_000,
        )
        page.wait_for_function("() => trackerMap.feed.table.vehicles.size > 0")
        page.wait_for_timeout(1500)
        shown = page.evaluate("() => [...trackerMap.feed.table.vehicles.values()].map(v => v.id)")
        area = page.evaluate("() => trackerMap.area.bbox")
        with httpx.stream("GET", f"{url}/feed?bbox={area}&format=json", timeout=10) as feed:
            snapshot = next(line for line in feed.iter_lines() if line.startswith("data:"))
        on_server = set(re.findall(r'"id":"([^"]+)"', snapshot))
        # The new fleet (120 vehicles) only, nothing left over from the old one (300).
        assert shown and all(int(vid.split("-")[1]) < 120 for vid in shown)
        assert len(set(shown) ^ on_server) <= max(3, len(on_server) // 10)  # a few moved
        assert state.get_attribute("data-state") == "live"
    context.close()


def test_embed_works_in_an_iframe_on_another_origin(page: Page, url: str, tmp_path: Path) -> None:
    """A portal on another origin (another port) frames /embed; the map comes alive."""
    (tmp_path / "index.html").write_text(
        f"""<!doctype html><title>Portal</title><h1>Our fleet</h1>
        <iframe id="fleet" src="{url}/embed?bbox={BBOX}" width="600" height="400"></iframe>"""
    )
    with static_server(tmp_path) as portal:
        page.goto(portal)
        frame = page.frame_locator("#fleet")
        frame.locator("#badge[data-state='live']").wait_for(timeout=15_000)
        embedded = next(f for f in page.frames if "/embed" in f.url)
        embedded.wait_for_function("() => window.trackerMap.feed.table.vehicles.size > 10")
        assert embedded.evaluate("() => document.getElementById('status')") is None


def test_find_a_vehicle_anywhere_and_follow_it_over_the_streets(page: Page, url: str) -> None:
    """The side panel lists the vehicles in view; the search asks the server where a vehicle
    is (it is not in view) and the map follows it, its feed with it."""
    page.goto(f"{url}/?bbox=13.39,52.51,13.41,52.52")
    page.wait_for_function("() => window.trackerMap?.streets?.getLayers().length > 100")
    page.wait_for_function("() => document.querySelectorAll('#vehicle-list tbody tr').length > 0")
    shown = set(
        page.locator("#vehicle-list tbody tr").evaluate_all("rows => rows.map(r => r.dataset.id)")
    )
    with httpx.stream("GET", f"{url}/feed?bbox=13.44,52.47,13.50,52.49&format=json") as far:
        snapshot = next(line for line in far.iter_lines() if line.startswith("data:"))
    target = next(vid for vid in re.findall(r'"id":"([^"]+)"', snapshot) if vid not in shown)
    page.fill("#search-id", target)
    page.click("#search button")
    page.wait_for_function(f"() => trackerMap.following === '{target}'")
    page.locator("#following").get_by_text(target).wait_for()
    assert f"follow={target}" in page.evaluate("() => location.search")
    # Centred on it, tick after tick, with the feed around it.
    offsets = []
    for _ in range(3):
        ts = page.evaluate(f"id => ({FIND})?.ts ?? 0", target)
        page.wait_for_function(f"([id, ts]) => ({FIND})?.ts > ts", arg=[target, ts], timeout=15_000)
        page.wait_for_timeout(100)
        offsets.append(
            page.evaluate(
                f"""id => trackerMap.map.latLngToContainerPoint([({FIND}).lat, ({FIND}).lon])
                    .distanceTo(trackerMap.map.getSize().divideBy(2))""",
                target,
            )
        )
    assert max(offsets) < 3, offsets
    west, south, east, north = map(float, page.evaluate("() => trackerMap.area.bbox").split(","))
    lat, lon = page.evaluate(
        "() => [trackerMap.map.getCenter().lat, trackerMap.map.getCenter().lng]"
    )
    assert west < lon < east and south < lat < north
    # The page's link reopens the map following it.
    link = page.evaluate("() => location.href")
    page.goto(link)
    page.wait_for_function(f"() => window.trackerMap?.following === '{target}'")
    page.click("#unfollow")
    assert page.evaluate("() => trackerMap.following") is None
    page.fill("#search-id", "nobody-by-that-name")
    page.click("#search button")
    page.locator("#search-result").get_by_text("no vehicle").wait_for()


@pytest.mark.parametrize("path", ["/", "/embed"])
def test_a_phone_sized_screen_shows_everything(browser: Browser, url: str, path: str) -> None:
    """390 px wide: the strip wraps without clipping, the map keeps most of the screen, the
    panel waits to be opened, and the embed's badge leaves the attribution readable."""
    context = browser.new_context(viewport={"width": 390, "height": 760}, device_scale_factor=2)
    page = context.new_page()
    page.goto(f"{url}{path}?bbox={BBOX}")
    page.wait_for_function("() => window.trackerMap?.feed?.table.vehicles.size > 10")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    assert page.locator("#map").bounding_box()["height"] > 500
    if path == "/":
        strip = page.locator("#status").bounding_box()
        assert strip["y"] + strip["height"] <= 760
        for box in page.locator("#status > *").evaluate_all(
            "items => items.map(i => i.getBoundingClientRect().toJSON())"
        ):
            assert box["left"] >= 0 and box["right"] <= 390, box
            assert strip["y"] <= box["top"] and box["bottom"] <= strip["y"] + strip["height"]
        assert page.locator("#panel").get_attribute("data-open") == "false"
        page.click("#panel-toggle")
        page.locator("#vehicle-list").wait_for()
    else:
        badge = page.locator("#badge").bounding_box()
        credit = page.locator(".leaflet-control-attribution").bounding_box()
        assert badge and credit
        apart = (
            badge["x"] + badge["width"] <= credit["x"]
            or credit["x"] + credit["width"] <= badge["x"]
            or badge["y"] + badge["height"] <= credit["y"]
            or credit["y"] + credit["height"] <= badge["y"]
        )
        assert apart, (badge, credit)
    context.close()


def test_tabs_share_one_feed_connection(browser: Browser, url: str) -> None:
    context = browser.new_context()
    first, second = context.new_page(), context.new_page()
    base = metric(url, "subscribers")
    for tab in (first, second):
        tab.goto(f"{url}/?bbox={BBOX}")
        tab.wait_for_function("() => window.trackerMap?.feed?.table.vehicles.size > 100")
    assert metric(url, "subscribers") == base + 1
    events = second.evaluate("() => trackerMap.feed.stats.events")
    first.close()  # the leader goes: the other tab takes over the feed
    second.wait_for_function(f"() => trackerMap.feed.stats.events > {events + 3}", timeout=15_000)
    assert metric(url, "subscribers") == base + 1
    assert vehicles(second) > 100
    context.close()


APPLY_BENCHMARK = """async () => {
    const { VehicleTable } = await import('/web/wire.js');
    const { Encoder } = await import('/web/vendor/msgpack/index.mjs');
    const encoder = new Encoder({ useBigInt64: true });
    const n = 5000;
    const positions = new DataView(new ArrayBuffer(n * 12));
    const moves = new DataView(new ArrayBuffer(n * 8));
    const names = [];
    for (let i = 0; i < n; i++) {
        positions.setUint32(i * 12, i + 1, true);
        positions.setInt16(i * 12 + 4, (i % 600) - 300, true);
        positions.setInt16(i * 12 + 6, (i % 900) - 450, true);
        positions.setUint16(i * 12 + 8, 10, true);
        positions.setUint8(i * 12 + 10, 20); positions.setUint8(i * 12 + 11, 45);
        moves.setUint16(i * 8, i + 1, true);
        moves.setInt8(i * 8 + 3, 3); moves.setInt8(i * 8 + 4, -2);
        names.push([i + 1, `van-${i}`]);
    }
    const line = (fields) => btoa(String.fromCharCode(...new Uint8Array(encoder.encode(fields))));
    const cell = 0x871f1d489ffffffn, empty = new Uint8Array(0);
    const snapshot = line([cell, 1764000000000n, 5252000, 1340500,
        new Uint8Array(positions.buffer), names, empty, empty, empty, empty]);
    const batch = line([cell, 1764000001000n, 5252000, 1340500,
        empty, [], empty, empty, empty, new Uint8Array(moves.buffer)]);
    const table = new VehicleTable();
    const timings = { snapshot: [], batch: [] };
    for (let run = 0; run < 30; run++) {
        let t = performance.now();
        table.applyEvent('snapshot', snapshot);
        timings.snapshot.push(performance.now() - t);
        t = performance.now();
        table.applyEvent('batch', batch);
        timings.batch.push(performance.now() - t);
    }
    const v = table.vehicles.get(1);
    return { ...timings, size: table.vehicles.size, lat: v.lat, lon: v.lon };
}"""


def test_applying_5000_positions_takes_well_under_a_frame(page: Page, url: str) -> None:
    page.goto(f"{url}/web/config.json")
    result = page.evaluate(APPLY_BENCHMARK)
    assert result["size"] == 5000
    assert (result["lat"], result["lon"]) == (52.51703, 13.40048)  # (-300 + 3, -450 - 2) e-5
    snapshot = statistics.median(result["snapshot"])
    batch = statistics.median(result["batch"])
    print(f"apply 5000 positions: snapshot {snapshot:.2f} ms, batch of moves {batch:.2f} ms")
    assert snapshot < 16 and batch < 16


def test_drawing_10000_vehicles_takes_well_under_a_frame(page: Page, url: str) -> None:
    page.goto(f"{url}/?bbox={BBOX}")
    page.wait_for_function("() => window.trackerMap?.feed?.table.vehicles.size > 100")
    timings = page.evaluate(
        """() => {
            trackerMap.feed.close(); // from here on, only the synthetic fleet
            const table = trackerMap.feed.table;
            table.vehicles.clear();
            for (let i = 0; i < 10000; i++) {
                table.vehicles.set(i, {vid: i, id: i % 4 ? `van-${i}` : `truck-${i}`,
                    lat: 52.48 + (i % 100) * 0.0008, lon: 13.33 + Math.floor(i / 100) * 0.0014,
                    heading: (i * 37) % 360, speed: 10, ts: 0, stale: i % 50 === 0});
            }
            return Array.from({length: 20}, () => trackerMap.drawNow());
        }"""
    )
    draw = statistics.median(timings)
    print(f"draw 10,000 vehicles: {draw:.2f} ms")
    assert draw < 33  # 30 frames a second at worst, in software rendering (no GPU here)
