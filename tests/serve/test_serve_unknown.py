"""`unknown`: the service says when an upload is not a cat or dog photo (real model, real detector).

The model is a linear head on frozen EfficientNet-Lite2 features trained on 200 real photos per
class (``trust_run``); its detector was calibrated on 1,000 validation photos. The unfamiliar images
are the photos inside the scikit-image wheel (not its cat) and generated ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from serve_testing import wait_ready

from catsdogs.serve.app import create_app
from catsdogs.settings import Settings
from catsdogs.training.features import read_manifest, split_samples
from unfamiliar_images import generated_images, skimage_photos


@pytest.fixture(scope="module")
def client(trust_run, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    result, _ = trust_run
    cache = tmp_path_factory.mktemp("cache")
    with TestClient(create_app(Settings(model_uri=str(result.bundle_dir), cache_dir=cache))) as test_client:
        wait_ready(test_client)
        yield test_client


def _answers(client: TestClient, images: dict[str, bytes]) -> dict[str, dict]:
    answers = {}
    for name, data in images.items():
        response = client.post("/predict", files={"file": (name, data)})
        if response.status_code == 200:
            answers[name] = response.json()
        else:  # refused outright (e.g. under min_image_side): never a cat or a dog either
            assert response.status_code in (415, 422), (name, response.text)
    return answers


def _unknown_share(answers: dict[str, dict]) -> float:
    return sum(answer["label"] == "unknown" for answer in answers.values()) / len(answers)


def test_at_least_90_percent_of_the_scikit_image_photos_are_unknown(client: TestClient) -> None:
    photos = skimage_photos()
    answers = _answers(client, photos)
    assert len(answers) >= 20  # the wheel ships two dozen usable photos
    share = _unknown_share(answers)
    known = {name: a["label"] for name, a in answers.items() if a["label"] != "unknown"}
    assert share >= 0.9, f"{share:.2f} unknown; answered as pets: {known}"


def test_at_least_90_percent_of_generated_images_are_unknown(client: TestClient) -> None:
    answers = _answers(client, generated_images(5, seed=11))
    share = _unknown_share(answers)
    known = {name: a["label"] for name, a in answers.items() if a["label"] != "unknown"}
    assert share >= 0.9, f"{share:.2f} unknown; answered as pets: {known}"
    flat = [a for name, a in answers.items() if name.startswith("flat-")]
    assert flat and all(a["unknown_reason"] == "flat_image" for a in flat)


def test_test_split_cats_and_dogs_are_rarely_unknown(client: TestClient, trust_run) -> None:
    _, settings = trust_run
    test = split_samples(read_manifest(settings.data_dir), "test")
    answers = _answers(client, {str(s.path): s.path.read_bytes() for s in test})
    assert len(answers) == len(test) == 400
    false_unknown = _unknown_share(answers)
    assert false_unknown <= 0.01
    for answer in answers.values():  # every answer still names the most probable class
        assert answer["predicted"] in ("cat", "dog") and answer["ood_score"] is not None


def test_unknown_answers_are_counted_in_stats_and_metrics(client: TestClient) -> None:
    before = client.get("/stats").json()["counts"]["unknown"]
    blank = generated_images(1, seed=3)["flat-0.png"]
    answer = client.post("/predict", files={"file": ("blank.png", blank)}).json()
    assert answer["label"] == "unknown" and answer["unknown_reason"] == "flat_image"
    assert answer["predicted"] in ("cat", "dog")  # still named, for whoever wants it
    assert client.get("/stats").json()["counts"]["unknown"] == before + 1
    metrics = client.get("/metrics").text
    assert 'catsdogs_predictions_total{label="unknown"}' in metrics
    assert 'catsdogs_unknown_answers_total{reason="flat_image"}' in metrics


def test_unknown_answers_can_be_switched_off(trust_run, tmp_path) -> None:
    result, _ = trust_run
    settings = Settings(model_uri=str(result.bundle_dir), cache_dir=tmp_path, unknown_answers=False)
    with TestClient(create_app(settings)) as off:
        wait_ready(off)
        answer = off.post("/predict", files={"file": ("x.png", generated_images(1)["flat-0.png"])}).json()
    assert answer["label"] in ("cat", "dog") and answer["ood_score"] is None
