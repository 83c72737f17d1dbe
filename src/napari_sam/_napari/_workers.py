"""Background jobs for the widget, and a watch on how long main-thread slots take.

The viewer must stay responsive while slices are encoded and propagated, so every model call
runs in a napari ``thread_worker`` and only short slots (draw a mask, write one slice) run on
the main thread. :class:`JobRunner` runs one job at a time; :class:`SlotTimer` measures each
main-thread slot it wraps and logs any that take longer than its budget.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

__all__ = ["JobRunner", "SlotTimer"]

log = logging.getLogger(__name__)


class SlotTimer:
    """Record the duration of main-thread slots.

    Parameters
    ----------
    budget_s : float
        Slots longer than this are logged as warnings (the viewer feels stuck beyond ~0.1 s).
    """

    def __init__(self, budget_s: float = 0.1) -> None:
        self.budget_s = budget_s
        self.durations: dict[str, float] = {}  # name -> longest duration seen, seconds
        self.calls = 0

    def wrap(self, func: Callable, name: str | None = None) -> Callable:
        """``func`` timed: each call's duration is recorded under ``name`` (its own name)."""
        slot = name or str(getattr(func, "__name__", repr(func)))

        @functools.wraps(func)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.calls += 1
                if elapsed > self.durations.get(slot, 0.0):
                    self.durations[slot] = elapsed
                if elapsed > self.budget_s:
                    log.warning("main-thread slot %s took %.0f ms", slot, elapsed * 1e3)

        return timed

    @property
    def longest(self) -> tuple[str, float]:
        """``(name, seconds)`` of the slowest slot so far (``("", 0.0)`` before any)."""
        if not self.durations:
            return "", 0.0
        name = max(self.durations, key=self.durations.__getitem__)
        return name, self.durations[name]


class JobRunner:
    """Run generator jobs one at a time in napari worker threads.

    A job is a generator function: what it yields arrives in ``on_yield`` on the main thread,
    what it returns in ``on_return``; an exception in ``on_error``. ``on_done(aborted: bool)``
    runs last in every case. :meth:`cancel` stops the job at its next ``yield``.
    """

    def __init__(self, timer: SlotTimer) -> None:
        self.timer = timer
        # napari's worker (FunctionWorker or GeneratorWorker) while a job runs.
        self.worker: Any = None
        self.name = ""

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def start(
        self,
        name: str,
        job: Callable,
        *args: Any,
        on_yield: Callable[[Any], None] | None = None,
        on_return: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_done: Callable[[bool], None] | None = None,
    ) -> Any:
        from napari.qt.threading import create_worker

        if self.worker is not None:
            raise RuntimeError(f"a job is already running ({self.name})")
        # Errors we handle are shown to the user, not re-raised in the Qt event loop.
        worker = create_worker(job, *args, _start_thread=False, _ignore_errors=on_error is not None)
        state = {"aborted": False}
        if on_yield is not None:
            worker.yielded.connect(self.timer.wrap(on_yield, f"{name}:yielded"))
        if on_return is not None:
            worker.returned.connect(self.timer.wrap(on_return, f"{name}:returned"))
        if on_error is not None:
            worker.errored.connect(self.timer.wrap(on_error, f"{name}:errored"))
        if hasattr(worker, "aborted"):  # generator jobs only
            worker.aborted.connect(lambda: state.update(aborted=True))

        def finished() -> None:
            self.worker = None
            self.name = ""
            if on_done is not None:
                on_done(state["aborted"])

        worker.finished.connect(self.timer.wrap(finished, f"{name}:finished"))
        self.worker, self.name = worker, name
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running job to stop at its next yield (no-op when idle)."""
        if self.worker is not None:
            self.worker.quit()
