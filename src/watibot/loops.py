"""What keeps a background loop alive and visible: error handling, backoff and a progress clock.

Every loop of a worker (the sweeper's claim loop, the lease heartbeat) runs its iterations through a
`LoopMonitor`: an iteration that raises anything is logged (once per distinct error, with its SQLSTATE, and
again when the loop recovers), the loop waits a bounded, jittered backoff and goes on. Each completed iteration,
failed or not, moves the progress clock; `/healthz` fails when a loop's clock has stood still past
`WATIBOT_LOOP_STALL_SECONDS` or its task has ended, so systemd or Kubernetes restarts a wedged process.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

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
