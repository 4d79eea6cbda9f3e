"""`POST /explain`: the prediction plus where in the photo the model saw it (real trained model)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_testing import wait_ready

from catsdogs.explain import peak
from catsdogs.serve.app import create_app
from catsdogs.settings import Settings
from fakes import build_bundle
from support import dataset_photos
from unfamiliar_images import skimage_photos

#: scikit-image photos with no person or animal in them (a face would rightly draw some evidence).
BACKGROUNDS = ("coffee.png", "rocket.jpg", "motorcycle_left.png", "brick.png", "gravel.png")


def _client(bundle: Path, cache: Path) -> TestClient:
    return TestClient(create_app(Settings(model_uri=str(bundle), cache_dir=cache)))


@pytest.fixture(scope="module")
def client(trust_run, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    result, _ = trust_run
    with _client(result.bundle_dir, tmp_path_factory.mktemp("cache")) as test_client:
        wait_ready(test_client)
        yield test_client


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def test_explain_returns_the_prediction_and_a_png_overlay_of_the_photo(
    client: TestClient, dataset_zip
) -> None:
    photo = dataset_photos(dataset_zip, "dog", 1, offset=2000)[0]
    explained = client.post("/explain", files={"file": ("dog.jpg", photo)})
    predicted = client.post("/predict", files={"file": ("dog.jpg", photo)}).json()
    assert explained.status_code == 200, explained.text
    body = explained.json()
    for key in ("label", "predicted", "confidence", "probabilities", "ood_score", "model_version"):
        assert body[key] == predicted[key]
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    original = Image.open(io.BytesIO(photo))
    assert overlay.format == "PNG" and list(overlay.size) == body["overlay_size"]
    assert abs(overlay.size[0] / overlay.size[1] - original.size[0] / original.size[1]) < 0.02
    assert body["evidence"] is None  # the raw map only on request


def test_accept_image_png_returns_the_overlay_itself(client: TestClient, dataset_zip) -> None:
    photo = dataset_photos(dataset_zip, "cat", 1, offset=2000)[0]
    response = client.post("/explain", files={"file": ("cat.jpg", photo)}, headers={"Accept": "image/png"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-catsdogs-label"] in ("cat", "dog", "unknown")
    assert Image.open(io.BytesIO(response.content)).format == "PNG"


def test_the_heat_map_peaks_on_a_pet_pasted_anywhere_on_a_photo(client: TestClient, dataset_zip) -> None:
    """A dataset cat or dog (read now, never stored) pasted at a random place on a scikit-image photo:
    the evidence for the predicted class peaks inside the pasted box in at least 9 of 10 placements."""
    rng = np.random.default_rng(2026)
    backgrounds = skimage_photos()
    pets = dataset_photos(dataset_zip, "cat", 5, offset=2100) + dataset_photos(
        dataset_zip, "dog", 5, offset=2100
    )
    hits, misses = 0, []
    for placement, data in enumerate(pets):
        background = Image.open(io.BytesIO(backgrounds[BACKGROUNDS[placement % len(BACKGROUNDS)]])).convert(
            "RGB"
        )
        background = background.resize((640, 480))
        pet = Image.open(io.BytesIO(data)).convert("RGB")
        side = int(rng.integers(220, 300))  # about 40% of the photo's width
        pet = pet.resize((side, round(side * pet.height / pet.width)))
        left = int(rng.integers(0, background.width - pet.width))
        top = int(rng.integers(0, background.height - pet.height))
        background.paste(pet, (left, top))
        response = client.post("/explain?map=true", files={"file": ("composite.jpg", _jpeg(background))})
        assert response.status_code == 200, response.text
        x, y = peak(np.asarray(response.json()["evidence"]), background.size)
        inside = left <= x <= left + pet.width and top <= y <= top + pet.height
        hits += inside
        if not inside:
            misses.append((placement, (round(x), round(y)), (left, top, pet.width, pet.height)))
    assert hits >= 9, f"peak inside the pasted pet in {hits} of 10; misses: {misses}"


def test_a_model_without_activation_maps_answers_409(tmp_path: Path) -> None:
    bundle = build_bundle(tmp_path / "bundle")  # logits only, like an MLP head or the CNN
    with _client(bundle, tmp_path / "cache") as client:
        wait_ready(client)
        image = Image.new("RGB", (96, 96), (200, 30, 30))
        response = client.post("/explain", files={"file": ("red.jpg", _jpeg(image))})
    assert response.status_code == 409
    assert response.json()["error"] == "explain_unavailable"
    assert "linear head" in response.json()["detail"]


def test_explain_refuses_bad_uploads_like_predict(client: TestClient) -> None:
    assert client.post("/explain", files={"file": ("a.txt", b"not an image")}).status_code == 415
    assert client.post("/explain", content=b"").status_code == 400
