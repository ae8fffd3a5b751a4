"""What keeps a background loop alive and visible: error handling, backoff and a progress clock.

Every loop of a worker (the sweeper's claim loop, the lease heartbeat) runs its iterations through a
`LoopMonitor`: an iteration that raises anything is logged (once per distinct error, with its SQLSTATE, and
again when the loop recovers), the loop waits a bounded, jittered backoff and goes on. Each completed iteration,
failed or not, moves the progress clock; `/healthz` fails when a loop's clock has stood still past
`WATIBOT_LOOP_STALL_SECONDS` or its task has ended, and `Watchdog` ends a worker whose loop stays wedged for twice
that, so that its supervisor starts a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence

from watibot.db import DatabaseError, describe_error

log = logging.getLogger("watibot.loops")


class LoopMonitor:
    """The health of one background loop: when it last completed an iteration and how it is failing."""

    def __init__(self, name: str, *, backoff_base: float, backoff_max: float) -> None:
        self.name = name
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.task: asyncio.Task[None] | None = None
        self.failures = 0  # consecutive failed iterations
        self.iterations = 0
        self.last_progress = time.monotonic()
        self._last_error: str | None = None

    def succeeded(self) -> None:
        """An iteration completed normally."""
        if self.failures:
            log.warning("%s loop recovered after %d failed iterations (last: %s)", self.name, self.failures,
                        self._last_error)
        self.failures = 0
        self._last_error = None
        self._progress()

    def failed(self, error: BaseException) -> float:
        """An iteration raised `error`: log it (once while it repeats) and return the seconds to wait."""
        self.failures += 1
        described = describe_error(error)
        if described != self._last_error:
            log.error("%s loop iteration failed: %s; retrying with backoff", self.name, described,
                      exc_info=None if _expected(error) else error)
            self._last_error = described
        self._progress()
        delay = min(self.backoff_max, self.backoff_base * 2.0 ** (self.failures - 1))
        return delay * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not security

    def stalled_for(self) -> float:
        """Seconds since the loop last completed an iteration."""
        return time.monotonic() - self.last_progress

    def problem(self, bound: float) -> str | None:
        """Why this loop is unhealthy, or None."""
        if self.task is None:
            return None
        if self.task.done():
            return f"{self.name} loop has ended"
        stalled = self.stalled_for()
        if stalled > bound:
            return f"{self.name} loop has not completed an iteration for {stalled:.0f} s (bound {bound:g} s)"
        return None

    def _progress(self) -> None:
        self.iterations += 1
        self.last_progress = time.monotonic()


def _expected(error: BaseException) -> bool:
    """Database errors are expected in operation (their message says it all); anything else is a bug to trace."""
    return isinstance(error, DatabaseError | TimeoutError | OSError)


EXIT_WEDGED = 70  # EX_SOFTWARE; not uvicorn's 3, which makes its supervisor give up instead of restarting


def exit_wedged(reason: str) -> None:
    """End this process at once: its event loop may be the thing that is stuck, so nothing graceful can run."""
    logging.shutdown()
    os._exit(EXIT_WEDGED)


class Watchdog:
    """A thread that ends the worker when one of its loops stays wedged for twice the stall bound.

    `/healthz` already fails after one bound, but behind a port shared by several workers a liveness probe
    reaches a random one and may never see the wedged worker; so the worker restarts itself (uvicorn's supervisor
    starts a replacement; a single-process serve exits and systemd or the orchestrator restarts it). Its leases
    expire and other workers take its conversations over.
    """

    def __init__(self, monitors: Callable[[], Sequence[LoopMonitor]], bound: float,
                 on_wedged: Callable[[str], None] = exit_wedged) -> None:
        self.monitors = monitors
        self.bound = bound
        self.on_wedged = on_wedged
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watibot-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.bound / 4):
            problems = [problem for monitor in self.monitors() if (problem := monitor.problem(2 * self.bound))]
            if problems:
                reason = "; ".join(problems)
                log.critical("exiting so that this worker is restarted: %s", reason)
                self.on_wedged(reason)
                return
