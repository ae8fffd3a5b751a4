"""The ASGI app factory: settings, pool, clients and the sweeper are built in the lifespan, never at import."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from watibot import db
from watibot.agents import build_agent
from watibot.clients import agent_http_client, wati_session
from watibot.ingest import WebhookFastPath
from watibot.ingest import router as ingest_router
from watibot.logs import AccessLog, configure_logging, set_worker
from watibot.loops import Watchdog, exit_wedged
from watibot.metrics import MetricsFastPath, TimedWatiClient
from watibot.metrics import router as metrics_router
from watibot.pipeline import Pipeline
from watibot.settings import Settings, load_settings
from watibot.store import InstanceStore, Stores
from watibot.sweeper import Sweeper, new_owner_id

log = logging.getLogger("watibot.app")

PASSKEY_SECRET = "webhook_passkey"  # noqa: S105 - the name of the stored secret, not a secret


async def resolve_passkey(settings: Settings, instance: InstanceStore, *, warn: bool = True) -> bytes:
    """The configured passkey, or the one generated on first start and kept in the database (a worker warns
    about that; `watibot webhook-url`, which prints it, passes `warn=False`)."""
    if settings.webhook_passkey is not None:
        return settings.webhook_passkey.get_secret_value().encode()
    value = await instance.get_or_create_secret(PASSKEY_SECRET, secrets.token_urlsafe(32))
    if warn:
        log.warning("WATIBOT_WEBHOOK_PASSKEY is not set: using the passkey generated for this database "
                    "(`watibot webhook-url` prints the URL to give WATI)")
    return value.encode()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Nothing connects until the lifespan starts."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        active = settings or load_settings()
        configure_logging(active.log_level, active.log_format)
        if not active.api_docs:
            _drop_documentation(app)
        url = db.resolve_database_url(active)
        await db.wait_for_database(url, active.db_startup_timeout_seconds)
        pool = await db.create_pool(active, url, size=active.db_pool_size - db.RESERVED_CONNECTIONS)
        reserved = await db.create_pool(active, url, size=db.RESERVED_CONNECTIONS)
        outbound = agent_http_client(active.agent_timeout_seconds, active.concurrency)
        wati_http = wati_session(active.wati_timeout_seconds, active.concurrency)
        stores = Stores.over(pool, active, reserved=reserved)
        app.state.settings = active
        app.state.stores = stores
        app.state.passkey = await resolve_passkey(active, stores.instance)
        app.state.sweeper = None
        if active.sweeper:
            wati = TimedWatiClient(active, wati_http)
            pipeline = Pipeline(active, stores.bursts, build_agent(active, outbound), wati, sends=stores.sends)
            app.state.sweeper = Sweeper(active, stores.claims, stores.instance, pipeline,
                                        new_owner_id(active.host_name))
            set_worker(app.state.sweeper.owner)
            app.state.sweeper.start()
            log.info("sweeper started as %s (concurrency %d)", app.state.sweeper.owner, active.concurrency)
            sweeper = app.state.sweeper
            watchdog = Watchdog(lambda: () if sweeper.stopping else sweeper.monitors, active.loop_stall_seconds,
                                getattr(app.state, "on_wedged", exit_wedged))  # tests observe instead of exiting
            watchdog.start()
        try:
            yield
        finally:
            if app.state.sweeper is not None:
                watchdog.stop()
                await app.state.sweeper.stop()
            await outbound.aclose()
            await wati_http.close()
            await pool.close()
            await reserved.close()

    # No redirect for a trailing slash: Starlette's would send `POST /webhook/?passkey=…` to a plain-http Location
    # carrying the passkey. `/webhook/` is a 404.
    app = FastAPI(title="watibot", version="0.1.0", lifespan=lifespan, redirect_slashes=False)
    app.include_router(ingest_router)
    app.add_middleware(WebhookFastPath)
    app.add_middleware(MetricsFastPath)
    app.add_middleware(AccessLog)  # outermost: it times the webhook's and the metrics' fast paths too
    app.include_router(metrics_router)

    app.add_api_route("/healthz", healthz, methods=["GET"],
                      responses={503: {"description": "A background loop is wedged or has ended"}})
    app.add_api_route("/readyz", readyz, methods=["GET"],
                      responses={503: {"description": "Not ready; the body says why"}})
    return app


def _drop_documentation(app: FastAPI) -> None:
    """Remove the documentation routes (WATIBOT_API_DOCS=false): they answer 404 like any unknown path."""
    paths = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) not in paths]
    app.openapi_url = app.docs_url = app.redoc_url = None


async def healthz(request: Request) -> JSONResponse:
    """Alive: the process answers and every background loop completed an iteration within
    WATIBOT_LOOP_STALL_SECONDS (a failing iteration counts: a database outage is not this process's fault)."""
    state = request.app.state
    sweeper = state.sweeper
    bound = state.settings.loop_stall_seconds
    monitors = sweeper.monitors if sweeper is not None and not sweeper.stopping else ()
    problems = [problem for monitor in monitors if (problem := monitor.problem(bound))]
    if problems:
        log.error("unhealthy: %s", "; ".join(problems))
        return JSONResponse({"status": "unhealthy", "problems": problems}, status_code=503)
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """Ready: database reachable and taking writes, schema serving this code's revision, sweeper alive."""
    state = request.app.state
    problems = []
    try:
        problems.extend(await state.stores.instance.readiness_problems())
    except db.DatabaseUnavailable:
        problems.append("database unavailable")
    except db.DatabaseError as error:
        problems.append(f"database error: {error}")
    sweeper = state.sweeper
    if sweeper is not None and not sweeper.alive:
        problems.append("sweeper not running")
    if problems:
        return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
    return JSONResponse({"status": "ready"})
