"""A real Alertmanager with the repository's routing delivers a critical alert to the webhook, with
the bearer token read from the mounted secret file, and keeps warnings off the webhook.

Only what a deployment changes is rewritten in a temporary copy of the config: secret file
paths, the webhook's URL (a recording server on loopback), the SMTP host (a closed port) and
``group_wait`` (seconds instead of tens of seconds, so the test is quick).
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import requests
import yaml
from guard_support import champion, champions
from monitor_support import ALERTMANAGER_CONFIG, free_port, require_tool, stop, wait_for

from catsdogs.monitoring.guard import last_rollback
from catsdogs.settings import Settings
from support import start_catsdogs

pytestmark = pytest.mark.integration

TOKEN = "webhook-token-for-the-test"
GUARD_TOKEN = "guard-token-for-the-test"


class Recorder(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str | None, dict]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Recorder.received.append((self.headers.get("Authorization"), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    Recorder.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/catsdogs"
    server.shutdown()
    server.server_close()


def _deployable_copy(tmp_path: Path, webhook: str, *, guard: str | None = None) -> Path:
    """The repository's config with test addresses: every webhook at ``webhook`` with TOKEN, or the
    guard receiver's at ``guard`` (with its own token file, as deployed)."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "smtp_password").write_text("smtp-password-for-the-test")
    (secrets / "webhook_token").write_text(TOKEN)
    (secrets / "guard_token").write_text(GUARD_TOKEN)
    config["global"]["smtp_auth_password_file"] = str(secrets / "smtp_password")
    config["global"]["smtp_smarthost"] = f"127.0.0.1:{free_port()}"
    config["route"]["group_wait"] = "1s"
    for route in config["route"]["routes"]:
        route["group_wait"] = "1s"
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            if guard is not None and receiver["name"] == "catsdogs-guard":
                hook["url"] = f"{guard}/alertmanager"
                hook["http_config"]["authorization"]["credentials_file"] = str(secrets / "guard_token")
                continue
            hook["url"] = webhook
            hook["http_config"]["authorization"]["credentials_file"] = str(secrets / "webhook_token")
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def _alertmanager(config: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real Alertmanager on loopback with ``config``: its URL and log."""
    binary = require_tool("prometheus-alertmanager")
    port = free_port()
    log = tmp_path / "alertmanager.log"
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # no gossip port: a single instance
        "--log.level=warn",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: requests.get(f"{url}/-/ready", timeout=2).ok, timeout_s=30, what="Alertmanager", log=log
        )
        yield url, log
    finally:
        stop(process)


def test_critical_alerts_reach_the_webhook_with_the_secret_token(tmp_path: Path, webhook: str) -> None:
    with _alertmanager(_deployable_copy(tmp_path, webhook), tmp_path) as (url, log):
        alerts = [
            {"labels": {"alertname": "CatsdogsServiceDown", "severity": "critical", "job": "catsdogs-api"}},
            {"labels": {"alertname": "CatsdogsInputDrift", "severity": "warning", "feature": "brightness"}},
        ]
        assert requests.post(f"{url}/api/v2/alerts", json=alerts, timeout=5).ok
        wait_for(lambda: bool(Recorder.received), timeout_s=20, what="a webhook delivery", log=log)
        authorization, body = Recorder.received[0]
        assert authorization == f"Bearer {TOKEN}"
        assert body["receiver"] == "pager-webhook-and-email"
        assert [alert["labels"]["alertname"] for alert in body["alerts"]] == ["CatsdogsServiceDown"]
        names = {alert["labels"]["alertname"] for _, sent in Recorder.received for alert in sent["alerts"]}
        assert "CatsdogsInputDrift" not in names  # warnings go to email only


def test_the_error_rate_alert_reaches_the_guard_which_rolls_back(
    tmp_path: Path, webhook: str, guard_settings: Settings
) -> None:
    """The repository's routing, a real guard process with a token, a real registry: the firing
    error-rate alert moves champion back once, and the people are paged as well."""
    registry = champions(guard_settings, tmp_path, 2)
    assert guard_settings.feedback_store_url is not None
    env = {
        "CATSDOGS_MLFLOW_TRACKING_URI": guard_settings.mlflow_tracking_uri,
        "CATSDOGS_FEEDBACK_STORE_URL": guard_settings.feedback_store_url.get_secret_value(),
        "CATSDOGS_CACHE_DIR": str(tmp_path / "cache"),
        "CATSDOGS_GUARD_WEBHOOK_TOKEN": GUARD_TOKEN,
    }
    guard = start_catsdogs(["guard"], env, cwd=tmp_path, ready="/healthz")
    try:
        with _alertmanager(_deployable_copy(tmp_path, webhook, guard=guard.url), tmp_path) as (url, log):
            alert = {"alertname": "CatsdogsHighErrorRate", "severity": "critical"}
            assert requests.post(f"{url}/api/v2/alerts", json=[{"labels": alert}], timeout=5).ok
            wait_for(
                lambda: champion(registry) == 1, timeout_s=30, what="the guard's rollback", log=guard.log
            )
            wait_for(lambda: bool(Recorder.received), timeout_s=20, what="the page", log=log)
            assert Recorder.received[0][1]["receiver"] == "pager-webhook-and-email"
        counted = 'catsdogs_guard_rollbacks_total{trigger="alert"} 1.0'  # once the webhook has answered
        wait_for(
            lambda: counted in requests.get(f"{guard.url}/metrics", timeout=5).text,
            timeout_s=10,
            what=counted,
        )
    finally:
        guard.stop()
    record = last_rollback(guard_settings)
    assert record is not None and (record["from"], record["to"], record["trigger"]) == (2, 1, "alert")
    assert "alert CatsdogsHighErrorRate is firing" in record["reason"]
