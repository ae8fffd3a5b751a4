"""The ingest baseline: a bare FastAPI endpoint that reads and parses the same JSON body and touches no database.

`uvicorn bench.bare_app:app --workers N` — the same server, loop and HTTP parser as `watibot serve`.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

app = FastAPI()


@app.post("/webhook")
async def webhook(request: Request) -> JSONResponse:
    """Parse the body as watibot does (bytes, then json), answer as watibot does."""
    event = json.loads(await request.body())
    event.pop("passkey", None)
    return JSONResponse({"status": "buffered"})


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
