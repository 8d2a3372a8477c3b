"""How long the event loop is held, and by what: task steps and garbage collections.

Every request, tick and feed waits for the one event loop thread; a task step that runs
for 100 ms delays all of them by up to 100 ms, whatever they ask. :class:`LoopWatch` is a
Trio instrument that times every task step (by task name) and a ``gc`` callback that
times every collection, so that a stall can be named: published as gauges
(``tracker_loop_step_max_seconds``, ``tracker_loop_long_steps_total``,
``tracker_gc_pause_max_seconds``...), and logged (at most once a minute) when a step
holds the loop longer than :data:`LONG_STEP_S`.

The cost is two ``perf_counter`` calls and a dict update per task step (about a
microsecond), well under the steps it watches. Installed by ``tracker.server.serve``;
owns no tasks.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import trio

from tracker.logs import Throttle
from tracker.metrics import Metrics

__all__ = ["LONG_STEP_S", "LoopWatch", "StepStats"]

logger = logging.getLogger(__name__)

LONG_STEP_S = 0.05
"""A task step longer than this is counted (and logged, throttled) as a long step."""
LOG_INTERVAL_S = 60.0


class StepStats:
    """One task name's steps: how many, their total and their longest."""

    __slots__ = ("count", "longest_s", "total_s")

    def __init__(self) -> None:
        self.count = 0
        self.total_s = 0.0
        self.longest_s = 0.0


class LoopWatch(trio.abc.Instrument):
    """Times the event loop's task steps and the garbage collector's pauses.

    Only collections on the loop's own thread are loop stalls, but a collection in a
    worker thread holds the GIL as well, so all are counted.
    """

    def __init__(self, *, long_step_s: float = LONG_STEP_S) -> None:
        self.long_step_s = long_step_s
        self.steps: dict[str, StepStats] = {}
        self.longest_step_s = 0.0
        self.longest_step_task = ""
        self.long_steps = 0
        self.gc_pauses = [0, 0, 0]  # collections by generation
        self.gc_seconds = [0.0, 0.0, 0.0]
        self.gc_pause_max_s = [0.0, 0.0, 0.0]
        self._began = 0.0
        self._gc_began = 0.0
        self._log = Throttle(logger, interval_s=LOG_INTERVAL_S, level=logging.WARNING)

    # --- trio.abc.Instrument -------------------------------------------------------------

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._began = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        took = time.perf_counter() - self._began
        stats = self.steps.get(task.name)
        if stats is None:
            stats = self.steps[task.name] = StepStats()
        stats.count += 1
        stats.total_s += took
        if took > stats.longest_s:
            stats.longest_s = took
        if took > self.longest_step_s:
            self.longest_step_s = took
            self.longest_step_task = task.name
        if took > self.long_step_s:
            self.long_steps += 1
            self._log.log(
                "the event loop was held %.0f ms by one step of task %s",
                took * 1000,
                task.name,
                task=task.name,
                step_ms=round(took * 1000),
            )

    # --- gc.callbacks --------------------------------------------------------------------

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        """``gc.callbacks`` entry: times each collection by generation."""
        if phase == "start":
            self._gc_began = time.perf_counter()
            return
        generation = info["generation"]
        took = time.perf_counter() - self._gc_began
        self.gc_pauses[generation] += 1
        self.gc_seconds[generation] += took
        if took > self.gc_pause_max_s[generation]:
            self.gc_pause_max_s[generation] = took

    # --- wiring --------------------------------------------------------------------------

    def install(self, metrics: Metrics) -> None:
        """Watch the running Trio loop and the collector; publish the figures as gauges."""
        self._began = time.perf_counter()  # the step calling this began before it
        trio.lowlevel.add_instrument(self)
        gc.callbacks.append(self.on_gc)
        metrics.gauges.update(
            loop_step_max_seconds=(
                "Longest task step on the event loop since start (nothing else ran meanwhile).",
                lambda: self.longest_step_s,
            ),
            loop_long_steps_total=(
                f"Task steps that held the event loop longer than {self.long_step_s:g} s.",
                lambda: self.long_steps,
            ),
        )
        for generation in range(3):
            metrics.gauges[f"gc_gen{generation}_pause_max_seconds"] = (
                f"Longest garbage collection of generation {generation} since start.",
                lambda g=generation: self.gc_pause_max_s[g],  # type: ignore[misc]
            )
            metrics.gauges[f"gc_gen{generation}_seconds_total"] = (
                f"Time spent collecting generation {generation} since start.",
                lambda g=generation: self.gc_seconds[g],  # type: ignore[misc]
            )

    def uninstall(self) -> None:
        """Stop watching (the gauges keep the last figures)."""
        trio.lowlevel.remove_instrument(self)
        if self.on_gc in gc.callbacks:
            gc.callbacks.remove(self.on_gc)

    def busiest(self, count: int = 10) -> list[tuple[str, StepStats]]:
        """The task names whose longest step was longest, longest first."""
        ranked = sorted(self.steps.items(), key=lambda item: item[1].longest_s, reverse=True)
        return ranked[:count]
