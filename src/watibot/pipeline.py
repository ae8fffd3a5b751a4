"""One burst, start to end: agent, then WATI, with every step fenced by the claim."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import TypeVar

from watibot import metrics
from watibot.agents import Agent, AgentError, AgentMessage, AgentRequest, Turn, load_callable
from watibot.clients import WATI_MAX_TEXT, HistoryUnavailable, SendRejected, SendUnknown, WatiClient, split_text
from watibot.db import DatabaseError, LeaseLost
from watibot.payload import describe
from watibot.settings import Settings
from watibot.store import BurstStore, SendStore
from watibot.store.records import BufferedMessage, Burst, BurstStatus, Claim, Closed, RecordedReply

log = logging.getLogger("watibot.pipeline")
T = TypeVar("T")


def build_prompt(messages: list[AgentMessage], marker: str | None = None) -> str:
    """The burst as one text: each message on its own line, in order, after the caps' marker line if any."""
    lines = [message.description for message in messages]
    return "\n".join([marker, *lines] if marker else lines)


def cap_messages(
    messages: list[AgentMessage], max_messages: int, max_chars: int
) -> tuple[list[AgentMessage], str | None]:
    """The newest messages within WATIBOT_BURST_MAX_MESSAGES and WATIBOT_BURST_MAX_CHARS (characters of their
    prompt lines, newlines included), and the marker line saying what was left out (None when nothing was).

    A newest message longer than the character cap on its own is cut to its first `max_chars` characters. Every
    message still belongs to the burst and is consumed by it: the cap bounds what the agent reads, not what is
    answered.
    """
    kept: list[AgentMessage] = []
    chars = 0
    cut_from = 0
    for message in reversed(messages):
        size = len(message.description) + (1 if kept else 0)
        if len(kept) == max_messages or chars + size > max_chars:
            if not kept:  # the newest message alone is over the cap
                cut_from = len(message.description)
                kept.append(dataclasses.replace(
                    message, description=message.description[:max_chars],
                    text=None if message.text is None else message.text[:max_chars]))
            break
        kept.append(message)
        chars += size
    kept.reverse()
    left_out = messages[: len(messages) - len(kept)]
    notes = []
    if left_out:
        left_chars = sum(len(message.description) for message in left_out)
        notes.append(f"{len(left_out)} earlier message{'s' if len(left_out) != 1 else ''} of this burst "
                     f"({left_chars} characters) left out, the newest {len(kept)} follow")
    if cut_from:
        notes.append(f"the last message is cut to its first {max_chars} of {cut_from} characters")
    return kept, (f"[watibot: {'; '.join(notes)}]" if notes else None)


REPLY_TRUNCATED = "\n[…]"


def reply_parts(text: str, max_parts: int) -> list[str]:
    """The reply split into WhatsApp messages, at most WATIBOT_REPLY_MAX_PARTS: past it the rest is dropped and
    the last part sent ends with REPLY_TRUNCATED. Deterministic: a resumed burst splits its recorded reply the
    same way."""
    return cap_parts(split_text(text), max_parts)


def cap_parts(parts: list[str], max_parts: int) -> list[str]:
    """`reply_parts` for a reply already split."""
    if len(parts) <= max_parts:
        return parts
    kept = parts[:max_parts]
    kept[-1] = kept[-1][: WATI_MAX_TEXT - len(REPLY_TRUNCATED)] + REPLY_TRUNCATED
    return kept


# Why mark_sending closed a burst instead of marking its first part (watibot.mark_sending).
_NOT_SENT = {
    "expired": "the customer's latest message is older than WhatsApp's session window (a template is needed)",
    "paused": "an operator wrote to the customer while the agent worked; the bot stays silent",
}


def local_message_id(burst_id: int, part: int, parts: int) -> str:
    """The `localMessageId` of one sent part: the burst id, with `.N` when the reply has several parts."""
    return str(burst_id) if parts == 1 else f"{burst_id}.{part + 1}"


