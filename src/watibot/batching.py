"""Group commit: many callers' writes in one statement, one round trip and one commit.

Each caller still awaits its own committed result, so nothing is acknowledged (a webhook's 200, a WATI send
after its "sending" mark) before its row is durable. Whoever arrives while a batch is running joins the next:
an idle worker writes at once, a busy one writes in batches as large as the load makes them, with no timer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from watibot.db import DatabaseUnavailable

log = logging.getLogger("watibot.batching")

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Runs submitted items through `run` in batches of at most `max_size`, `max_running` batches at a time.

    `run` gets a list of items and returns one result per item, in order: a value, or an exception for that
    item alone. If `run` raises `DatabaseUnavailable`, every item of the batch gets it (the batch's outcome is
    unknown: it may have committed). Any other error rolled the whole statement back, so each item is run again
    on its own, and only the item that fails alone gets the error: one bad row never fails its neighbours.
    A caller cancelled before its batch started is left out of it.

    Each item gets its answer within `timeout` seconds of its submission, or `DatabaseUnavailable`: an item that
    waited that long is not started any more, and a batch may run only until its oldest item's deadline. One
    timer per batch, not one per caller (a timer per webhook was 8 % of a worker's time).
    """

    def __init__(
        self, run: Callable[[list[T]], Awaitable[Sequence[R | Exception]]], *, timeout: float,
        max_size: int = 100, max_running: int = 2, name: str = "batch",
    ) -> None:
        self._run = run
        self._timeout = timeout
        self._max_size = max_size
        self._max_running = max_running
        self._name = name
        self._pending: list[tuple[T, asyncio.Future[R], float]] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # batches run, for tests and benchmarks
        self.items = 0

    @property
    def waiting(self) -> int:
        """Items submitted and not yet taken into a batch."""
        return len(self._pending)

    async def submit(self, item: T) -> R:
        """Run `item` in the next batch and return its result (or raise its error)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future, loop.time() + self._timeout))
        if self._running < self._max_running:
            self._running += 1
            task = asyncio.create_task(self._drain(), name=f"watibot-{self._name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                taken, self._pending = self._pending[: self._max_size], self._pending[self._max_size:]
                now = loop.time()
                batch = []
                for item, future, deadline in taken:
                    if future.done():
                        continue
                    if deadline <= now:
                        future.set_exception(self._late())
                    else:
                        batch.append((item, future))
                if batch:
                    await self._run_batch(batch, min(deadline for *_, deadline in taken if deadline > now))
        finally:
            self._running -= 1

    def _late(self) -> DatabaseUnavailable:
        return DatabaseUnavailable(f"no answer from the database within {self._timeout:g} s")

    async def _run_batch(self, batch: list[tuple[T, asyncio.Future[R]]], deadline: float) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            async with asyncio.timeout_at(deadline):
                results = await self._run([item for item, _ in batch])
        except TimeoutError:
            results = [self._late()] * len(batch)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except DatabaseUnavailable as error:
            results = [error] * len(batch)
        except Exception as error:
            if len(batch) == 1:
                results = [error]
            else:
                log.warning("%s of %d failed (%s: %s); running each on its own", self._name, len(batch),
                            type(error).__name__, error)
                results = [await self._alone(item) for item, _ in batch]
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _alone(self, item: T) -> R | Exception:
        try:
            return (await self._run([item]))[0]
        except Exception as error:
            return error
