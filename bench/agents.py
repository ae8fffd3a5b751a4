"""A what-if for the slow-agent part: the same HTTP agent called through aiohttp instead of httpx.

Plugged in through watibot's public extension point (`WATIBOT_AGENT=bench.agents:aiohttp_agent`), with the URL in
`BENCH_AGENT_URL`; it posts the same JSON body as `watibot.clients.HttpAgent`. It shows what the per-request cost
of the HTTP client does to bursts in flight, without changing `src/watibot`.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import aiohttp

from watibot.agents import AgentError, AgentRequest

_session: aiohttp.ClientSession | None = None


async def aiohttp_agent(request: AgentRequest) -> str | None:
    """POST the burst to BENCH_AGENT_URL and return its `reply`."""
    global _session  # noqa: PLW0603 - one session per worker process, made on first use inside its loop
    if _session is None:
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=120))
    body: dict[str, Any] = {
        "conversation": request.conversation, "wa_id": request.wa_id, "burst_id": request.burst_id,
        "messages": [{key: value for key, value in asdict(message).items() if key != "description"}
                     for message in request.messages],
        "prompt": request.prompt,
    }
    async with _session.post(os.environ["BENCH_AGENT_URL"], json=body) as response:
        if response.status != 200:
            raise AgentError(f"agent answered HTTP {response.status}")
        data = await response.json()
    reply = data["reply"]
    return reply if isinstance(reply, str) else None
