"""Evidence maps and their overlays: exact arithmetic on activation maps, drawn over the photo."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from catsdogs.explain import colourize, display_image, evidence, overlay_png, peak
from catsdogs.preprocessing import PreprocessConfig


def test_evidence_is_the_class_vote_minus_the_mean_vote() -> None:
    cam = np.stack([np.full((3, 3), 2.0), np.full((3, 3), -1.0)])
    cam[0, 1, 2] = 5.0
    values = evidence(cam, 0)
    assert values[1, 2] == pytest.approx((5.0 - -1.0) / 2) and values[0, 0] == pytest.approx(1.5)
    np.testing.assert_allclose(evidence(cam, 1), -values)  # two classes: one's evidence is the other's loss


def test_no_evidence_leaves_the_photo_as_it_is() -> None:
    rgba = colourize(np.full((4, 4), -1.0))
    assert (rgba[..., 3] == 0).all()
    photo = Image.new("RGB", (40, 30), (10, 120, 200))
    drawn = Image.open(io.BytesIO(overlay_png(photo, np.full((4, 4), -1.0))))
    assert drawn.format == "PNG" and drawn.size == (40, 30)
    assert np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(photo))


def test_the_strongest_place_is_the_most_opaque() -> None:
    values = np.zeros((3, 3))
    values[2, 0] = 4.0
    rgba = colourize(values)
    assert rgba[2, 0, 3] == rgba[..., 3].max() > 0 and rgba[0, 0, 3] == 0


def test_the_peak_is_the_centre_of_the_top_cell_in_image_coordinates() -> None:
    values = np.zeros((9, 9))
    values[0, 8] = 1.0
    assert peak(values, (900, 450)) == pytest.approx((850.0, 25.0))


def test_a_squashed_model_is_shown_the_whole_photo_at_its_own_aspect_ratio() -> None:
    photo = Image.new("RGB", (2000, 1000))
    shown = display_image(photo, PreprocessConfig(image_size=224))
    assert shown.size == (512, 256)
    cropped = display_image(photo, PreprocessConfig(image_size=224, resize="shorter_side_crop"))
    assert cropped.size == (224, 224)
