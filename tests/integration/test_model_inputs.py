"""One preprocessing for every consumer of a bundle: ``catsdogs evaluate``, the MLflow pyfunc model
and the service hand the model byte-identical inputs for the same photo (a phone-size JPEG, where
the draft decode matters, included), and each of them refuses a bundle whose graph size disagrees
with its preprocessing.json."""

from __future__ import annotations

import io
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from catsdogs import CatsdogsError, runtime
from catsdogs.bundle import ONNX, PREPROCESSING, ModelBundle
from catsdogs.preprocessing import PreprocessConfig, decode_for_model, decode_image, preprocess
from catsdogs.settings import Settings
from fakes import WEIGHTS_A, build_bundle, tiny_onnx
from support import dataset_photos

IMAGE_SIZE = 280  # the default model's: drafts JPEGs to no less than 560 px a side


@pytest.fixture(scope="module")
def photos(dataset_zip: Path) -> dict[str, bytes]:
    """A real photo of the dataset, and the same photo as a 4000×3000 phone JPEG."""
    (real,) = dataset_photos(dataset_zip, "cat", 1)
    buffer = io.BytesIO()
    decode_image(real).resize((4000, 3000), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return {"cat.1.jpg": real, "cat.phone.jpg": buffer.getvalue()}


def _bundle(root: Path, *, graph_size: int = IMAGE_SIZE) -> Path:
    build_bundle(root, image_size=IMAGE_SIZE)
    if graph_size != IMAGE_SIZE:
        tiny_onnx(root / ONNX, WEIGHTS_A, image_size=graph_size)
    return root


class _Recorder:
    """Wraps every session the runtime opens and keeps the inputs the model is given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inputs: list[np.ndarray] = []
        real_open = runtime.open_session

        def recording_open(path: Any, options: Any = None) -> Any:
            session = real_open(path, options)
            real_run = session.run

            def run(outputs: Any, feeds: dict[str, np.ndarray], *args: Any) -> Any:
                self.inputs.append(np.array(feeds[runtime.INPUT_NAME], copy=True))
                return real_run(outputs, feeds, *args)

            session.run = run
            return session

        monkeypatch.setattr(runtime, "open_session", recording_open)


def _evaluate_inputs(bundle_dir: Path, photos: dict[str, bytes], tmp_path: Path, recorder: _Recorder):
    from catsdogs.training.evaluate import evaluate_bundle

    folder = tmp_path / "labelled"
    folder.mkdir()
    for name, data in photos.items():
        (folder / name).write_bytes(data)
    recorder.inputs.clear()
    evaluate_bundle(ModelBundle.open(bundle_dir), folder, progress=False)
    (batch,) = recorder.inputs  # one batch, rows in file-name order
    return dict(zip(sorted(photos), batch, strict=True))


def _pyfunc_inputs(bundle_dir: Path, photos: dict[str, bytes], recorder: _Recorder):
    from catsdogs.registry.client import BUNDLE_ARTIFACT
    from catsdogs.registry.pyfunc_model import CatsdogsOnnxModel

    model = CatsdogsOnnxModel()
    model.load_context(SimpleNamespace(artifacts={BUNDLE_ARTIFACT: str(bundle_dir)}))
    inputs = {}
    for name, data in photos.items():
        recorder.inputs.clear()
        model.predict(None, [data])
        (inputs[name],) = recorder.inputs[-1]
    return inputs


def _service_inputs(bundle_dir: Path, photos: dict[str, bytes], settings: Settings, recorder: _Recorder):
    from catsdogs.serve.app import create_app

    values = {**settings.model_dump(), "model_uri": str(bundle_dir), "reload_interval_s": 0.0}
    inputs = {}
    with TestClient(create_app(Settings(**{**values, "batch_max_size": 1}))) as client:
        _wait_ready(client)
        for name, data in photos.items():
            recorder.inputs.clear()
            response = client.post("/predict", files={"file": (name, data, "image/jpeg")})
            assert response.status_code == 200, response.text
            (inputs[name],) = recorder.inputs[-1]
    return inputs


def _wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"service not ready: {client.get('/ready').text}")


def test_evaluate_the_pyfunc_model_and_the_service_give_the_model_the_same_bytes(
    photos: dict[str, bytes], settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle_dir = _bundle(tmp_path / "bundle")
    config = PreprocessConfig.load(bundle_dir / PREPROCESSING)
    phone = decode_for_model(photos["cat.phone.jpg"], config)
    assert phone.size == (1000, 750) and config.draft_size == 560  # the draft decode is at work
    recorder = _Recorder(monkeypatch)
    evaluated = _evaluate_inputs(bundle_dir, photos, tmp_path, recorder)
    pyfunc = _pyfunc_inputs(bundle_dir, photos, recorder)
    served = _service_inputs(bundle_dir, photos, settings, recorder)
    for name in photos:
        assert evaluated[name].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and evaluated[name].dtype == np.float32
        assert evaluated[name].tobytes() == pyfunc[name].tobytes() == served[name].tobytes(), name
    # and what they share is the drafted decode, not the full one
    full = decode_for_model(photos["cat.phone.jpg"], config.model_copy(update={"decode_draft_factor": 0.0}))
    assert preprocess(full, config).tobytes() != evaluated["cat.phone.jpg"].tobytes()


def test_every_consumer_refuses_a_graph_sized_unlike_preprocessing_json(
    photos: dict[str, bytes], settings: Settings, tmp_path: Path
) -> None:
    from catsdogs.registry.client import BUNDLE_ARTIFACT
    from catsdogs.registry.pyfunc_model import CatsdogsOnnxModel
    from catsdogs.serve.model_store import ModelStore
    from catsdogs.training.evaluate import evaluate_bundle

    bundle_dir = _bundle(tmp_path / "bundle", graph_size=224)
    expected = "takes 224x224 images but preprocessing.json says 280x280"
    folder = tmp_path / "labelled"
    folder.mkdir()
    (folder / "cat.1.jpg").write_bytes(photos["cat.1.jpg"])
    with pytest.raises(CatsdogsError, match=expected):
        evaluate_bundle(ModelBundle.open(bundle_dir), folder, progress=False)
    with pytest.raises(CatsdogsError, match=expected):
        CatsdogsOnnxModel().load_context(SimpleNamespace(artifacts={BUNDLE_ARTIFACT: str(bundle_dir)}))
    store = ModelStore(settings.model_copy(update={"model_uri": str(bundle_dir)}))
    result = store.reload()
    assert not result.reloaded and store.current is None
    assert expected in (store.last_error or "")
