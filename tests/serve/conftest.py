"""API fixtures: tiny real bundles, an app under TestClient, and a real uvicorn server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from serve_testing import free_port, read_dataset, wait_ready

from catsdogs.serve.app import create_app
from catsdogs.settings import Settings
from fakes import WEIGHTS_A, build_bundle

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def images(dataset_zip: Path) -> list[tuple[str, str, bytes]]:
    """Eight real cats and eight real dogs from train.zip."""
    return read_dataset(dataset_zip, 8)


@pytest.fixture(scope="session")
def cat_jpeg(images: list[tuple[str, str, bytes]]) -> bytes:
    return images[0][2]


@pytest.fixture
def bundle_a(tmp_path: Path, images: list[tuple[str, str, bytes]]) -> Path:
    return build_bundle(tmp_path / "bundle_a", WEIGHTS_A, samples={"cat.0.jpg": images[0][2]})


@pytest.fixture
def make_client(settings: Settings, bundle_a: Path) -> Iterator[Callable[..., TestClient]]:
    """Build a started app (model loaded) with settings overrides; closed at teardown."""
    opened: list[TestClient] = []

    def make(*, ready: bool = True, **overrides: object) -> TestClient:
        values = {"model_uri": str(bundle_a), "reload_interval_s": 0.0, "batch_max_size": 1, **overrides}
        app = create_app(Settings(**{**settings.model_dump(), **values}))
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        if ready:
            wait_ready(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


class Server:
    """A real ``catsdogs serve`` process on loopback."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=5)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(env: dict[str, str], *, wait: bool = True) -> Server:
        port = free_port()
        log = tmp_path / f"server-{port}.log"
        full_env = {
            **os.environ,
            "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "CATSDOGS_CACHE_DIR": str(tmp_path / "cache"),
            "CATSDOGS_RELOAD_INTERVAL_S": "0",
            **env,
        }
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "catsdogs", "serve", "--host", "127.0.0.1", "--port", str(port)],
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        server = Server(proc, f"http://127.0.0.1:{port}", log)
        servers.append(server)
        if wait:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{server.url}/ready", timeout=1).status_code == 200:
                        return server
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None:
                    raise AssertionError(f"server exited: {log.read_text()[-3000:]}")
                time.sleep(0.1)
            raise AssertionError(f"server not ready: {log.read_text()[-3000:]}")
        return server

    yield start
    for server in servers:
        server.stop()
