"""The shared image pipeline: every odd upload is either decoded to upright RGB or refused with a code."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from catsdogs import CatsdogsError
from catsdogs.preprocessing import (
    FORMAT_VERSION,
    V1_DECODE_DRAFT_FACTOR,
    ImageError,
    PreprocessConfig,
    decode_for_model,
    decode_image,
    migrate,
    preprocess,
    preprocess_batch,
    softmax,
    to_array,
)
from support import DECODER_FAILURES

#: preprocessing.json as every bundle before format 2 has it (written by the code of 4fb093b).
V1_FILE = {
    "channel_order": "RGB", "class_names": ["cat", "dog"], "crop_pct": 1.0, "image_size": 280,
    "interpolation": "bilinear", "layout": "NCHW", "mean": [0.5, 0.5, 0.5], "resize": "squash",
    "std": [0.5, 0.5, 0.5],
}  # fmt: skip


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
    config = PreprocessConfig(image_size=60, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
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
    config = PreprocessConfig(image_size=260, resize="shorter_side_crop", crop_pct=0.9, decode_draft_factor=3)
    config.save(tmp_path / "preprocessing.json")
    assert PreprocessConfig.load(tmp_path / "preprocessing.json") == config
    saved = json.loads((tmp_path / "preprocessing.json").read_text())
    assert saved["format_version"] == FORMAT_VERSION == 3 and saved["decode_draft_factor"] == 3
    assert saved["decoder"] == "pillow"


def _write(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload))
    return path


def test_a_version_1_file_migrates_to_the_values_its_model_was_served_with(tmp_path: Path) -> None:
    config = PreprocessConfig.load(_write(tmp_path / "preprocessing.json", V1_FILE))
    assert config.format_version == 3
    assert config.decode_draft_factor == V1_DECODE_DRAFT_FACTOR == 2.0  # the service's setting then
    assert config.decoder == "pillow"
    assert config.model_dump(mode="json", exclude={"format_version", "decode_draft_factor", "decoder"}) == {
        **V1_FILE,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    assert migrate({**V1_FILE, "format_version": 1}) == migrate(V1_FILE)  # explicit or implied


def test_a_version_2_file_migrates_to_the_decoder_it_was_decoded_with(tmp_path: Path) -> None:
    v2 = PreprocessConfig(image_size=280, decode_draft_factor=3).model_dump(mode="json")
    v2 = {key: value for key, value in v2.items() if key != "decoder"} | {"format_version": 2}
    config = PreprocessConfig.load(_write(tmp_path / "preprocessing.json", v2))
    assert (config.format_version, config.decoder, config.decode_draft_factor) == (3, "pillow", 3)
    assert config == PreprocessConfig(image_size=280, decode_draft_factor=3)


def test_a_version_1_file_missing_one_of_its_own_keys_is_refused(tmp_path: Path) -> None:
    payload = {key: value for key, value in V1_FILE.items() if key != "mean"}
    with pytest.raises(CatsdogsError, match=r"\(format 1\) lacks mean"):
        PreprocessConfig.load(_write(tmp_path / "preprocessing.json", payload))


@pytest.mark.parametrize("key", ["decode_draft_factor", "decoder", "image_size", "class_names"])
def test_a_current_file_missing_a_key_is_an_error_not_a_default(tmp_path: Path, key: str) -> None:
    payload = PreprocessConfig(image_size=224).model_dump(mode="json")
    del payload[key]
    with pytest.raises(CatsdogsError, match=f"lacks {key}"):
        PreprocessConfig.load(_write(tmp_path / "preprocessing.json", payload))


def test_an_unknown_format_version_is_refused(tmp_path: Path) -> None:
    payload = {**PreprocessConfig(image_size=224).model_dump(mode="json"), "format_version": 4}
    with pytest.raises(CatsdogsError, match=r"format_version 4.*upgrade catsdogs"):
        PreprocessConfig.load(_write(tmp_path / "preprocessing.json", payload))


def test_an_unknown_key_or_a_bad_value_is_refused_in_one_line(tmp_path: Path) -> None:
    payload = PreprocessConfig(image_size=224).model_dump(mode="json")
    with pytest.raises(CatsdogsError, match="crop_size"):
        PreprocessConfig.load(_write(tmp_path / "a.json", {**payload, "crop_size": 200}))
    with pytest.raises(CatsdogsError, match="decode_draft_factor") as info:
        PreprocessConfig.load(_write(tmp_path / "b.json", {**payload, "decode_draft_factor": -1}))
    assert "\n" not in str(info.value)


def _phone_jpeg() -> bytes:
    """A 4000×3000 JPEG (a 12 MP phone photo's size) with detail at every scale."""
    rng = np.random.default_rng(1)
    small = Image.fromarray(rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8))
    image = small.resize((4000, 3000), Image.Resampling.BICUBIC)
    return _encode(image, "JPEG", quality=90)


