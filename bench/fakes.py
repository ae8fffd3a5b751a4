"""The outside world for the benchmarks: a fake WATI and a fake HTTP agent, one fast aiohttp server.

Run as its own process (`python -m bench.fakes --port P`) so its CPU is not the workers'. Endpoints:
- `POST /{tenant}/api/v1/sendSessionMessage/{wa_id}`: WATI's send, answers `{"result": true}` at once and records
  (wa_id, wall time of arrival);
- `POST /agent`: the `http` agent; records (burst_id, wall time of arrival), waits `agent_delay` seconds, replies;
- `GET /stats`: counters, the agent's peak concurrency and (with `?calls=1`) every recorded agent call and WATI send
  (`calls`, `wati_calls`);
- `POST /config`: `{"agent_delay": seconds}`, resets the counters.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from aiohttp import web


class State:
    def __init__(self) -> None:
        self.agent_delay = 0.0
        self.reset()

    def reset(self) -> None:
        self.wati = 0
        self.agent = 0
        self.agent_in_flight = 0
        self.agent_peak = 0
        self.calls: list[tuple[int, float]] = []
        self.wati_calls: list[tuple[str, float]] = []


def build_app() -> web.Application:
    state = State()

    async def wati(request: web.Request) -> web.Response:
        state.wati_calls.append((request.match_info["wa_id"], time.time()))
        state.wati += 1
        return web.json_response({"result": True})

    async def agent(request: web.Request) -> web.Response:
        arrived = time.time()
        body: dict[str, Any] = await request.json()
        state.agent += 1
        state.calls.append((int(body["burst_id"]), arrived))
        state.agent_in_flight += 1
        state.agent_peak = max(state.agent_peak, state.agent_in_flight)
        try:
            if state.agent_delay:
                await asyncio.sleep(state.agent_delay)
        finally:
            state.agent_in_flight -= 1
        return web.json_response({"reply": f"ok {len(body['messages'])}"})

    async def stats(request: web.Request) -> web.Response:
        result: dict[str, Any] = {
            "wati": state.wati, "agent": state.agent, "agent_in_flight": state.agent_in_flight,
            "agent_peak": state.agent_peak,
        }
        if request.query.get("calls"):
            result["calls"] = state.calls
            result["wati_calls"] = state.wati_calls
        return web.json_response(result)

    async def config(request: web.Request) -> web.Response:
        body = await request.json()
        state.agent_delay = float(body.get("agent_delay", 0.0))
        state.reset()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/{tenant}/api/v1/sendSessionMessage/{wa_id}", wati)
    app.router.add_post("/agent", agent)
    app.router.add_get("/stats", stats)
    app.router.add_post("/config", config)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(build_app(), host="127.0.0.1", port=args.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
