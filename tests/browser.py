"""Real-browser helpers: a tracker demo in a child process, and Debian's Chromium.

Browser tests are plain (synchronous) tests: Playwright's API is synchronous or asyncio,
and the server under test is a separate process either way. Chromium is the system one
(``apt-get install chromium``); Playwright's own browser download is never used.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx
from playwright.sync_api import Browser, Page, sync_playwright

from tests.processes import free_port, tracker_child

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@contextmanager
def demo(port: int, *options: str, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """``tracker demo`` on ``port`` until the block ends; its URL. Waits for a clean exit."""
    args = ["demo", "--port", str(port), "--quiet", "--tick", "0.5", *options]
    with tracker_child(*args, env=env) as child:
        yield f"http://127.0.0.1:{port}"
        code = child.interrupt(timeout=30)
        assert code == 0 and b"Traceback" not in child.output, child.output.decode()


@contextmanager
def static_server(directory: Path) -> Iterator[str]:
    """``directory`` served on a loopback port of its own: another origin than the tracker.

    (A page that Playwright makes up for an invented host would count as a public site, and
    Chromium blocks public pages from framing loopback ones.)
    """
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    server = subprocess.Popen(
        [*command, "--directory", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(url).raise_for_status()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the static server did not start"
                time.sleep(0.05)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


@contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def watched_page(
    browser: Browser, *, width: int = 1000, height: int = 700, is_mobile: bool = False
) -> Iterator[Page]:
    """A page in a fresh context of ``browser``; fails the test if the page's scripts threw."""
    context = browser.new_context(viewport={"width": width, "height": height}, is_mobile=is_mobile)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == []


def screenshot(path: str) -> None:
    """The README's picture: the default demo fleet driving the simulated city's streets,
    the side panel listing the vehicles in view, one van found by the search and followed."""
    with demo(free_port()) as url, chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 780})
        page.goto(f"{url}/?bbox=13.37,52.505,13.44,52.535")
        page.wait_for_function(
            "() => window.trackerMap?.streets && trackerMap.feed?.table.vehicles.size > 200"
        )
        moving = page.evaluate(
            """() => [...trackerMap.feed.table.vehicles.values()]
                .filter(v => v.id.startsWith('van') && v.speed > 6 && !v.stale)
                .sort((a, b) => Math.hypot(a.lat - 52.52, a.lon - 13.405)
                    - Math.hypot(b.lat - 52.52, b.lon - 13.405))[0].id"""
        )
        page.fill("#search-id", moving)
        page.click("#search button")
        page.wait_for_function(f"() => trackerMap.following === '{moving}'")
        page.evaluate("() => { trackerMap.map.setZoom(15); }")
        page.wait_for_timeout(5000)
        page.screenshot(path=path)


if __name__ == "__main__":
    screenshot(sys.argv[1] if len(sys.argv) > 1 else "docs/img/live-map.png")
