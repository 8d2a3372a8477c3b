"""The map's alerts panel in a real Chromium: the latest events on opening, then live ones,
newest first; names shown as text, never markup."""

from __future__ import annotations

from pathlib import Path

import trio
from playwright.sync_api import sync_playwright

from tests.alerts_tools import zone_event
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import BERLIN_BBOX, StartServer


async def test_the_panel_lists_recent_then_live_events(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await start_server(history=str(tmp_path / "t.sqlite3"), tick_s=0.2)
    log = server.tracker.alerts
    log.emit([zone_event(i, zone=f"depot-{i}") for i in range(3)])
    with trio.fail_after(5):
        while log.last_id < 3:
            await trio.sleep(0.01)

    def browse() -> tuple[list[str], list[str], list[str]]:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 700}, locale="en-GB")
                errors: list[str] = []
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.goto(f"{server.url}/?bbox={BERLIN_BBOX}")
                page.wait_for_function("() => window.trackerAlerts?.events.length === 3")
                recent = page.locator("#alerts-list li").all_inner_texts()
                trio.from_thread.run_sync(
                    log.emit,
                    [zone_event(7, zone="<b>bay</b>", type="exit", inside_s=42.4, reason="stale")],
                )
                page.wait_for_function("() => window.trackerAlerts.events.length === 4")
                page.wait_for_function("() => window.trackerAlerts.state === 'live'")
                return recent, page.locator("#alerts-list li").all_inner_texts(), errors
            finally:
                browser.close()

    recent, live, errors = await trio.to_thread.run_sync(browse)
    assert errors == []
    assert [text.split(" ", 1)[1] for text in recent] == [
        f"→ v{i} enter depot-{i}" for i in (2, 1, 0)
    ]
    assert live[0].endswith("← v7 exit <b>bay</b> after 42 s (stale)")
