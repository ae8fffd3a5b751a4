"""deploy/: the files an operator installs are checked with the tools available here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import RunningApp, app_settings
from tests.test_metrics import scrape
from watibot.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
WATIBOT_BINARY = Path(sys.executable).parent / "watibot"


def rendered_default(name: str) -> str:
    """A setting's default as the example environment file spells it."""
    default = Settings.model_fields[name].default
    if default is None:
        return ""
    if hasattr(default, "get_secret_value"):
        return str(default.get_secret_value())
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(getattr(default, "value", default))


def test_example_environment_file_lists_every_setting_with_its_default() -> None:
    """deploy/watibot.env.example names each Settings field once, and each commented line shows the real default."""
    text = (DEPLOY / "watibot.env.example").read_text()
    entries = re.findall(r"^(#?)(WATIBOT_[A-Z_]+)=(.*)$", text, flags=re.MULTILINE)
    names = [name for _, name, _ in entries]
    assert sorted(names) == sorted(f"WATIBOT_{field.upper()}" for field in Settings.model_fields)
    for commented, name, value in entries:
        field = name.removeprefix("WATIBOT_").lower()
        if commented:
            assert value == rendered_default(field), name
        previous = text[: text.index(f"{commented}{name}=")].rstrip().splitlines()[-1]
        assert previous.startswith("# "), f"{name} has a comment saying what it is"


def test_example_environment_file_is_a_valid_configuration(tmp_path: Path) -> None:
    """Loaded as an env file, the example passes validation (placeholders included)."""
    env_file = tmp_path / "watibot.env"
    shutil.copy(DEPLOY / "watibot.env.example", env_file)
    settings = Settings(_env_file=env_file)  # type: ignore[call-arg]
    assert settings.database_url is not None and settings.database_url.startswith("postgresql://")


def verified_units(tmp_path: Path, *names: str) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify on copies of the units pointing at this virtualenv's watibot."""
    for name in names:
        text = (DEPLOY / name).read_text().replace("/opt/watibot/.venv/bin/watibot", str(WATIBOT_BINARY))
        (tmp_path / name).write_text(text)
    return subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / name) for name in names)],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """The service, prune service and timer are valid units (binary path swapped for this checkout's)."""
    result = verified_units(tmp_path, "watibot.service", "watibot-prune.service", "watibot-prune.timer")
    assert result.returncode == 0, result.stderr
    assert "watibot" not in result.stderr, result.stderr


def test_systemd_unit_migrates_first_and_restarts_on_failure_only() -> None:
    """The unit runs migrations in ExecStartPre, serves 4 workers, restarts on failure but not on exit 2."""
    unit = (DEPLOY / "watibot.service").read_text()
    for line in ("ExecStartPre=/opt/watibot/.venv/bin/watibot migrate", "Restart=on-failure",
                 "RestartPreventExitStatus=2", "EnvironmentFile=/etc/watibot/watibot.env", "User=watibot"):
        assert f"\n{line}\n" in unit
    assert re.search(r"^ExecStart=\S+/watibot serve .*--workers 4", unit, flags=re.MULTILINE)


def test_compose_file_has_postgres_a_one_shot_migration_and_the_service() -> None:
    """compose.yaml: PostgreSQL with a healthcheck, `watibot migrate` once after it, serve after the migration."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", "watibot"}
    assert "healthcheck" in services["postgres"]
    assert services["migrate"]["command"] == ["watibot", "migrate"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"
    assert services["watibot"]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    assert services["watibot"]["command"][:2] == ["watibot", "serve"]
    for name in ("migrate", "watibot"):
        assert services[name]["environment"]["WATIBOT_DATABASE_URL"].endswith("@postgres:5432/watibot")
        assert services[name]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}


def docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not docker_compose_available(), reason="the docker CLI here has no compose plugin")
def test_docker_compose_config_parses_the_compose_file() -> None:
    """`docker compose config` (no engine needed) accepts the compose file."""
    result = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_dockerfile_is_slim_non_root_checks_healthz_and_copies_what_exists() -> None:
    """The image builds from slim Python, drops root, health-checks /healthz and copies only existing paths."""
    lines = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text()).splitlines()
    instructions = [line.split(None, 1) for line in lines if line.strip() and not line.startswith("#")]
    known = {"FROM", "WORKDIR", "COPY", "RUN", "USER", "ENV", "EXPOSE", "HEALTHCHECK", "CMD"}
    assert {keyword for keyword, _ in instructions} <= known
    assert all(argument.split()[0].endswith("-slim") for keyword, argument in instructions if keyword == "FROM")
    users = [argument for keyword, argument in instructions if keyword == "USER"]
    assert users == ["watibot"]
    assert [keyword for keyword, _ in instructions].index("USER") > max(
        index for index, (keyword, _) in enumerate(instructions) if keyword == "RUN")
    (healthcheck,) = [argument for keyword, argument in instructions if keyword == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    for keyword, argument in instructions:
        if keyword == "COPY" and not argument.startswith("--from"):
            for source in argument.split()[:-1]:
                assert (ROOT / source).exists(), source
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv/" in dockerignore


def test_alert_rules_only_use_metrics_that_the_service_exports(
    run_app: Callable[..., RunningApp], database_url: str
) -> None:
    """Every watibot_* series in deploy/prometheus-alerts.yml is one that /metrics really exports."""
    rules = yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text())["groups"][0]["rules"]
    names = {alert["alert"] for alert in rules}
    assert {"WatibotNoReadyWorkers", "WatibotOverdue", "WatibotDeadBursts", "WatibotLeaseTakeovers"} <= names
    app = run_app(app_settings(database_url))
    exported = {name for name, _ in scrape(app.url)}
    used: set[str] = set()
    for alert in rules:
        used |= set(re.findall(r"\bwatibot_[a-z_]+", alert["expr"]))
    assert used, "the rules use watibot metrics"
    assert used <= exported, used - exported


def test_keda_example_query_runs_on_the_schema_and_counts_work_in_flight(database_url: str, sql: Any) -> None:
    """deploy/keda-scaledobject.yaml is valid YAML whose scaler query returns one integer on a migrated database."""
    document = yaml.safe_load((DEPLOY / "keda-scaledobject.yaml").read_text())
    (trigger,) = document["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    assert sql(trigger["metadata"]["query"]) == [(0,)]
    sql("INSERT INTO watibot.conversation (channel, customer, due_at) VALUES ('1', '2', now() - interval '1 s')")
    assert sql(trigger["metadata"]["query"]) == [(1,)]
