"""An example Python agent: `WATIBOT_AGENT=examples.agent:reply` (run from the repository root).

watibot calls it once per burst with every message of the burst, in order, and the customer's earlier turns.
Return the reply text, or None to stay silent. Raise `watibot.agents.AgentError` to fail the attempt (it is
retried with backoff); any other exception counts as a failed attempt too.
"""

from watibot.agents import AgentRequest


async def reply(request: AgentRequest) -> str | None:
    """Answer a booking question; stay silent on a plain thank-you."""
    text = " ".join(message.text or "" for message in request.messages).lower()
    if text.strip() in {"thanks", "thank you", "gracias"}:
        return None
    if "book" in text or "reservar" in text:
        return "Happy to help with a booking! For which date and how many people?"
    turns = len(request.history)
    return f"Thanks for your message{'s' if len(request.messages) > 1 else ''}! (we have talked {turns} times before)"
