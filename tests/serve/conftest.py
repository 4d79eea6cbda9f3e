"""API fixtures: tiny real bundles, an app under TestClient, and a real uvicorn server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_testing import expected_probabilities, read_dataset, wait_ready

from catsdogs.serve.app import create_app
from catsdogs.settings import Settings
from fakes import WEIGHTS_A, build_bundle
from support import Server, start_catsdogs


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
def smoke_bundle(tmp_path: Path, images: list[tuple[str, str, bytes]]) -> Path:
    """A bundle whose samples are a cat and a dog its tiny model labels correctly.

    The tiny model only sees mean colour, so pick the "doggiest" dog and the "cattiest" cat by its
    score and put the decision threshold (the bias) between them.
    """

    def score(data: bytes) -> float:
        probs = expected_probabilities(WEIGHTS_A, data)
        return float(np.log(probs[1] / probs[0]))

    cats = sorted((score(d), n, d) for n, label, d in images if label == "cat")
    dogs = sorted((score(d), n, d) for n, label, d in images if label == "dog")
    cat, dog = cats[0], dogs[-1]
    assert dog[0] > cat[0], "need one dog that scores above one cat"
    bias = np.array([(cat[0] + dog[0]) / 2, 0.0], dtype=np.float32)
    samples = {cat[1]: cat[2], dog[1]: dog[2]}
    return build_bundle(tmp_path / "smoke_bundle", WEIGHTS_A, samples=samples, bias=bias)


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


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(env: dict[str, str], *, wait: bool = True, host: str = "127.0.0.1") -> Server:
        """``host`` is the address bound; the tests reach every one of them through 127.0.0.1."""
        defaults = {"CATSDOGS_CACHE_DIR": str(tmp_path / "cache"), "CATSDOGS_RELOAD_INTERVAL_S": "0"}
        server = start_catsdogs(
            ["serve"], {**defaults, **env}, cwd=tmp_path, host=host, ready="/ready" if wait else None
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
