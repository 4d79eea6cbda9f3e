"""Serving's registry user can read the champion but not move it: MLflow's basic-auth app, for real.

One ``mlflow server --app-name basic-auth`` on a free loopback port for the module (its start takes
several seconds), with a temporary user store whose admin comes from the config file. Users are
given nothing by default (``NO_PERMISSIONS``); serving's user gets READ on the registered model and
on the experiment that holds its files, as docs/deployment.md tells an operator to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from mlflow.exceptions import MlflowException

from catsdogs.registry import CHAMPION, MlflowTracker, promote
from catsdogs.registry.model_source import make_client, resolve
from catsdogs.settings import Settings
from support import free_port

ADMIN = ("admin", "admin-password-for-tests")
SERVING = ("catsdogs-serving", "serving-password-for-tests")
EXPERIMENT = "catsdogs"


@dataclass(frozen=True)
class AuthRegistry:
    url: str
    version: int


@contextlib.contextmanager
def as_user(user: tuple[str, str]) -> Iterator[None]:
    """MLflow's client reads these variables on every request (what a pod gets from its Secret)."""
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _start(store: Path, port: int) -> subprocess.Popen:
    config = store / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{store / 'auth.db'}\n"
        f"admin_username = {ADMIN[0]}\n"
        f"admin_password = {ADMIN[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Check a password once a minute, not on every request (PBKDF2 costs ~0.1 s of CPU each time).
        "auth_cache_ttl_seconds = 60\n"
    )
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"),
        *("--artifacts-destination", str(store / "artifacts")),
    ]
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),  # CSRF for the auth app's forms
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = (store / "server.log").open("wb")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_healthy(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow basic-auth server exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    pytest.fail(f"mlflow basic-auth server not healthy within 90 s: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # the group led by the PID we started
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def _settings(url: str, root: Path) -> Settings:
    return Settings(
        data_dir=root / "data",
        cache_dir=root / "cache",
        mlflow_tracking_uri=url,
        mlflow_experiment=EXPERIMENT,
        registry_timeout_s=5.0,
    )


@pytest.fixture(scope="module")
def auth_registry(
    tmp_path_factory: pytest.TempPathFactory, _migrated_db: Path, sample_jpegs: dict[str, list[bytes]]
) -> Iterator[AuthRegistry]:
    """The server, a champion registered and promoted by the admin, and serving's read-only user."""
    from mlflow.server import get_app_client
    from registry_fakes import registry_bundle

    store = tmp_path_factory.mktemp("auth-registry")
    shutil.copy(_migrated_db, store / "mlflow.db")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start(store, port)
    try:
        _wait_healthy(process, url, store / "server.log")
        settings = _settings(url, store / "admin")
        bundle = registry_bundle(store / "bundle", sample_jpegs, accuracy=0.98, recall=None, bias=(0.0, 0.0))
        with as_user(ADMIN):
            with MlflowTracker(settings) as tracker:
                version = tracker.finish(
                    bundle_dir=bundle,
                    test_metrics=json.loads((bundle / "metrics.json").read_text()),
                    artifacts_dir=store / "none",
                    manifest_path=None,
                    report_path=None,
                )
            assert promote(settings, reason="the admin may").accepted
            users = get_app_client("basic-auth", tracking_uri=url)
            users.create_user(*SERVING)
            experiment = make_client(settings).get_experiment_by_name(EXPERIMENT)
            users.grant_user_permission(SERVING[0], "registered_model", settings.model_name, "READ")
            users.grant_user_permission(SERVING[0], "experiment", experiment.experiment_id, "READ")
        yield AuthRegistry(url, version)
    finally:
        _stop(process)


@pytest.mark.integration
def test_serving_user_resolves_and_downloads_the_champion(
    auth_registry: AuthRegistry, tmp_path: Path
) -> None:
    with as_user(SERVING):
        resolved = resolve(
            _settings(auth_registry.url, tmp_path), uri=f"models:/catsdogs-classifier@{CHAMPION}"
        )
    assert (resolved.source, resolved.version) == ("registry", str(auth_registry.version))
    assert resolved.bundle.onnx_path().is_file()


@pytest.mark.integration
def test_serving_user_cannot_move_an_alias_but_the_admin_can(
    auth_registry: AuthRegistry, tmp_path: Path
) -> None:
    settings = _settings(auth_registry.url, tmp_path)
    name, version = settings.model_name, str(auth_registry.version)
    for alias in (CHAMPION, "challenger"):  # the call promotion.move_champion makes, and any other
        with as_user(SERVING), pytest.raises(MlflowException) as refused:
            make_client(settings).set_registered_model_alias(name, alias, version)
        assert refused.value.get_http_status_code() == 403
    with as_user(ADMIN):
        make_client(settings).set_registered_model_alias(name, "challenger", version)
        aliases = make_client(settings).get_registered_model(name).aliases
    assert aliases[CHAMPION] == version and aliases["challenger"] == version


@pytest.mark.integration
def test_without_credentials_nothing_is_readable(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert key not in os.environ
    with pytest.raises(MlflowException) as refused:
        make_client(_settings(auth_registry.url, tmp_path)).get_registered_model("catsdogs-classifier")
    assert refused.value.get_http_status_code() == 401
