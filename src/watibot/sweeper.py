"""The sweeper: runs in every worker process, claims due conversations and runs them through the pipeline.

Polling the database is the source of truth. The loop sleeps until the earliest `due_at` (at most
`WATIBOT_POLL_SECONDS`) and is woken sooner by hints: a webhook in this process that scheduled a conversation,
a burst that finished and left a new one due, a free slot.

Both loops (claims, heartbeat) survive every error: `loops.LoopMonitor` logs it, backs off and keeps the
progress clock that `/healthz` reads. The claim loop also re-reads the schema's compatibility every
`SCHEMA_CHECK_SECONDS` and claims nothing while the schema no longer serves this code (a rolling upgrade's
contract step): the workers of the new release take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket

from watibot.loops import LoopMonitor
from watibot.pipeline import Pipeline
from watibot.settings import Settings
from watibot.store import ClaimStore, InstanceStore
from watibot.store.records import Claim

log = logging.getLogger("watibot.sweeper")
SCHEMA_CHECK_SECONDS = 5.0
LOCKED_DUE_RETRY_SECONDS = 0.05  # when the earliest due conversation is locked by someone else


def new_owner_id(host: str | None = None) -> str:
    """A worker id that is fresh for every process start: host, pid and a random part."""
    return f"{host or socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Sweeper:
    """Claims due conversations, holds their leases, and processes up to `concurrency` at once."""

    def __init__(self, settings: Settings, claims: ClaimStore, instance: InstanceStore, pipeline: Pipeline,
                 owner: str) -> None:
        self.settings = settings
        self.claims = claims
        self.instance = instance
        self.pipeline = pipeline
        self.owner = owner
        self.in_flight: dict[tuple[str, str], tuple[Claim, asyncio.Task[None]]] = {}
        self._stopping = False
        self._wake = asyncio.Event()
        self._wake_at = float("inf")
        self._loop_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        backoff = {"backoff_base": settings.poll_seconds, "backoff_max": settings.loop_backoff_max_seconds}
        self.claim_monitor = LoopMonitor("claim", **backoff)
        self.heartbeat_monitor = LoopMonitor("heartbeat", **backoff)
        self.schema_problem: str | None = None  # set while the schema does not serve this code
        self._schema_checked_at = float("-inf")
        pipeline.schedule_hint = self.hint

    def hint(self, wait_seconds: float | None) -> None:
        """Something becomes due in `wait_seconds`: wake up then if that is sooner than planned."""
        if wait_seconds is None or self._stopping:
            return
        loop = asyncio.get_running_loop()
        target = loop.time() + max(0.0, wait_seconds)
        if target < self._wake_at:
            self._wake_at = target
            self._wake.set()

    @property
    def alive(self) -> bool:
        """Whether the claim loop is running (for /readyz)."""
        return self._loop_task is not None and not self._loop_task.done() and not self._stopping

    @property
    def stopping(self) -> bool:
        """Whether stop() has begun (the loops end then, as they should)."""
        return self._stopping

    @property
    def monitors(self) -> tuple[LoopMonitor, ...]:
        """The background loops of this worker, for /healthz."""
        return self.claim_monitor, self.heartbeat_monitor

    def start(self) -> None:
        """Start the claim loop and the heartbeat as tasks of the running loop."""
        self._loop_task = asyncio.create_task(self._run(), name="watibot-sweeper")
        self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="watibot-heartbeat")
        self.claim_monitor.task = self._loop_task
        self.heartbeat_monitor.task = self._heartbeat_task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                wait = await self._sweep_once()
                self.claim_monitor.succeeded()
                wait = self.settings.poll_seconds if wait is None else min(wait, self.settings.poll_seconds)
            except Exception as error:  # the loop must survive anything: the monitor logs it and backs off
                wait = self.claim_monitor.failed(error)
            self._wake_at = loop.time() + max(0.0, wait)
            # Sleep until _wake_at; a hint moves it earlier and sets the event so the sleep is re-measured.
            while not self._stopping and (remaining := self._wake_at - loop.time()) > 0:
                self._wake.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def _check_schema(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._schema_checked_at < SCHEMA_CHECK_SECONDS:
            return
        problem = await self.instance.schema_problem()
        self._schema_checked_at = loop.time()
        if problem != self.schema_problem:
            if problem:
                log.error("not claiming: %s", problem)
            else:
                log.info("the schema serves this code: claiming")
        self.schema_problem = problem

    async def _sweep_once(self) -> float | None:
        """Claim what is due into free slots; returns seconds until the next look is needed."""
        await self._check_schema()
        if self.schema_problem is not None:
            return None
        free = self.settings.concurrency - len(self.in_flight)
        claimed = 0
        if free > 0:
            claims = await self.claims.claim_due(self.owner, min(free, self.settings.claim_batch))
            for claim in claims:
                self._launch(claim)
            claimed = len(claims)
            if claimed == min(free, self.settings.claim_batch):
                return 0.0  # there may be more due right now
        if len(self.in_flight) >= self.settings.concurrency:
            return None  # a finishing burst wakes us
        wait = await self.claims.next_due_wait()
        if wait is not None and wait <= 0 and claimed == 0:
            # Due, yet nothing could be claimed: another worker (or a webhook) holds the row's lock right now.
            # Look again shortly instead of at once, or this loop would spin on the locked row.
            return min(self.settings.poll_seconds, LOCKED_DUE_RETRY_SECONDS)
        return wait

    def _launch(self, claim: Claim) -> None:
        key = (claim.channel, claim.customer)
        task = asyncio.create_task(self.pipeline.process(claim), name=f"burst-{claim.channel}/{claim.customer}")
        self.in_flight[key] = (claim, task)

        def finished(done: asyncio.Task[None]) -> None:
            if self.in_flight.get(key, (None, None))[1] is done:
                del self.in_flight[key]
            if not done.cancelled() and done.exception() is not None:
                log.error("burst task failed", exc_info=done.exception())
            if not self._stopping:
                self._wake_at = 0.0
                self._wake.set()

        task.add_done_callback(finished)

    async def _heartbeat(self) -> None:
        """Extend every held lease on a timer, independent of how long the agent takes."""
        loop = asyncio.get_running_loop()
        last_success = loop.time()
        wait = self.settings.heartbeat_seconds
        while True:
            await asyncio.sleep(wait)
            wait = self.settings.heartbeat_seconds
            held = list(self.in_flight.values())
            try:
                still_held = await self.claims.heartbeat(self.owner, [claim for claim, _ in held])
                last_success = loop.time()
                self.heartbeat_monitor.succeeded()
            except Exception as error:  # the loop must survive anything: the monitor logs it and backs off
                wait = min(wait, self.heartbeat_monitor.failed(error))
                if loop.time() - last_success < self.settings.lease_seconds:
                    continue
                still_held = set()  # the leases may have expired: another worker may own them now
            self._cancel_lost(held, still_held)

    def _cancel_lost(self, held: list[tuple[Claim, asyncio.Task[None]]], still_held: set[tuple[str, str]]) -> None:
        """Stop the bursts whose claims this worker no longer holds."""
        for claim, task in held:
            if (claim.channel, claim.customer) not in still_held and not task.done():
                log.warning("lease lost for %s/%s; stopping its burst", claim.channel, claim.customer,
                            extra={"conversation": f"{claim.channel}/{claim.customer}", "fence": claim.fence})
                task.cancel()

    async def stop(self) -> None:
        """Stop claiming; let in-flight bursts finish within the grace period, then hand back the rest."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        tasks = [task for _, task in self.in_flight.values()]
        if tasks:
            log.info("waiting up to %.0f s for %d bursts in flight", self.settings.shutdown_grace_seconds, len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_seconds)
            await self._cancel_between_parts(pending)

    async def _cancel_between_parts(self, pending: set[asyncio.Task[None]]) -> None:
        """Cancel what outlasted the grace period (each hands its claim back), but never a part between its
        "sending" mark and its recorded outcome: those get one send and its records more time, and are cancelled
        once they leave that stretch (or when that time is up)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.wati_timeout_seconds + 2 * self.settings.db_timeout_seconds
        cancelled: list[asyncio.Task[None]] = []
        while pending:
            for task in [task for task in pending if task not in self.pipeline.sending]:
                task.cancel()
                cancelled.append(task)
                pending.discard(task)
            if not pending or loop.time() >= deadline:
                break
            self.pipeline.part_recorded.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - loop.time()):
                    await self.pipeline.part_recorded.wait()
            pending = {task for task in pending if not task.done()}
        for task in pending:
            log.warning("a send still in flight at the end of the shutdown grace: its burst will need attention")
            task.cancel()
            cancelled.append(task)
        if cancelled:
            await asyncio.gather(*cancelled, return_exceptions=True)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
