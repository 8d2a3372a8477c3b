"""The loop watch: long task steps and garbage collections, named and published; and the
GIL switch interval a serving tracker sets."""

from __future__ import annotations

import gc
import logging
import sys
import time

import pytest
import trio

from tests.conftest import StartServer
from tracker.loopwatch import LoopWatch
from tracker.metrics import Metrics
from tracker.server import SWITCH_INTERVAL_S


async def test_a_long_step_is_timed_named_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tracker.loopwatch")
    metrics = Metrics()
    watch = LoopWatch(long_step_s=0.02)
    watch.install(metrics)
    try:

        async def hog() -> None:
            await trio.lowlevel.checkpoint()
            time.sleep(0.03)  # noqa: ASYNC251 (holding the loop is what is watched)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hog, name="hog")
        gc.collect(0)
    finally:
        watch.uninstall()
    assert watch.longest_step_task == "hog" and watch.longest_step_s >= 0.03
    assert watch.long_steps == 1 and watch.busiest(1)[0][0] == "hog"
    assert watch.gc_pauses[0] >= 1
    assert "held 3" in caplog.text and "task hog" in caplog.text
    rendered = metrics.render().decode()
    assert "tracker_loop_step_max_seconds 0.03" in rendered
    assert "tracker_loop_long_steps_total 1.0" in rendered
    assert "tracker_gc_gen0_pause_max_seconds" in rendered
    assert watch.on_gc not in gc.callbacks


async def test_serving_sets_the_switch_interval_and_restores_it(
    start_server: StartServer,
) -> None:
    """A serving tracker hands the GIL between threads every millisecond (the threads a
    history answer passes through wait less behind a busy loop); stopped, it leaves the
    interpreter's interval as it found it (tests serve in-process)."""
    before = sys.getswitchinterval()
    assert before != SWITCH_INTERVAL_S
    first = await start_server()
    assert sys.getswitchinterval() == SWITCH_INTERVAL_S
    second = await start_server()  # two instances in one process, stopped out of order
    await first.stop()
    assert sys.getswitchinterval() == SWITCH_INTERVAL_S  # the second one still serves
    await second.stop()
    assert sys.getswitchinterval() == before
