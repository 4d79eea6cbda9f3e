"""The feature cache computes each (image, backbone, preprocessing, view) once and survives restarts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from catsdogs import CatsdogsError
from catsdogs.preprocessing import PreprocessConfig
from catsdogs.training.features import FeatureCache, Sample, read_manifest, split_samples, view_image


def _samples(tmp_path: Path, n: int) -> list[Sample]:
    samples = []
    for i in range(n):
        path = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (40, 40), (i * 20, 100, 200 - i * 10)).save(path)
        samples.append(Sample(path, "cat" if i % 2 else "dog", f"{i:064x}", "train"))
    return samples


class CountingExtractor:
    """Mean colour per channel as the 'feature'; counts how many images it saw."""

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.seen += len(batch)
        return batch.mean(axis=(2, 3))


def test_features_are_computed_once_and_then_read_from_disk(tmp_path: Path) -> None:
    samples = _samples(tmp_path, 6)
    config = PreprocessConfig(image_size=32)
    extractor = CountingExtractor()
    first = FeatureCache(tmp_path / "cache", backbone_id="b", config=config).features(
        samples[:4], view="orig", extract=extractor, progress=False
    )
    again = FeatureCache(tmp_path / "cache", backbone_id="b", config=config).features(
        samples, view="orig", extract=extractor, progress=False
    )
    assert extractor.seen == 6  # 4, then only the 2 new ones
    np.testing.assert_array_equal(first, again[:4])


def test_the_mirror_view_is_a_different_cache_entry(tmp_path: Path) -> None:
    path = tmp_path / "half.jpg"
    array = np.zeros((40, 40, 3), np.uint8)
    array[:, :20] = 255  # white left half: mirroring changes the features
    Image.fromarray(array).save(path)
    sample = [Sample(path, "cat", "a" * 64, "train")]
    cache = FeatureCache(tmp_path / "cache", backbone_id="b", config=PreprocessConfig(image_size=32))
    extract = lambda batch: batch[:, 0, 0, :4]  # noqa: E731 - first row, left pixels
    orig = cache.features(sample, view="orig", extract=extract, progress=False)
    flip = cache.features(sample, view="flip", extract=extract, progress=False)
    assert orig[0, 0] > 0.9 and flip[0, 0] < -0.9


def test_crop_views_zoom_into_the_centre_and_can_be_mirrored() -> None:
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 100, 100))  # white left half
    crop = view_image(image, "crop")
    assert crop.size == (175, 88)
    assert crop.getpixel((0, 44)) == (255, 255, 255) and crop.getpixel((174, 44)) == (0, 0, 0)
    assert list(view_image(image, "crop_flip").getdata()) == list(ImageOps.mirror(crop).getdata())
    assert view_image(image, "orig") is image


def test_an_unknown_view_is_refused() -> None:
    with pytest.raises(CatsdogsError, match="unknown view"):
        view_image(Image.new("RGB", (8, 8)), "rotate")  # type: ignore[arg-type]


def test_a_float16_cache_stores_and_returns_half_precision(tmp_path: Path) -> None:
    samples = _samples(tmp_path, 3)

    def half_cache() -> FeatureCache:
        config = PreprocessConfig(image_size=32)
        return FeatureCache(tmp_path / "cache", backbone_id="b", config=config, dtype=np.float16)

    computed = half_cache().features(samples, view="orig", extract=CountingExtractor(), progress=False)
    reread = half_cache().features(samples, view="orig", extract=None, progress=False)
    assert computed.dtype == reread.dtype == np.float16
    np.testing.assert_array_equal(computed, reread)


def test_changing_preprocessing_or_backbone_changes_the_cache_key(tmp_path: Path) -> None:
    base = FeatureCache(tmp_path, backbone_id="b", config=PreprocessConfig(image_size=32))
    other_size = FeatureCache(tmp_path, backbone_id="b", config=PreprocessConfig(image_size=48))
    other_norm = FeatureCache(
        tmp_path, backbone_id="b", config=PreprocessConfig(image_size=32, mean=(0, 0, 0))
    )
    other_backbone = FeatureCache(tmp_path, backbone_id="c", config=PreprocessConfig(image_size=32))
    paths = {c.path("orig") for c in (base, other_size, other_norm, other_backbone)}
    assert len(paths) == 4


def test_a_missing_manifest_says_to_run_the_ingest(tmp_path: Path) -> None:
    with pytest.raises(CatsdogsError, match="catsdogs data ingest"):
        read_manifest(tmp_path)


def test_a_manifest_without_the_split_column_is_refused(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("path,label,sha256\nimages/a.jpg,cat,00\n")
    with pytest.raises(CatsdogsError, match="split"):
        read_manifest(tmp_path)


def test_split_samples_keeps_manifest_order_and_applies_the_cap(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text(
        "path,label,sha256,phash,width,height,split\n"
        "a.jpg,cat,01,0,1,1,train\nb.jpg,dog,02,0,1,1,val\nc.jpg,dog,03,0,1,1,train\nd.jpg,cat,04,0,1,1,train\n"
    )
    samples = read_manifest(tmp_path)
    assert [s.sha256 for s in split_samples(samples, "train", limit=2)] == ["01", "03"]
    assert samples[0].path == tmp_path / "a.jpg"
