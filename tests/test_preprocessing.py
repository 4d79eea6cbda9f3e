"""The shared image pipeline: every odd upload is either decoded to upright RGB or refused with a code."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from catsdogs.preprocessing import (
    ImageError,
    PreprocessConfig,
    decode_image,
    preprocess,
    preprocess_batch,
    softmax,
    to_array,
)


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("CMYK", "JPEG"),
        ("L", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("1", "PNG"),
        ("RGB", "WEBP"),
    ],
)
def test_convertible_modes_become_rgb(photo: Image.Image, mode: str, fmt: str) -> None:
    image = decode_image(_encode(photo.convert(mode), fmt))
    assert (image.mode, image.size) == ("RGB", (80, 60))


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (40, 1))
    image = decode_image(_encode(Image.fromarray(ramp), "PNG"))
    pixels = np.asarray(image)[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255
    assert 100 < pixels.mean() < 155  # clipping at 255 would make nearly all pixels white


def test_transparent_pixels_are_composited_on_white(photo: Image.Image) -> None:
    rgba = photo.convert("RGBA")
    rgba.putalpha(0)
    assert np.asarray(decode_image(_encode(rgba, "PNG"))).min() == 255


def test_animated_gif_gives_its_first_frame(photo: Image.Image) -> None:
    first = Image.new("RGB", photo.size, (250, 0, 0))
    data = _encode(first, "GIF", save_all=True, append_images=[Image.new("RGB", photo.size, (0, 0, 250))])
    red, _, blue = np.asarray(decode_image(data)).mean(axis=(0, 1))
    assert red > 200 > blue


def test_exif_orientation_is_honoured(photo: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    assert decode_image(_encode(photo, "JPEG", exif=exif)).size == (60, 80)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty"),
        (b"this is a text file named cat.jpg", "not_an_image"),
        (b"%PDF-1.7 not an image", "not_an_image"),
    ],
)
def test_non_images_are_refused(data: bytes, code: str) -> None:
    with pytest.raises(ImageError) as info:
        decode_image(data)
    assert info.value.code == code


@pytest.mark.parametrize("keep", [0.05, 0.6])
def test_truncated_jpeg_is_refused(photo: Image.Image, keep: float) -> None:
    data = _encode(photo.resize((400, 300)), "JPEG")
    with pytest.raises(ImageError) as info:
        decode_image(data[: int(len(data) * keep)])
    assert info.value.code in {"truncated", "decode_failed"}


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = _encode(Image.new("1", (20_000, 20_000)), "PNG")  # 400 MP in ~50 kB
    assert len(bomb) < 200_000
    with pytest.raises(ImageError) as info:
        decode_image(bomb, max_pixels=50_000_000)
    assert info.value.code == "image_too_large"


def test_tiny_images_are_refused(photo: Image.Image) -> None:
    with pytest.raises(ImageError) as info:
        decode_image(_encode(photo.resize((8, 8)), "PNG"), min_side=32)
    assert info.value.code == "image_too_small"


def test_draft_decoding_keeps_at_least_the_requested_size(photo: Image.Image) -> None:
    data = _encode(photo.resize((2000, 1500)), "JPEG")
    image = decode_image(data, draft_size=224)
    assert min(image.size) >= 224 and image.size[0] < 2000


@pytest.mark.parametrize("policy", ["squash", "shorter_side_crop"])
def test_preprocess_gives_normalized_chw(photo: Image.Image, policy: str) -> None:
    config = PreprocessConfig(image_size=32, resize=policy, crop_pct=0.875)
    array = preprocess(photo, config)
    assert array.shape == (3, 32, 32) and array.dtype == np.float32
    assert array.min() >= -1.0 and array.max() <= 1.0  # mean=std=0.5 maps [0, 1] onto [-1, 1]


def test_to_array_is_exactly_the_textbook_normalization(photo: Image.Image) -> None:
    """The in-place CHW fill must not move a single bit: training and serving share it."""
    config = PreprocessConfig(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    pixels = np.asarray(photo, dtype=np.float32) / 255.0
    mean, std = np.asarray(config.mean, np.float32), np.asarray(config.std, np.float32)
    expected = ((pixels - mean) / std).transpose(2, 0, 1)
    array = to_array(photo, config)
    assert array.flags["C_CONTIGUOUS"] and array.dtype == np.float32
    np.testing.assert_array_equal(array, expected)


def test_exif_rotation_leaves_an_upright_photo_untouched(photo: Image.Image) -> None:
    decoded = decode_image(_encode(photo, "PNG"))
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(photo))


def test_batch_of_none_has_the_right_shape() -> None:
    assert preprocess_batch([], PreprocessConfig(image_size=16)).shape == (0, 3, 16, 16)


def test_config_round_trips_through_json(tmp_path) -> None:
    config = PreprocessConfig(image_size=260, resize="shorter_side_crop", crop_pct=0.9)
    config.save(tmp_path / "preprocessing.json")
    assert PreprocessConfig.load(tmp_path / "preprocessing.json") == config


def test_softmax_is_stable_for_large_logits() -> None:
    probs = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(probs, [[1.0, 0.0], [0.5, 0.5]])
