"""Closed by default: no anonymous service on a public address unless asked for, and no operational
details (registry URL, paths, tags, load errors) for anonymous callers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from serve_testing import free_port

from catsdogs import CatsdogsError
from catsdogs.serve.server import check_exposure
from catsdogs.serve.smoke import PUBLIC_PATHS, run_smoke
from catsdogs.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_without_keys_is_allowed(host: str) -> None:
    check_exposure(Settings(host=host))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "api.example.org"])
def test_other_addresses_without_keys_are_refused(host: str) -> None:
    with pytest.raises(CatsdogsError, match=r"CATSDOGS_API_KEYS.*CATSDOGS_ALLOW_ANONYMOUS=true"):
        check_exposure(Settings(host=host))
    check_exposure(Settings(host=host, api_keys=["k"]))
    check_exposure(Settings(host=host, allow_anonymous=True))


def test_allow_anonymous_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().allow_anonymous is False
    monkeypatch.setenv("CATSDOGS_ALLOW_ANONYMOUS", "true")
    assert Settings().allow_anonymous is True


@pytest.mark.integration
def test_cli_on_every_interface_without_keys_fails_in_one_line(bundle_a: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CATSDOGS_MODEL_URI": str(bundle_a)}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "catsdogs", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith("error: refusing to serve 0.0.0.0 without API keys")
    assert "CATSDOGS_API_KEYS" in lines[0] and "CATSDOGS_ALLOW_ANONYMOUS=true" in lines[0]
    assert time.monotonic() - started < 30  # refused before any model is loaded


@pytest.mark.integration
def test_cli_on_every_interface_with_the_opt_in_starts_and_warns(
    start_server: Callable[..., object], bundle_a: Path
) -> None:
    server = start_server(
        {"CATSDOGS_MODEL_URI": str(bundle_a), "CATSDOGS_ALLOW_ANONYMOUS": "true"}, host="0.0.0.0"
    )
    assert httpx.get(f"{server.url}/ready", timeout=5).status_code == 200  # type: ignore[attr-defined]
    log = server.log.read_text()  # type: ignore[attr-defined]
    assert "without API keys (CATSDOGS_ALLOW_ANONYMOUS=true)" in log
    assert '"level": "WARNING"' in log


@pytest.mark.integration
@pytest.mark.slow
def test_workers_of_an_anonymous_public_service_show_no_details(
    start_server: Callable[..., object], bundle_a: Path
) -> None:
    """Workers rebuild their settings from the environment: the --host flag must reach them."""
    env = {"CATSDOGS_MODEL_URI": str(bundle_a), "CATSDOGS_ALLOW_ANONYMOUS": "true", "CATSDOGS_WORKERS": "2"}
    server = start_server(env, host="0.0.0.0")
    for _ in range(4):  # connections land on either worker
        info = httpx.get(f"{server.url}/model-info", timeout=5).json()  # type: ignore[attr-defined]
        assert info["uri"] is None


@pytest.mark.integration
def test_cli_on_every_interface_with_keys_starts_closed(
    start_server: Callable[..., object], bundle_a: Path, cat_jpeg: bytes
) -> None:
    server = start_server({"CATSDOGS_MODEL_URI": str(bundle_a), "CATSDOGS_API_KEYS": "k1"}, host="0.0.0.0")
    url = server.url  # type: ignore[attr-defined]
    assert httpx.post(f"{url}/predict", files={"file": ("c.jpg", cat_jpeg)}, timeout=10).status_code == 401
    assert "without API keys" not in server.log.read_text()  # type: ignore[attr-defined]


@pytest.mark.integration
def test_cli_on_loopback_without_keys_starts_as_the_quickstart_needs(
    start_server: Callable[..., object], bundle_a: Path, cat_jpeg: bytes
) -> None:
    server = start_server({"CATSDOGS_MODEL_URI": str(bundle_a)})
    url = server.url  # type: ignore[attr-defined]
    assert httpx.post(f"{url}/predict", files={"file": ("c.jpg", cat_jpeg)}, timeout=10).status_code == 200


# --- what anonymous callers see ------------------------------------------------------------------


def _leaks(text: str, *secrets: str) -> list[str]:
    return [secret for secret in secrets if secret in text]


def test_model_info_hides_where_the_model_lives_from_anonymous_callers(
    make_client: Callable[..., TestClient], bundle_a: Path
) -> None:
    client = make_client(api_keys=["key-one"], admin_token="admin-secret")
    anonymous = client.get("/model-info")
    assert anonymous.status_code == 200
    body = anonymous.json()
    assert (body["uri"], body["note"], body["registry"]) == (None, None, None)
    assert _leaks(anonymous.text, str(bundle_a), str(bundle_a.parent)) == []
    assert body["version"] and body["samples"] == ["cat.0.jpg"]  # what is served is still said
    wrong = client.get("/model-info", headers={"X-API-Key": "nope"}).json()
    assert wrong["uri"] is None
    for headers in ({"X-API-Key": "key-one"}, {"X-Admin-Token": "admin-secret"}):
        assert client.get("/model-info", headers=headers).json()["uri"] == str(bundle_a)


def test_an_anonymous_service_on_a_public_address_shows_details_to_nobody(
    make_client: Callable[..., TestClient], bundle_a: Path
) -> None:
    client = make_client(host="0.0.0.0", allow_anonymous=True)
    assert client.get("/model-info").json()["uri"] is None
    # On loopback without keys (a developer's machine), the details are there.
    assert make_client().get("/model-info").json()["uri"] == str(bundle_a)


def test_ready_hides_registry_urls_and_paths_from_anonymous_callers(
    make_client: Callable[..., TestClient], settings: Settings
) -> None:
    registry = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = make_client(
        ready=False,
        model_uri="models:/catsdogs-classifier@champion",
        mlflow_tracking_uri=registry,
        registry_timeout_s=1.0,
        api_keys=["key-one"],
    )
    deadline = time.monotonic() + 15
    keyed = {"X-API-Key": "key-one"}
    while time.monotonic() < deadline and registry not in client.get("/ready", headers=keyed).text:
        time.sleep(0.1)
    authenticated = client.get("/ready", headers=keyed)
    assert authenticated.status_code == 503 and registry in authenticated.json()["detail"]
    anonymous = client.get("/ready")
    assert anonymous.status_code == 503 and anonymous.json()["ready"] is False
    assert _leaks(anonymous.text, registry, "127.0.0.1", str(settings.cache_dir), "models:/") == []
    assert "could not be loaded" in anonymous.json()["detail"]


def test_samples_lists_the_bundle_samples_for_the_smoke_test(client: TestClient) -> None:
    assert client.get("/samples").json() == {"samples": ["cat.0.jpg"]}


# --- the public smoke test --------------------------------------------------------------------------


@contextlib.contextmanager
def _public_entry_point(upstream: str) -> Iterator[str]:
    """A loopback reverse proxy that routes what the production Ingress routes (PUBLIC_PATHS: exact
    paths, ``/samples`` as a prefix) and answers 404 to everything else."""

    class Proxy(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            path = self.path.split("?", 1)[0]
            if path not in PUBLIC_PATHS and not path.startswith("/samples/"):
                self.send_error(404)
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "content-length"}}
            answer = httpx.request(
                self.command, upstream + self.path, headers=headers, content=body, timeout=30
            )
            self.send_response(answer.status_code)
            self.send_header("Content-Type", answer.headers.get("content-type", "application/octet-stream"))
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        do_GET = do_POST = _forward

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.integration
def test_public_smoke_passes_through_the_public_routes_only(
    start_server: Callable[..., object], smoke_bundle: Path
) -> None:
    server = start_server({"CATSDOGS_MODEL_URI": str(smoke_bundle), "CATSDOGS_API_KEYS": "k"})
    url = server.url  # type: ignore[attr-defined]
    direct = run_smoke(url, api_key="k", public=True)  # the service itself routes everything
    failed = [check for check in direct.checks if not check.ok]
    assert [check.name for check in failed] == ["internal endpoints not routed"]
    assert "/metrics" in failed[0].detail and "/model-info" in failed[0].detail
    with _public_entry_point(url) as public:
        report = run_smoke(public, api_key="k", public=True)
    assert report.ok, report.checks
    assert "metrics" not in {check.name for check in report.checks}
