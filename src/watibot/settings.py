"""Configuration from `WATIBOT_*` environment variables and an optional `.env` file.

Settings are built by the CLI and the app factory, never at import time.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class BufferMode(StrEnum):
    """How a conversation's `due_at` moves when more messages arrive."""

    FIXED = "fixed"
    SLIDING = "sliding"


class LogFormat(StrEnum):
    """How log lines are written to stderr."""

    TEXT = "text"
    JSON = "json"


class ConfigError(Exception):
    """An invalid setting; the message names the environment variable."""


MIN_PASSKEY_LENGTH = 16
DEFAULT_WATI_TIMEOUT_SECONDS = 15.0
_AGENT_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class Settings(BaseSettings):
    """Every setting watibot reads. Each field is the variable `WATIBOT_<NAME>`."""

    model_config = SettingsConfigDict(
        env_prefix="WATIBOT_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL DSN (postgresql://user@host:port/db). Unset: an embedded server under DATA_DIR.",
    )
    migration_database_url: str | None = Field(
        default=None,
        description="DSN that migrations use (serve's startup migration, `watibot migrate`) when the service's "
        "DSN is a transaction-pooling PgBouncer: PostgreSQL directly, or a session pool. Unset: DATABASE_URL.",
    )
    data_dir: Path = Field(default=Path(".watibot"), description="Where the embedded PostgreSQL keeps its data.")
    webhook_passkey: SecretStr | None = Field(
        default=None,
        description="Secret that WATI sends with each webhook. Unset: one is generated and kept in the database.",
    )
    webhook_max_body_bytes: Annotated[int, Field(gt=0)] = 256 * 1024
    webhook_body_timeout_seconds: Annotated[float, Field(gt=0, le=300)] = Field(
        default=10.0,
        description="A webhook whose body has not fully arrived this long after its headers gets 408 and its "
        "connection is closed.",
    )
    wati_api_url: str | None = Field(
        default=None,
        description="WATI API base including the tenant id, e.g. https://live-mt-server.wati.io/123456. "
        "Unset: replies are recorded but not sent (bursts end dead, saying so).",
    )
    wati_api: Literal["v1", "v3"] = Field(
        default="v1",
        description="WATI's send API: v1 (sendSessionMessage, the default: what existing accounts use) or v3 "
        "(POST /api/ext/v3/conversations/messages/text, JSON; WATI_API_URL's tenant id is dropped).",
    )
    wati_api_token: SecretStr = SecretStr("")
    wati_reconcile_seconds: Annotated[float, Field(ge=0)] = Field(
        default=10.0,
        description="A send whose outcome is unknown is looked up in WATI's message history: found, it counts as "
        "sent; still absent this many seconds later, it is sent once more. 0: no lookup (attention, as before).",
    )
    wati_timeout_seconds: Annotated[float, Field(gt=0)] = Field(
        default=DEFAULT_WATI_TIMEOUT_SECONDS,
        description="One WATI send. Unset: the smaller of 15 s and half of LEASE_SECONDS (a send must finish "
        "inside the lease that fences it); set, it must be below LEASE_SECONDS.",
    )
    buffer_seconds: Annotated[float, Field(ge=0)] = 65.0
    buffer_mode: BufferMode = BufferMode.FIXED
    buffer_max_seconds: Annotated[float, Field(gt=0)] = 300.0
    agent: str = Field(default="echo", description="echo | http | openai | package.module:callable")
    agent_url: str | None = None
    agent_timeout_seconds: Annotated[float, Field(gt=0)] = 120.0
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: SecretStr = SecretStr("")
    openai_model: str = "gpt-4o-mini"
    system_prompt: str = (
        "You answer WhatsApp messages for a business. The customer may send several messages in a row; "
        "answer all of them in one short, friendly reply in the customer's language."
    )
    system_prompt_file: Path | None = None
    history_turns: Annotated[int, Field(ge=0)] = 10
    history_chars: Annotated[int, Field(ge=0)] = 8000
    media_resolver: str | None = Field(
        default=None, description="package.module:function describing a non-text message for the prompt"
    )
    burst_max_messages: Annotated[int, Field(gt=0, le=100_000)] = Field(
        default=100,
        description="The most messages of one burst the agent reads (the newest); the burst still answers all.",
    )
    burst_max_chars: Annotated[int, Field(ge=100, le=10_000_000)] = Field(
        default=16_000,
        description="The most characters of one burst's prompt lines the agent reads (the newest messages).",
    )
    reply_max_parts: Annotated[int, Field(gt=0, le=1000)] = Field(
        default=10,
        description="The most WhatsApp messages one reply is sent as; the rest is dropped, the last part ends "
        "with [...].",
    )
    human_pause_seconds: Annotated[float, Field(ge=0)] = 1800.0
    human_answered: Literal["skip", "process"] = "skip"
    supersede: bool = False
    session_window_hours: Annotated[float, Field(gt=0)] = 24.0
    window_template: str | None = Field(
        default=None,
        description="An approved WATI template sent instead of the reply when the customer's latest message is "
        "outside the session window (the burst records it in burst.template). Unset: such bursts close expired.",
    )
    window_template_parameters: dict[str, str] = Field(
        default={},
        description='The template\'s parameters as a JSON object of name to value, e.g. {"name": "customer"}.',
    )
    concurrency: Annotated[int, Field(gt=0, le=10_000)] = 32
    lease_seconds: Annotated[float, Field(gt=0)] = 30.0
    max_attempts: Annotated[int, Field(gt=0)] = 5
    retry_base_seconds: Annotated[float, Field(gt=0)] = 2.0
    retry_max_seconds: Annotated[float, Field(gt=0)] = 300.0
    poll_seconds: Annotated[float, Field(gt=0)] = 1.0
    claim_batch: Annotated[int, Field(gt=0)] = 50
    shutdown_grace_seconds: Annotated[float, Field(ge=0)] = 20.0
    db_timeout_seconds: Annotated[float, Field(gt=0)] = 5.0
    db_pool_size: Annotated[int, Field(gt=2)] = 10  # 2 of them reserved: db.RESERVED_CONNECTIONS
    db_startup_timeout_seconds: Annotated[float, Field(ge=0)] = 60.0
    db_statement_cache_size: Annotated[int, Field(ge=0)] = Field(
        default=100,
        description="Prepared statements cached per connection; 0 behind PgBouncer in transaction pooling mode.",
    )
    sweeper: bool = Field(default=True, description="Run the sweeper loop in this process.")
    api_docs: bool = Field(
        default=True,
        description="Serve the API documentation (/docs, /redoc, /openapi.json); false on a public host.",
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="Bearer token that GET /metrics requires (Authorization: Bearer ...); unset: /metrics is open.",
    )
    metrics_cache_seconds: Annotated[float, Field(ge=0, le=300)] = Field(
        default=5.0,
        description="A worker reads the database for /metrics at most this often; scrapes in between (and "
        "concurrent ones) get the last reading.",
    )
    host_name: str | None = Field(
        default=None, min_length=1, max_length=100, pattern=r"^[^\s:]+$",
        description="This host's name in worker ids (host:pid:random, as in claimed_by). Unset: the hostname.",
    )
    loop_stall_seconds: Annotated[float, Field(gt=0)] = Field(
        default=60.0,
        description="/healthz fails when a background loop (claim loop, heartbeat) has not completed an "
        "iteration for this long: the process is wedged and should be restarted.",
    )
    access_log: bool = Field(
        default=False,
        description="Log one info line per HTTP request: method, path, status and milliseconds (never the query "
        "string, where the webhook's passkey travels).",
    )
    log_level: str = "info"
    log_format: LogFormat = Field(default=LogFormat.TEXT, description="text (readable) or json (one object a line).")

    @field_validator("agent")
    @classmethod
    def _known_agent(cls, value: str) -> str:
        if value in {"echo", "http", "openai"} or _AGENT_CALLABLE.match(value):
            return value
        raise ValueError("must be 'echo', 'http', 'openai' or 'package.module:callable'")

    @field_validator("media_resolver")
    @classmethod
    def _callable_name(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not _AGENT_CALLABLE.match(value):
            raise ValueError("must be 'package.module:function'")
        return value

    @field_validator("window_template")
    @classmethod
    def _template_name(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("webhook_passkey")
    @classmethod
    def _long_passkey(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_PASSKEY_LENGTH:
            raise ValueError(f"must be at least {MIN_PASSKEY_LENGTH} characters (use a long random secret)")
        return value

    @field_validator("metrics_token")
    @classmethod
    def _long_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        token = value.get_secret_value()
        if len(token) < MIN_PASSKEY_LENGTH:
            raise ValueError(f"must be at least {MIN_PASSKEY_LENGTH} characters (use a long random secret)")
        if not all(33 <= ord(character) <= 126 for character in token):
            raise ValueError("must be printable ASCII without spaces (it is sent in an HTTP header)")
        return value

    @field_validator("database_url", "migration_database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql://")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.agent == "http" and not self.agent_url:
            raise ValueError("WATIBOT_AGENT_URL is required when WATIBOT_AGENT=http")
        if self.system_prompt_file is not None and not Path(self.system_prompt_file).is_file():
            raise ValueError(f"WATIBOT_SYSTEM_PROMPT_FILE: no such file {self.system_prompt_file}")
        if "wati_timeout_seconds" not in self.model_fields_set:  # the default follows the lease
            self.wati_timeout_seconds = min(DEFAULT_WATI_TIMEOUT_SECONDS, self.lease_seconds / 2)
        elif self.lease_seconds <= self.wati_timeout_seconds:
            raise ValueError(
                f"WATIBOT_LEASE_SECONDS ({self.lease_seconds:g}) must exceed WATIBOT_WATI_TIMEOUT_SECONDS "
                f"({self.wati_timeout_seconds:g}): a send must finish inside the lease that fences it (leave "
                "WATIBOT_WATI_TIMEOUT_SECONDS unset to use the smaller of 15 s and half the lease)"
            )
        slowest = max(self.heartbeat_seconds, self.loop_backoff_max_seconds) + 2 * self.db_timeout_seconds
        if self.loop_stall_seconds <= slowest:
            raise ValueError(
                f"WATIBOT_LOOP_STALL_SECONDS must exceed {slowest:g} s, the longest a healthy loop iteration takes: "
                "its sleep (at most LEASE_SECONDS / 3, or 10 x POLL_SECONDS capped at 10 s while failing) plus "
                "two DB_TIMEOUT_SECONDS (a pool wait and a statement)"
            )
        if self.buffer_mode is BufferMode.SLIDING and self.buffer_max_seconds < self.buffer_seconds:
            raise ValueError("WATIBOT_BUFFER_MAX_SECONDS must be at least WATIBOT_BUFFER_SECONDS")
        return self

    @property
    def loop_backoff_max_seconds(self) -> float:
        """The longest a failing background loop waits before its next try."""
        return max(self.poll_seconds, min(10.0, 10 * self.poll_seconds))

    @property
    def heartbeat_seconds(self) -> float:
        """How often held leases are extended: a third of the lease, so two beats may fail."""
        return self.lease_seconds / 3


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, turning validation errors into one readable `ConfigError`."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            name = "WATIBOT_" + "_".join(str(part) for part in problem["loc"]).upper() if problem["loc"] else ""
            message = problem["msg"].removeprefix("Value error, ")
            lines.append(f"{name}: {message}" if name else message)
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
