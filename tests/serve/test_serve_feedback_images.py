"""Images sent with a feedback label are kept as training data only where the operator enabled it,
only if they are the image the prediction classified, and without their metadata."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from fastapi.testclient import TestClient
from PIL import Image

GPS = 0x8825
ORIENTATION = 0x0112


def _phone_photo(cat_jpeg: bytes) -> bytes:
    """A real photo re-saved as a phone would: rotated by EXIF, with a GPS position and a maker."""
    with Image.open(io.BytesIO(cat_jpeg)) as image:
        big = image.convert("RGB").resize((1200, 900))
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # shown rotated by 90°
    exif[0x010F] = "PhoneMaker"
    exif[GPS] = {1: "N", 2: (52.0, 31.0, 12.0)}
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=92, exif=exif.tobytes())
    return buffer.getvalue()


def _kept(store: Path) -> list[sa.Row]:
    with sa.create_engine(f"sqlite:///{store}").connect() as connection:
        return connection.execute(sa.text("SELECT label, sha256, data FROM feedback_images")).all()


def _send(client: TestClient, photo: bytes, label: str, image: bytes | None = None) -> tuple[int, dict]:
    pid = client.post("/predict", files={"file": ("p.jpg", photo)}).json()["prediction_id"]
    files = {"file": ("p.jpg", photo if image is None else image)}
    response = client.post("/feedback", data={"prediction_id": pid, "label": label}, files=files)
    return response.status_code, response.json()


def test_a_kept_image_is_the_upright_photo_without_exif_or_gps(
    make_client: Callable[..., TestClient], cat_jpeg: bytes, tmp_path: Path
) -> None:
    store = tmp_path / "feedback.db"
    client = make_client(feedback_keep_images=True, feedback_store_url=f"sqlite:///{store}")
    status, body = _send(client, _phone_photo(cat_jpeg), "dog")
    assert status == 200 and body["image_kept"] is True and body["label"] == "dog"
    ((label, sha256, data),) = _kept(store)
    with Image.open(io.BytesIO(data)) as kept:
        assert label == "dog" and kept.format == "JPEG"
        assert kept.size == (384, 512)  # 1200×900 turned upright (900×1200), shrunk to store_max_side
        assert dict(kept.getexif()) == {} and "icc_profile" not in kept.info
    assert b"PhoneMaker" not in data
    assert sha256 == hashlib.sha256(data).hexdigest()


def test_an_image_that_is_not_the_classified_one_is_refused_and_nothing_is_recorded(
    make_client: Callable[..., TestClient], images: list[tuple[str, str, bytes]], tmp_path: Path
) -> None:
    store = tmp_path / "feedback.db"
    client = make_client(feedback_keep_images=True, feedback_store_url=f"sqlite:///{store}")
    photo, other = images[0][2], images[1][2]
    pid = client.post("/predict", files={"file": ("p.jpg", photo)}).json()["prediction_id"]
    wrong = client.post(
        "/feedback", data={"prediction_id": pid, "label": "cat"}, files={"file": ("o", other)}
    )
    assert wrong.status_code == 422 and wrong.json()["error"] == "image_mismatch"
    assert _kept(store) == []
    right = client.post(
        "/feedback", data={"prediction_id": pid, "label": "cat"}, files={"file": ("p", photo)}
    )
    assert right.status_code == 200 and right.json()["image_kept"] is True  # the label was not spent


def test_without_the_setting_the_label_counts_and_the_image_is_dropped(
    make_client: Callable[..., TestClient], cat_jpeg: bytes, tmp_path: Path
) -> None:
    store = tmp_path / "feedback.db"
    client = make_client(feedback_store_url=f"sqlite:///{store}")
    status, body = _send(client, cat_jpeg, "cat")
    assert status == 200 and body["image_kept"] is False
    assert _kept(store) == []


def test_a_form_without_a_label_or_with_an_oversized_image_is_4xx(
    make_client: Callable[..., TestClient], cat_jpeg: bytes, tmp_path: Path
) -> None:
    client = make_client(
        feedback_keep_images=True,
        feedback_store_url=f"sqlite:///{tmp_path / 'feedback.db'}",
        max_upload_bytes=len(cat_jpeg) + 10,
    )
    pid = client.post("/predict", files={"file": ("p.jpg", cat_jpeg)}).json()["prediction_id"]
    missing = client.post("/feedback", data={"prediction_id": pid}, files={"file": ("p.jpg", cat_jpeg)})
    assert missing.status_code == 422 and missing.json()["error"] == "invalid_request"
    big = client.post(
        "/feedback", data={"prediction_id": pid, "label": "cat"}, files={"file": ("p.jpg", cat_jpeg * 2)}
    )
    assert big.status_code == 413
    as_json = client.post("/feedback", json={"prediction_id": pid, "label": "cat", "extra": 1})
    assert as_json.status_code == 200  # JSON feedback is unchanged
