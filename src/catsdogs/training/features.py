"""Labelled images from the manifest, and frozen-backbone features cached on disk.

Feature extraction runs the backbone through ONNX Runtime (several times faster than eager
PyTorch on CPU). The cache is keyed by image content hash, backbone weights, preprocessing and
view, so changing any of them can never return stale features.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from catsdogs import CatsdogsError
from catsdogs.files import atomic_path
from catsdogs.preprocessing import PreprocessConfig, decode_image, preprocess

logger = logging.getLogger(__name__)

View = Literal["orig", "flip", "crop", "crop_flip"]
VIEWS: tuple[View, ...] = ("orig", "flip", "crop", "crop_flip")
CROP_FRACTION = 0.875
"""The ``crop`` views keep the central 87.5% of each side (a fixed zoom-in), then resize as usual."""
MANIFEST_COLUMNS = ("path", "label", "sha256", "split")


@dataclass(frozen=True)
class Sample:
    """One labelled image of the dataset."""

    path: Path
    label: str
    sha256: str
    split: str


def read_manifest(data_dir: Path) -> list[Sample]:
    """Read ``data_dir/manifest.csv`` (written by ``catsdogs data ingest``)."""
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        raise CatsdogsError(f"{manifest} is missing: run `catsdogs data ingest` first")
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise CatsdogsError(f"{manifest} lacks the columns {sorted(missing)}; re-run the ingest")
        return [Sample(data_dir / row["path"], row["label"], row["sha256"], row["split"]) for row in reader]


def split_samples(samples: Sequence[Sample], split: str, *, limit: int | None = None) -> list[Sample]:
    """The samples of one split in manifest order (sorted by hash), optionally the first ``limit``."""
    chosen = [sample for sample in samples if sample.split == split]
    return chosen[:limit] if limit else chosen


def load_image(path: Path) -> Image.Image:
    """Decode a stored image through the shared, safe decoder, at full size.

    No JPEG draft (:func:`catsdogs.preprocessing.decode_for_model`): the image store holds images of
    at most ``store_max_side`` (512) px, which the draft of any model above 128 px leaves as they
    are, and training keeps decoding exactly as the figures in the README were measured.
    """
    return decode_image(path.read_bytes())


def view_image(image: Image.Image, view: View) -> Image.Image:
    """The fixed (cacheable) views: the image, its mirror image, a central crop, the crop mirrored.

    Random augmentation cannot be cached; these deterministic views can, which is what makes
    frozen-feature and fine-tuning training affordable on a CPU.
    """
    if view not in VIEWS:
        raise CatsdogsError(f"unknown view {view!r}; choose from {', '.join(VIEWS)}")
    if view.startswith("crop"):
        width, height = image.size
        crop_w, crop_h = max(1, round(width * CROP_FRACTION)), max(1, round(height * CROP_FRACTION))
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h))
    return ImageOps.mirror(image) if view.endswith("flip") else image


def image_batches(
    paths: Sequence[Path],
    config: PreprocessConfig,
    *,
    view: View = "orig",
    batch_size: int = 64,
    threads: int = 2,
) -> Iterator[np.ndarray]:
    """Decode and preprocess images in a thread pool (Pillow releases the GIL) batch by batch."""

    def one(path: Path) -> np.ndarray:
        return preprocess(view_image(load_image(path), view), config)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(paths), batch_size):
            yield np.stack(list(pool.map(one, paths[start : start + batch_size])))


#: Config fields that do not change a stored image's features: training decodes the image store
#: without a draft (:func:`load_image`), and every cache so far was decoded by Pillow (``decoder``'s
#: one value), so caches written before a field existed stay valid.
_NOT_IN_FEATURES = {"class_names", "format_version", "decode_draft_factor", "decoder"}


def _config_digest(config: PreprocessConfig) -> str:
    payload = json.dumps(config.model_dump(mode="json", exclude=_NOT_IN_FEATURES), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez(handle, **arrays)


class FeatureCache:
    """Backbone features of images on disk, one file per (backbone, preprocessing, view).

    ``dtype`` is the stored and returned precision: float16 halves the memory of fine-tuning's
    spatial activations at no cost in accuracy (they feed float32 training after the lookup).
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        backbone_id: str,
        config: PreprocessConfig,
        dtype: type[np.floating] = np.float32,
    ) -> None:
        self.root = cache_dir / "features"
        self.key = f"{backbone_id}-{_config_digest(config)}"
        self.config = config
        self.dtype = dtype

    def path(self, view: View) -> Path:
        return self.root / f"{self.key}-{view}.npz"

    def load(self, view: View) -> dict[str, np.ndarray]:
        path = self.path(view)
        if not path.is_file():
            return {}
        with np.load(path) as data:
            return dict(zip(data["keys"].tolist(), data["features"], strict=True))

    def save(self, view: View, table: dict[str, np.ndarray]) -> None:
        keys = sorted(table)
        features = np.stack([table[key] for key in keys]) if keys else np.zeros((0, 0), self.dtype)
        _save_npz_atomic(self.path(view), keys=np.asarray(keys), features=features)

    def features(
        self,
        samples: Sequence[Sample],
        *,
        view: View,
        extract: Callable[[np.ndarray], np.ndarray],
        batch_size: int = 64,
        save_every: int = 4096,
        progress: bool = True,
    ) -> np.ndarray:
        """Features of ``samples`` in order; only images missing from the cache are computed.

        The cache is saved every ``save_every`` new images, so an interrupted extraction resumes.
        """
        table = self.load(view)
        unique = {sample.sha256: sample for sample in samples}
        todo = [sample for key, sample in unique.items() if key not in table]
        if todo:
            logger.info("extracting %s features of %d images (%d cached)", view, len(todo), len(table))
            bar = tqdm(total=len(todo), desc=f"features ({view})", unit="img", disable=not progress)
            done_since_save = 0
            paths = [sample.path for sample in todo]
            batches = image_batches(paths, self.config, view=view, batch_size=batch_size)
            for start, batch in zip(range(0, len(todo), batch_size), batches, strict=True):
                for sample, row in zip(todo[start : start + batch_size], extract(batch), strict=True):
                    table[sample.sha256] = row.astype(self.dtype)
                bar.update(len(batch))
                done_since_save += len(batch)
                if done_since_save >= save_every:
                    self.save(view, table)
                    done_since_save = 0
            bar.close()
            self.save(view, table)
        return np.stack([table[sample.sha256] for sample in samples]).astype(self.dtype, copy=False)
