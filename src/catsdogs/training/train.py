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

Profiles, and the resolution of a configuration into a model and its preprocessing, are in
:mod:`catsdogs.training.config`; each strategy's data in
:mod:`catsdogs.training.strategy_sources`; the loop itself (checkpoints, exact resume, early
stopping, DDP) in :mod:`catsdogs.training.loop`.
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

import torch

from catsdogs import CatsdogsError
from catsdogs.bundle import write_json_atomic
from catsdogs.malloc import freed_memory_kept
from catsdogs.preprocessing import PreprocessConfig
from catsdogs.settings import Settings
from catsdogs.training.config import apply_profile, preprocess_config_for, resolve_spec, train_params
from catsdogs.training.distributed import Dist, init_distributed
from catsdogs.training.features import Sample, read_manifest, split_samples
from catsdogs.training.loop import CHECKPOINT, Tracker, fit, selection_loss, validation_metrics
from catsdogs.training.models import (
    Ensemble,
    FinetuneTop,
    ModelSpec,
    build_model,
    divide_logits,
    mean_of_softmaxes,
    select_device,
)
from catsdogs.training.strategy_sources import cached_sources, head_sources, image_sources, labels_of

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


def train(settings: Settings, *, tracker: Tracker | None = None, resume: bool = False) -> TrainResult:
    """Train the configured model, write its complete bundle (with ONNX) and evaluate it on test."""
    from catsdogs.training.bundle_writer import write_bundle

    started = time.monotonic()
    run = _start_run(settings, tracker=tracker, resume=resume)
    settings = run.settings
    splits = _read_splits(settings)
    members = _train_members(run, splits, started=started)
    full, history, temperature, val_metrics = _combine(run, members, splits["val"])
    train_seconds = time.monotonic() - started
    bundle_dir, artifacts_dir = run.run_dir / "bundle", run.run_dir / "artifacts"
    test_metrics: dict[str, Any] = {}
    if run.dist.main:
        test_metrics = write_bundle(
            full, bundle_dir, artifacts_dir=artifacts_dir, spec=run.spec, strategy=run.strategy,
            config=run.config, settings=settings, history=history, samples=splits,
            temperature=temperature, val_metrics=val_metrics,
        )  # fmt: skip
    run.dist.barrier()
    if run.dist.world > 1:
        torch.distributed.destroy_process_group()
    elapsed = time.monotonic() - started
    logger.info("trained in %.0f s (%.0f s before export and test)", elapsed, train_seconds)
    return TrainResult(bundle_dir, history, test_metrics, run.params, artifacts_dir, elapsed, run.run_dir)


@dataclass
class _Run:
    """What every step of one training run shares: the resolved configuration and where it runs."""

    settings: Settings
    spec: ModelSpec
    strategy: str
    config: PreprocessConfig
    dist: Dist
    device: torch.device
    run_dir: Path
    params: dict[str, Any]
    fingerprint: str
    tracker: Tracker | None
    resume: bool

    def save_params(self) -> None:
        """Write the run's parameters next to it (the main process only)."""
        if self.dist.main:
            write_json_atomic(self.run_dir / "params.json", self.params)


def run_dir_for(settings: Settings) -> Path:
    """The run's folder: ``runs_dir/<run_name>``, by default named after the architecture and strategy."""
    if settings.run_name:
        return settings.runs_dir / settings.run_name
    spec, strategy = resolve_spec(settings)
    return settings.runs_dir / f"{spec.architecture}-{strategy}"


def _start_run(settings: Settings, *, tracker: Tracker | None, resume: bool) -> _Run:
    """Resolve the configuration, pick the device, and record the parameters in the run folder."""
    settings = apply_profile(settings)
    spec, strategy = resolve_spec(settings)
    config = preprocess_config_for(settings)
    device = select_device(settings.device)
    dist = init_distributed(device)
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if settings.train_bf16 and strategy == "finetune" and device.type == "cpu" and not _has_amx():
        logger.warning("train_bf16 on a CPU without AMX: bfloat16 products are emulated, training is slower")
    params = {**train_params(settings, spec, strategy, config), "world_size": dist.world}
    fingerprint = json.dumps(params, sort_keys=True, default=str)
    params["time_budget_minutes"] = settings.time_budget_minutes  # logged; a resumed run may change it
    run_dir = run_dir_for(settings)
    run = _Run(settings, spec, strategy, config, dist, device, run_dir, params, fingerprint, tracker, resume)
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        run.save_params()
        if tracker is not None:
            tracker.log_params(params)
    dist.barrier()
    return run


def _read_splits(settings: Settings) -> dict[str, list[Sample]]:
    """The train, val and test samples of the manifest (each within the configured limits)."""
    samples = read_manifest(settings.data_dir)
    splits = {
        "train": split_samples(samples, "train", limit=settings.max_train_images),
        "val": split_samples(samples, "val", limit=settings.max_eval_images),
        "test": split_samples(samples, "test", limit=settings.max_eval_images),
    }
    if not all(splits.values()):
        raise CatsdogsError("the manifest needs train, val and test images: re-run `catsdogs data ingest`")
    return splits