class Pipeline:
    """Processes claimed conversations. What each step does to the burst is in migrations/schema.sql."""

    def __init__(
        self, settings: Settings, bursts: BurstStore, agent: Agent, wati: WatiClient,
        schedule_hint: Callable[[float | None], None] = lambda wait: None,
        sends: SendStore | None = None,
    ) -> None:
        self.settings = settings
        self.bursts = bursts
        self.sends = sends  # WATI's ids (V3) and the check before a resend; None: neither (no reconciliation)
        self.agent = agent
        self.wati = wati
        self.schedule_hint = schedule_hint
        self.media_resolver = load_callable(settings.media_resolver) if settings.media_resolver else None
        self.sending: set[asyncio.Task[object]] = set()  # bursts with a part between its mark and its outcome
        self.part_recorded = asyncio.Event()  # set whenever a burst leaves that stretch

    def backoff(self, attempts: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter, at least what the server asked for."""
        base = self.settings.retry_base_seconds * 2 ** max(0, attempts - 1)
        delay: float = min(self.settings.retry_max_seconds, base) * random.uniform(0.8, 1.2)  # noqa: S311 - jitter
        return max(delay, retry_after or 0.0)

    async def process(self, claim: Claim) -> None:
        """Run one claimed conversation to a committed outcome, or leave it for the lease to hand over."""
        context: dict[str, object] = {"conversation": f"{claim.channel}/{claim.customer}", "fence": claim.fence}
        metrics.observe_claim(claim)
        burst = await self._begin(claim, context)
        if burst is not None:
            await self._run(claim, burst, context)

    async def _begin(self, claim: Claim, context: dict[str, object]) -> Burst | None:
        """Begin (or resume) the burst, or report why there is none to run."""
        try:
            begun = await self.bursts.begin(claim)
        except (LeaseLost, DatabaseError) as error:
            log.warning("could not begin burst: %s", error, extra=context)
            return None
        if isinstance(begun, Closed):
            if begun.reason in {"attention", "dead"}:
                log.warning("burst closed as %s before processing", begun.reason, extra=context)
            elif begun.reason == "paused":
                log.info("conversation paused for a human operator", extra=context)
            self.schedule_hint(begun.wait_seconds)
            return None
        context["burst"] = begun.id
        if claim.previous_owner is not None:
            log.info("took over from %s (lease expired)", claim.previous_owner, extra=context)
        return begun

    async def _run(self, claim: Claim, burst: Burst, context: dict[str, object]) -> None:
        """Agent, checks, sends, completion; every failure ends in a committed state or a lease to expire."""
        try:
            answer = await self._answer(claim, burst)
            if answer is None:
                return
            parts, new_reply = answer
            await self._send(claim, burst, parts, new_reply, context)
        except SendUnknown as error:
            log.error("send outcome unknown, burst needs attention: %s", error, extra=context)
            await self._close(claim, burst, BurstStatus.ATTENTION, str(error), context)
        except (AgentError, SendRejected) as error:
            await self._failed(claim, burst, error, context)
        except LeaseLost:
            log.warning("lost the claim; another worker owns the conversation now", extra=context)
        except DatabaseError as error:
            log.error("database error mid-burst (%s); the lease will hand it over", error, extra=context)
        except asyncio.CancelledError:
            if asyncio.current_task() not in self.sending:  # no part in flight: the next holder can resume
                await self._hand_back(claim, burst, context)
            raise

    async def _send(
        self, claim: Claim, burst: Burst, parts: list[str], new_reply: RecordedReply | None,
        context: dict[str, object],
    ) -> None:
        """Send the parts not yet accepted, each fenced and recorded, then complete the burst.

        The first mark also records a new reply, and may find the burst closed instead (session window, an
        operator's pause); the last part's acceptance is recorded by the completion itself.
        """
        last = len(parts) - 1
        wait = None
        if burst.parts_sent > last:  # every part accepted before; only the completion is missing
            wait = await self._persist(functools.partial(
                self.bursts.finish, claim, burst, BurstStatus.SENT, parts_sent=len(parts)))
        for part in range(burst.parts_sent, len(parts)):
            with self._part_in_flight():
                template = self.settings.window_template
                if part == 0 and template and await self.bursts.mark_template(claim, burst, template, new_reply):
                    await self._send_template(claim, burst, template, context)
                    wait = await self._persist(functools.partial(
                        self.bursts.finish, claim, burst, BurstStatus.SENT, parts_sent=1))
                    log.warning("outside the session window: template %s sent instead of the reply", template,
                                extra=context)
                    self.schedule_hint(wait)
                    return
                closed = await self.bursts.mark_sending(claim, burst, part, new_reply)
                new_reply = None
                if closed is not None:
                    log.warning("reply not sent: %s", _NOT_SENT[closed.reason], extra=context)
                    self.schedule_hint(closed.wait_seconds)
                    return
                # SendRejected (certainly not sent) propagates: fail_burst clears the mark
                wati_ids = await self._send_part(claim, burst, parts[part], part, len(parts), context)
                # Only this worker knows WATI accepted the part: keep trying to record it through a short
                # database outage, or a taker would have to treat the send as unknown. WATI's ids for it (V3)
                # first, so that a report or echo arriving once the part is recorded finds the burst.
                if wati_ids and self.sends is not None:
                    await self._persist(functools.partial(self.sends.record_wati_ids, burst.id, part, wati_ids))
                if part < last:
                    await self._persist(functools.partial(self.bursts.part_sent, claim, burst, part))
                    continue
                wait = await self._persist(functools.partial(
                    self.bursts.finish, claim, burst, BurstStatus.SENT, parts_sent=len(parts)))
        log.info("burst sent (%d messages, %d parts)", len(burst.messages), len(parts), extra=context)
        self.schedule_hint(wait)

    async def _send_template(self, claim: Claim, burst: Burst, template: str, context: dict[str, object]) -> None:
        """Send WATIBOT_WINDOW_TEMPLATE in place of the reply. An unknown outcome is not looked up in the history
        (a template's text is WATI's, not ours to match): SendUnknown, the burst needs attention."""
        await self.wati.send_template(
            claim.wa_id or claim.customer, claim.channel, template, self.settings.window_template_parameters,
            broadcast_name=f"watibot-window-{burst.id}", local_message_id=local_message_id(burst.id, 0, 1))
        log.info("template %s accepted by WATI", template, extra=context)

    async def _send_part(self, claim: Claim, burst: Burst, text: str, part: int, parts: int,
                         context: dict[str, object]) -> tuple[str, ...]:
        """Send one part; WATI's ids for it. An unknown outcome is checked against WATI's message history
        (reconciliation): there → sent; still absent after WATIBOT_WATI_RECONCILE_SECONDS → sent once more (once:
        a second unknown outcome that is not found stays unknown), if the claim and its lease still cover a whole
        send; history unreadable → SendUnknown (attention).
        Never two sends of one part without the history saying the first is absent."""
        wa_id, local_id = claim.wa_id or claim.customer, local_message_id(burst.id, part, parts)
        grace = self.settings.wati_reconcile_seconds
        for attempt in (1, 2):
            started = datetime.now(UTC)
            try:
                # the number the customer wrote to, not the account's default
                return await self.wati.send_text(wa_id, text, local_id, channel=claim.channel)
            except SendUnknown as error:
                if grace <= 0 or self.sends is None:
                    raise
                log.warning("%s; looking for it in WATI's message history", error, extra=context)
                found = await self._find_sent(wa_id, text, local_id, claim.channel, started, error)
                if found is None:
                    await asyncio.sleep(grace)  # WATI's history may lag behind its acceptance
                    found = await self._find_sent(wa_id, text, local_id, claim.channel, started, error)
                if found is not None:
                    log.info("WATI's history has the message whose send outcome was unknown: recorded as sent",
                             extra=context)
                    return found
                if attempt == 2:
                    raise SendUnknown(f"{error} (a second time; the first was absent from WATI's history)") from None
                # Only while this worker still holds the claim with the part marked, and with lease enough left for
                # the whole send: a taker, which sees the mark and closes the burst as attention, waits for expiry.
                left = await self.sends.resend_lease_left(claim, burst.id, part)
                if left is None or left <= self.settings.wati_timeout_seconds + 1:
                    raise SendUnknown(f"{error}; absent from WATI's history, but the claim or its lease no longer "
                                      "covers a second send") from None
                log.warning("WATI's history does not have the message %g s after the unknown send: sending it "
                            "once more", grace, extra=context)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _find_sent(self, wa_id: str, text: str, local_id: str, channel: str, since: datetime,
                         error: SendUnknown) -> tuple[str, ...] | None:
        try:
            return await self.wati.find_sent(wa_id, text, local_id, channel, since)
        except HistoryUnavailable as unavailable:
            raise SendUnknown(f"{error}; {unavailable}") from None

    @contextlib.contextmanager
    def _part_in_flight(self) -> Iterator[None]:
        """From a part's "sending" mark until its outcome is recorded: a stop waits for this instead of cutting
        it (a cut send is an unknown outcome, closed as attention by whoever holds the burst next)."""
        task = asyncio.current_task()
        assert task is not None
        self.sending.add(task)
        try:
            yield
        finally:
            self.sending.discard(task)
            self.part_recorded.set()

    async def _persist(self, write: Callable[[], Awaitable[T]]) -> T:
        """Retry a fenced write while the database is unavailable, for at most one lease.

        The fence still guards it: once another worker has taken the conversation over, the write fails with
        LeaseLost instead.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.lease_seconds
        delay = 0.1
        while True:
            try:
                return await write()
            except DatabaseError:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise
                await asyncio.sleep(min(delay, remaining))  # the last try lands at the deadline, not a delay early
                delay = min(delay * 2, 2.0)

    async def _answer(self, claim: Claim, burst: Burst) -> tuple[list[str], RecordedReply | None] | None:
        """The reply to send, split in parts, and the agent's answer to record if it is new (a previous
        attempt's recorded reply is reused, never regenerated); None when the burst is already closed."""
        if burst.reply is not None:
            return reply_parts(burst.reply, self.settings.reply_max_parts), None
        messages = [
            AgentMessage(
                id=message.id,
                whatsapp_message_id=message.provider_message_id,
                type=message.type,
                text=message.text,
                timestamp=message.wati_timestamp.isoformat() if message.wati_timestamp else None,
                description=await self._describe(message),
            )
            for message in burst.messages
        ]
        history: list[Turn] = []
        if self.agent.uses_history:
            pairs = await self.bursts.history(claim, burst, self.settings.history_turns,
                                              self.settings.history_chars)
            history = [Turn(prompt, reply) for prompt, reply in pairs]
        kept, marker = cap_messages(messages, self.settings.burst_max_messages, self.settings.burst_max_chars)
        if marker is not None:
            log.info("burst over its caps: %s", marker,
                     extra={"conversation": f"{claim.channel}/{claim.customer}", "burst": burst.id})
        request = AgentRequest(
            conversation=f"{claim.channel}/{claim.customer}", wa_id=claim.wa_id, burst_id=burst.id,
            messages=kept, prompt=build_prompt(kept, marker), history=history,
        )
        started = claim.database_now()  # the database clock: hosts' clocks may be skewed
        try:
            async with asyncio.timeout(self.settings.agent_timeout_seconds):
                text = await self.agent.reply(request)
        except TimeoutError:
            raise AgentError(f"agent did not answer within {self.settings.agent_timeout_seconds:g} s") from None
        if text is None or not text.strip():
            silent = RecordedReply(request.prompt, "", 0, started)
            self.schedule_hint(await self.bursts.finish(claim, burst, BurstStatus.NO_REPLY, reply=silent))
            return None
        whole = split_text(text)
        parts = cap_parts(whole, self.settings.reply_max_parts)
        if len(whole) > len(parts):
            log.info("reply of %d parts truncated to %d (WATIBOT_REPLY_MAX_PARTS)", len(whole), len(parts),
                     extra={"conversation": request.conversation, "burst": burst.id})
        reply = RecordedReply(request.prompt, text, len(parts), started)
        if self.settings.supersede and await self.bursts.should_supersede(claim):
            log.info("newer messages arrived while the agent worked: reply discarded, burst enlarged",
                     extra={"conversation": request.conversation, "burst": burst.id})
            self.schedule_hint(await self.bursts.finish(
                claim, burst, BurstStatus.SUPERSEDED, reply=reply, record_text=True,
                error="newer messages arrived before the reply was sent: the next burst answers them all"))
            return None
        return parts, reply

    async def _describe(self, message: BufferedMessage) -> str:
        """The message's line in the prompt; a configured media resolver describes non-text messages."""
        if self.media_resolver is not None and message.type != "text":
            try:
                return str(await self.media_resolver(message))
            except Exception as error:
                log.warning("media resolver failed for message %s: %s", message.id, error)
        return describe(message.type, message.text, message.data)

    async def _failed(
        self, claim: Claim, burst: Burst, error: AgentError | SendRejected, context: dict[str, object]
    ) -> None:
        delay = self.backoff(burst.attempts, error.retry_after)
        try:
            # persisted like a part's outcome: a rejected send left its mark, which only this worker can clear
            outcome = await self._persist(functools.partial(
                self.bursts.fail, claim, burst, str(error), permanent=error.permanent, retry_in=delay))
        except (LeaseLost, DatabaseError) as db_error:
            log.warning("could not record the failure (%s): %s", error, db_error, extra=context)
            return
        if outcome.reason == "dead":
            log.error("burst dead after %d attempt(s): %s", burst.attempts, error, extra=context)
        else:
            log.warning("attempt %d failed (%s); retrying in %.1f s", burst.attempts, error, delay, extra=context)
        self.schedule_hint(outcome.wait_seconds)

    async def _close(self, claim: Claim, burst: Burst, status: BurstStatus, reason: str,
                     context: dict[str, object]) -> None:
        try:
            self.schedule_hint(await self.bursts.finish(claim, burst, status, error=reason))
        except (LeaseLost, DatabaseError) as db_error:
            log.warning("could not mark burst %s: %s", status, db_error, extra=context)

    async def _hand_back(self, claim: Claim, burst: Burst, context: dict[str, object]) -> None:
        try:
            # wait_for, not asyncio.timeout: this runs while the task is being cancelled
            await asyncio.wait_for(self.bursts.hand_back(claim, burst), self.settings.db_timeout_seconds)
            log.info("handed the claim back", extra=context)
        except (LeaseLost, DatabaseError, TimeoutError) as error:
            log.warning("could not hand back the claim (%s); its lease will expire", error, extra=context)
