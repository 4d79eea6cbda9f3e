"""End to end: a real ``catsdogs serve`` on a real MLflow registry, real feedback driving the champion's
live accuracy down, a real ``catsdogs guard`` process moving ``champion`` back, the service hot-
reloading the previous version, and a client that never saw a failed request meanwhile."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from guard_support import GUARD_N, champion, champions
from monitor_support import wait_for
from PIL import Image

from catsdogs.monitoring.guard import last_rollback
from catsdogs.settings import Settings
from support import Server, start_catsdogs

pytestmark = pytest.mark.integration

#: A red image: WEIGHTS_A (v1) calls it a cat, WEIGHTS_B (v2, its opposite) a dog.
RED = Image.new("RGB", (96, 96), (220, 30, 30))


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    RED.save(buffer, format="JPEG")
    return buffer.getvalue()


class Hammer(threading.Thread):
    """A client sending ``/predict`` back to back, counting statuses and the versions that answered."""

    def __init__(self, url: str, image: bytes) -> None:
        super().__init__(daemon=True)
        self.url, self.image = url, image
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[str] = Counter()
        self.errors: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.done.is_set():
                try:
                    response = client.post("/predict", files={"file": ("red.jpg", self.image)})
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    continue
                self.statuses[response.status_code] += 1
                if response.status_code == 200:
                    self.versions[response.json()["model_version"]] += 1


@pytest.fixture
def processes() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def test_falling_live_accuracy_rolls_back_and_the_service_follows_without_a_failed_request(
    guard_settings: Settings,
    tmp_path: Path,
    processes: list[Server],
    record_property: Callable[[str, object], None],
) -> None:
    started = time.monotonic()
    settings = guard_settings
    client = champions(settings, tmp_path, 2)  # v1 (WEIGHTS_A), then v2 (WEIGHTS_B) promoted over it
    assert settings.feedback_store_url is not None
    env = {
        "CATSDOGS_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "CATSDOGS_FEEDBACK_STORE_URL": settings.feedback_store_url.get_secret_value(),
        "CATSDOGS_CACHE_DIR": str(tmp_path / "cache"),
    }
    service_env = {
        "CATSDOGS_MODEL_URI": "models:/catsdogs-classifier@champion",
        "CATSDOGS_RELOAD_INTERVAL_S": "0.3",
        "CATSDOGS_FEEDBACK_SECRET": "feedback-secret-for-the-test",
    }
    service = start_catsdogs(["serve"], {**env, **service_env}, cwd=tmp_path)
    processes.append(service)
    guard_env = {"CATSDOGS_GUARD_MIN_LABELS": str(GUARD_N), "CATSDOGS_GUARD_INTERVAL_S": "0.3"}
    guard = start_catsdogs(["guard"], {**env, **guard_env}, cwd=tmp_path, ready="/healthz")
    processes.append(guard)
    image = _jpeg()
    hammer = Hammer(service.url, image)
    hammer.start()

    with httpx.Client(base_url=service.url, timeout=10) as api:
        for index in range(2 * GUARD_N):  # v2's first N labels agree with it, the latest N do not
            answer = api.post("/predict", files={"file": ("red.jpg", image)}).json()
            assert (answer["model_version"], answer["label"]) == ("2", "dog")
            truth = "dog" if index < GUARD_N else "cat"
            feedback = api.post("/feedback", json={"prediction_id": answer["prediction_id"], "label": truth})
            assert feedback.status_code == 200, feedback.text

        wait_for(lambda: champion(client) == 1, timeout_s=15, what="champion back at v1", log=guard.log)
        served = lambda: api.post("/predict", files={"file": ("r.jpg", image)}).json()["model_version"]  # noqa: E731
        wait_for(lambda: served() == "1", timeout_s=15, what="the reload of v1", log=service.log)
        answer = api.post("/predict", files={"file": ("red.jpg", image)}).json()
        assert (answer["model_version"], answer["label"]) == ("1", "cat")
    time.sleep(0.5)  # the hammer keeps going on the reloaded model
    hammer.done.set()
    hammer.join(timeout=15)

    record = last_rollback(settings)
    assert record is not None
    assert (record["from"], record["to"], record["trigger"]) == (2, 1, "live_accuracy")
    assert "live accuracy of v2 over its latest 10 labels is 0.000" in record["reason"]
    counted = 'catsdogs_guard_rollbacks_total{trigger="live_accuracy"} 1.0'  # once its check has returned
    wait_for(lambda: counted in httpx.get(f"{guard.url}/metrics", timeout=5).text, timeout_s=10, what=counted)
    metrics = httpx.get(f"{guard.url}/metrics", timeout=5).text
    assert "catsdogs_guard_baseline_accuracy 1.0" in metrics
    sent = sum(hammer.statuses.values())
    assert hammer.errors == [] and set(hammer.statuses) == {200}, (hammer.statuses, hammer.errors[:3])
    assert hammer.versions["2"] > 0 and hammer.versions["1"] > 0, hammer.versions
    record_property("hammer_requests", sent)  # the figures docs/monitoring.md quotes (junit XML)
    record_property("versions", dict(hammer.versions))
    record_property("seconds", round(time.monotonic() - started, 1))