def _train_members(run: _Run, splits: dict[str, list[Sample]], *, started: float) -> list[_Member]:
    """Train each member of the model in turn, sharing out what is left of the time budget."""
    budget = run.settings.time_budget_minutes
    budget_end = None if budget is None else started + 60 * budget
    members: list[_Member] = []
    for index in range(run.spec.members):
        deadline = None  # an equal share of what is left to this member and each after it
        if budget_end is not None:
            now = time.monotonic()
            deadline = now + (budget_end - now) / (run.spec.members - index)
        members.append(_train_member(run, index, splits, deadline=deadline))
    return members


def _combine(
    run: _Run, members: Sequence[_Member], val_s: Sequence[Sample]
) -> tuple[torch.nn.Module, list[dict[str, float]], Any, dict[str, Any] | None]:
    """The served model (one member, or their ensemble), its history, temperature(s) and, for an
    ensemble, its own validation figures (``None``: the bundle takes the best epoch's)."""
    settings = run.settings
    val_metrics: dict[str, Any] | None = None
    if len(members) == 1:
        full, history, temperature = members[0].model, members[0].history, members[0].temperature
    else:
        full = Ensemble([member.model for member in members])
        history = [
            {**row, "member": index, "step": index * settings.epochs + row["epoch"]}
            for index, member in enumerate(members)
            for row in member.history
        ]
        val_metrics = _ensemble_validation(members, settings, val_s)
        temperature = [m.temperature for m in members] if settings.calibrate_temperature else None
        if run.dist.main and run.tracker is not None:
            run.tracker.log_epoch(
                len(members) * settings.epochs,
                {f"ensemble_{k}": v for k, v in val_metrics.items() if k.startswith("val_")},
            )
    if temperature is not None:
        run.params["temperature"] = temperature
        run.save_params()
        if run.dist.main and run.tracker is not None:
            run.tracker.log_params({"temperature": temperature})
    return full.cpu().to(memory_format=torch.contiguous_format).eval(), history, temperature, val_metrics


class _Member(NamedTuple):
    """One trained model of a run: its best weights (calibrated temperature folded in), per-epoch
    history, that temperature, and its best epoch's validation logits divided by it."""

    model: torch.nn.Module
    history: list[dict[str, float]]
    temperature: float | None
    val_logits: torch.Tensor


def _train_member(
    run: _Run, index: int, splits: dict[str, list[Sample]], *, deadline: float | None
) -> _Member:
    """Train member ``index`` (the model itself when it has one member) with its own seed and run
    folder, no epoch after the first ending after ``deadline`` (:func:`time.monotonic`)."""
    spec, ensemble = run.spec.member(index), run.spec.members > 1
    update = {"seed": run.settings.seed + index, "architecture": spec.architecture}
    settings = run.settings.model_copy(update=update)
    run_dir = run.run_dir / f"member{index}" if ensemble else run.run_dir
    tracker = run.tracker
    if ensemble and tracker is not None:
        tracker = _MemberTracker(tracker, member=index, first_step=index * settings.epochs)
    torch.manual_seed(settings.seed)
    if run.dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not run.resume:
            (run_dir / CHECKPOINT).unlink(missing_ok=True)
    run.dist.barrier()
    full, trainable, (train_src, val_src), groups = _model_and_sources(
        settings, spec, run.strategy, run.config, splits["train"], splits["val"], run.dist
    )
    with _memory_policy(settings):
        trainable, history, val_logits = fit(
            trainable, train_src, val_src, settings=settings, run_dir=run_dir,
            fingerprint=f"{run.fingerprint}|member {index}" if ensemble else run.fingerprint,
            dist=run.dist, device=run.device, tracker=tracker, resume=run.resume, param_groups=groups,
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


def _model_and_sources(
    settings: Settings,
    spec: ModelSpec,
    strategy: str,
    config: PreprocessConfig,
    train_s: Sequence[Sample],
    val_s: Sequence[Sample],
    dist: Dist,
) -> tuple[torch.nn.Module, torch.nn.Module, tuple[Any, Any], list[dict] | None]:
    """The full model (built for ``config``), the part of it that trains, its training and validation
    data, and its optimizer's parameter groups (``None``: one group) for ``strategy``."""
    if strategy == "head":
        full = build_model(spec, config)
        return full, full.head, head_sources(settings, config, train_s, val_s, dist), None
    if strategy == "scratch":
        full = build_model(spec, config, pretrained=False)
        return full, full, image_sources(settings, config, train_s, val_s), None
    full = build_model(spec, config)
    augmented = settings.finetune_augment
    top = FinetuneTop(full, blocks=settings.finetune_blocks, from_images=augmented, bf16=settings.train_bf16)
    if augmented:
        sources = image_sources(settings, config, train_s, val_s)
    else:
        views = settings.finetune_views
        sources = cached_sources(settings, config, train_s, val_s, dist, views=views, stop=top.start)
    groups = top.param_groups(settings.learning_rate, backbone_lr_scale=settings.finetune_backbone_lr_scale)
    return full, top, sources, groups


def _ensemble_validation(
    members: Sequence[_Member], settings: Settings, val_s: Sequence[Sample]
) -> dict[str, Any]:
    """The ensemble's own validation figures (what it was chosen on), with each member's best epoch.

    Combined from the members' best-epoch validation logits, which are what the ensemble's graph
    computes (up to float rounding), instead of running every member over validation again: that
    took about a minute per Lite2 member.
    """
    labels = torch.from_numpy(labels_of(val_s, settings.classes))
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