def test_the_model_decode_drafts_large_jpegs_to_the_configured_factor() -> None:
    data = _phone_jpeg()
    config = PreprocessConfig(image_size=280)  # draft to no less than 560 px a side
    drafted = decode_for_model(data, config)
    assert min(drafted.size) >= config.draft_size == 560 and drafted.size == (1000, 750)  # 1/4 scale
    full = decode_for_model(data, config.model_copy(update={"decode_draft_factor": 0.0}))
    assert (
        full.size == (4000, 3000)
        and config.model_copy(update={"decode_draft_factor": 0.0}).draft_size is None
    )


@pytest.mark.parametrize("size", [(512, 512), (512, 384), (375, 500)])
@pytest.mark.parametrize("image_size", [129, 224, 280])
def test_the_draft_leaves_images_of_the_store_as_they_are(size: tuple[int, int], image_size: int) -> None:
    """Training decodes the image store (at most 512 px a side) without a draft: for any model above
    128 px the draft is a no-op there, so training, evaluation and serving see the same pixels."""
    rng = np.random.default_rng(2)
    data = _encode(Image.fromarray(rng.integers(0, 256, size=(*size[::-1], 3), dtype=np.uint8)), "JPEG")
    config = PreprocessConfig(image_size=image_size)
    np.testing.assert_array_equal(np.asarray(decode_for_model(data, config)), np.asarray(decode_image(data)))


def test_softmax_is_stable_for_large_logits() -> None:
    probs = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(probs, [[1.0, 0.0], [0.5, 0.5]])


def _raise(failure: BaseException):  # type: ignore[no-untyped-def]
    def method(self: object) -> None:
        raise failure

    return method


@pytest.mark.parametrize("failure", DECODER_FAILURES, ids=lambda exc: type(exc).__name__)
def test_any_decoder_failure_on_the_pixels_is_an_image_error(
    photo: Image.Image, failure: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", _raise(failure))
    with pytest.raises(ImageError) as caught:
        decode_for_model(_encode(photo, "PNG"), PreprocessConfig(image_size=32))
    assert caught.value.code == "decode_failed"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize("failure", DECODER_FAILURES, ids=lambda exc: type(exc).__name__)
def test_any_decoder_failure_on_the_header_is_an_image_error(
    photo: Image.Image, failure: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "_open", _raise(failure))
    with pytest.raises(ImageError) as caught:
        decode_image(_encode(photo, "PNG"))
    assert caught.value.code == "not_an_image"


@pytest.mark.parametrize("failure", [AttributeError("no attribute 'tile'"), RuntimeError("a bug")])
def test_a_programming_error_is_not_disguised_as_a_bad_image(
    photo: Image.Image, failure: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", _raise(failure))
    with pytest.raises(type(failure)):
        decode_image(_encode(photo, "PNG"))


def _tiff_with_float_strip_offsets() -> bytes:
    """A TIFF whose StripOffsets entry (tag 273) is typed FLOAT: Pillow's load() raises TypeError."""
    data = bytearray(_encode(Image.new("RGB", (48, 40), (200, 120, 40)), "TIFF"))
    assert data[:4] == b"II*\0"
    ifd = struct.unpack_from("<I", data, 4)[0]
    (count,) = struct.unpack_from("<H", data, ifd)
    entries = [ifd + 2 + 12 * i for i in range(count)]
    (entry,) = [at for at in entries if struct.unpack_from("<H", data, at)[0] == 273]
    struct.pack_into("<H", data, entry + 2, 11)
    return bytes(data)


def test_a_tiff_offset_of_the_wrong_type_is_a_bad_image() -> None:
    """Found by fuzzing the decoder (about 860,000 mutated seeds, the mutations of test_serve_fuzz.py):
    the service answered 500 to this 2-byte change of a TIFF."""
    with pytest.raises(ImageError) as caught:
        decode_image(_tiff_with_float_strip_offsets())
    assert caught.value.code == "decode_failed"
    assert "TypeError" in caught.value.detail
