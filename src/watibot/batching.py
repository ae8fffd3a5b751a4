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
    unknown: it may have committed). If it raises one of `rolled_back` (errors the server reports for a
    statement, which it then rolled back whole), each item is run again on its own and only an item that fails
    alone gets the error: one bad row never fails its neighbours. Any other error goes to every item, never
    re-run (it may have come after the commit). A caller cancelled before its batch started is left out of it.

    Deadlines: every caller gets its answer, or `DatabaseUnavailable`, within `timeout` seconds of submitting,
    from one timer per batcher re-armed to the earliest deadline (a timer per webhook was 8 % of a worker's
    time). An item already past its deadline is not started; a statement that runs on past a caller's deadline
    is not cancelled for it (the others in its batch still get their answer) but is bounded by `timeout` from
    its own start.

    `linger`: when fewer than `linger_below` items arrived while a batch ran, wait this long before starting the
    next batch so that it gathers more. The first batch after a quiet spell starts at once (an idle caller never
    waits), and so does a batch that is already large: when every client is waiting on this worker's previous
    batch, no more can arrive, and lingering would only be dead time (one worker under wrk -c64: 61 per batch
    and a quarter less throughput with an unconditional linger).
    """

    def __init__(
        self, run: Callable[[list[T]], Awaitable[Sequence[R | Exception]]], *, timeout: float,
        rolled_back: tuple[type[Exception], ...] = (), max_size: int = 100, max_running: int = 2,
        name: str = "batch", linger: float = 0.0, linger_below: int = 8,
    ) -> None:
        self._linger = linger
        self._linger_below = linger_below
        self._run = run
        self._timeout = timeout
        self._rolled_back = rolled_back
        self._max_size = max_size
        self._max_running = max_running
        self._name = name
        self._pending: list[_Entry[T, R]] = []
        self._inflight: set[_Entry[T, R]] = set()
        self._timer: asyncio.TimerHandle | None = None
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
        entry = _Entry(item, future, loop.time() + self._timeout)
        self._pending.append(entry)
        if self._timer is None:
            self._timer = loop.call_at(entry.deadline, self._expire)
        if self._running < self._max_running:
            self._running += 1
            task = asyncio.create_task(self._drain(), name=f"watibot-{self._name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    def _late(self) -> DatabaseUnavailable:
        return DatabaseUnavailable(f"no answer from the database within {self._timeout:g} s")

    def _expire(self) -> None:
        """Answer every caller past its deadline, queued or in flight; re-arm for the next deadline."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        earliest = None
        for entry in (*self._pending, *self._inflight):
            if entry.future.done():
                continue
            if entry.deadline <= now:
                entry.future.set_exception(self._late())
            elif earliest is None or entry.deadline < earliest:
                earliest = entry.deadline
        if earliest is not None:
            self._timer = loop.call_at(earliest, self._expire)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        busy = False
        try:
            while self._pending:
                if busy and self._linger and len(self._pending) < self._linger_below:
                    await asyncio.sleep(self._linger)  # under load: let the next batch fill up a little
                busy = True
                taken, self._pending = self._pending[: self._max_size], self._pending[self._max_size:]
                now = loop.time()
                batch = []
                for entry in taken:
                    if entry.future.done():
                        continue
                    if entry.deadline <= now:
                        entry.future.set_exception(self._late())
                    else:
                        batch.append(entry)
                if batch:
                    await self._run_batch(batch)
        finally:
            self._running -= 1
            if self._running == 0 and self._pending:  # drain ended abnormally: nobody would start these
                for entry in self._pending:
                    if not entry.future.done():
                        entry.future.set_exception(self._late())
                self._pending = []

    async def _run_batch(self, batch: list[_Entry[T, R]]) -> None:
        self.batches += 1
        self.items += len(batch)
        self._inflight.update(batch)
        results: Sequence[R | Exception] = []
        try:
            results = await self._results([entry.item for entry in batch])
        finally:
            self._inflight.difference_update(batch)
            for index, entry in enumerate(batch):
                if entry.future.done():
                    continue
                result = results[index] if index < len(results) else self._late()
                if isinstance(result, Exception):
                    entry.future.set_exception(result)
                else:
                    entry.future.set_result(result)

    async def _results(self, items: list[T]) -> Sequence[R | Exception]:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._run(items)
        except TimeoutError:
            return [self._late() for _ in items]
        except DatabaseUnavailable as error:
            return [DatabaseUnavailable(str(error)) for _ in items]  # one instance per caller: each raises its own
        except self._rolled_back as error:
            if len(items) == 1:
                return [error]
            log.warning("%s of %d failed (%s: %s); running each on its own", self._name, len(items),
                        type(error).__name__, error)
            return [await self._alone(item) for item in items]
        except Exception as error:
            log.exception("%s of %d failed", self._name, len(items))
            return [error for _ in items]

    async def _alone(self, item: T) -> R | Exception:
        try:
            async with asyncio.timeout(self._timeout):
                return (await self._run([item]))[0]
        except TimeoutError:
            return self._late()
        except Exception as error:
            return error


class _Entry(Generic[T, R]):
    """One submitted item: its future and its deadline (event-loop time)."""

    __slots__ = ("deadline", "future", "item")

    def __init__(self, item: T, future: asyncio.Future[R], deadline: float) -> None:
        self.item = item
        self.future = future
        self.deadline = deadline
