"""The thread policy: a request alone in its worker runs on every core (the latency of the bare
model); with others in flight each forward pass keeps its share of the cores (the throughput)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

import catsdogs.serve.model_store as model_store


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI's machine: two cores, so two workers of one intra-op thread each under load."""
    monkeypatch.setattr(model_store, "available_cores", lambda: 2)


def _lone(client: TestClient) -> float:
    match = re.search(r"^catsdogs_inference_lone_total (\S+)$", client.get("/metrics").text, re.M)
    assert match, "the lone-run counter is exported"
    return float(match.group(1))


def _threads(session: object) -> int:
    return session.get_session_options().intra_op_num_threads  # type: ignore[attr-defined]


def _spins(session: object) -> bool:
    options = session.get_session_options()  # type: ignore[attr-defined]
    return options.get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_a_lone_request_runs_on_every_core_and_a_crowded_one_on_its_share(
    two_cores: None, make_client: Callable[..., TestClient], cat_jpeg: bytes
) -> None:
    client = make_client()
    model = client.app.state.service.store.current  # type: ignore[attr-defined]
    assert (_threads(model.session), _threads(model.wide_session)) == (1, 2)
    # The shared session leaves its core to decoding; the lone one spins, as the other core is idle.
    assert (_spins(model.session), _spins(model.wide_session)) == (False, True)
    for _ in range(3):
        assert client.post("/predict", files={"file": ("c.jpg", cat_jpeg)}).status_code == 200
    assert _lone(client) == 3
    predictor = client.app.state.service.predictor  # type: ignore[attr-defined]
    with predictor.admit() as other:  # another request in flight in this worker
        other.reserve_images(1)
        assert client.post("/predict", files={"file": ("c.jpg", cat_jpeg)}).status_code == 200
    assert _lone(client) == 3


def test_both_sessions_give_the_same_probabilities(
    two_cores: None, make_client: Callable[..., TestClient], images: list[tuple[str, str, bytes]]
) -> None:
    client = make_client()
    predictor = client.app.state.service.predictor  # type: ignore[attr-defined]
    crowded = []
    with predictor.admit() as other:
        other.reserve_images(1)
        crowded = [client.post("/predict", files={"file": ("x", d)}).json() for _, _, d in images[:4]]
    alone = [client.post("/predict", files={"file": ("x", d)}).json() for _, _, d in images[:4]]
    for a, b in zip(alone, crowded, strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)


def test_no_second_session_when_one_call_already_has_every_core(
    two_cores: None, make_client: Callable[..., TestClient]
) -> None:
    for settings in ({"inference_workers": 1}, {"ort_lone_request_all_cores": False}):
        model = make_client(**settings).app.state.service.store.current  # type: ignore[attr-defined]
        assert model.wide_session is None


def test_the_service_keeps_numpys_blas_to_one_thread(bundle_a, tmp_path) -> None:
    """ONNX Runtime owns the cores: BLAS threads woken by the detector's products would spin beside
    it. OpenBLAS keeps its limit per thread, so it is checked where requests run: the pool threads."""
    from threadpoolctl import threadpool_info

    from catsdogs.serve.app import create_app
    from catsdogs.settings import Settings

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    app = create_app(Settings(model_uri=str(bundle_a), cache_dir=tmp_path / "cache"))
    with TestClient(app):
        pool = app.state.service.predictor._pool
        assert pool.submit(blas_threads).result() == {1}
