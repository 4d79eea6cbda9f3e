"""The training loop: epochs over batch sources, early stopping, checkpoints, exact resume, DDP.

Resuming is exact: each epoch seeds its own shuffling, augmentation and dropout from
``(seed, epoch)``, and the checkpoint written after every epoch holds the model, optimizer,
scheduler, weight-average and early-stopping state. Under ``torchrun`` each global batch is split
across ranks (:mod:`catsdogs.training.distributed`) and only rank 0 writes checkpoints or logs.
Batch sources are in :mod:`catsdogs.training.sources`, the optimizer, learning-rate schedule and
weight average in :mod:`catsdogs.training.optimization`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from catsdogs import CatsdogsError
from catsdogs.files import atomic_path
from catsdogs.metrics import classification_metrics
from catsdogs.settings import Settings
from catsdogs.training.distributed import Dist
from catsdogs.training.optimization import Optimization, build_optimization
from catsdogs.training.sources import BatchSource, steps_per_epoch

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


class Tracker(Protocol):
    """What training reports to (``catsdogs.registry.MlflowTracker`` implements it)."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def _metrics(prefix: str, loss: float, labels: list[np.ndarray], probs: list[np.ndarray], names) -> dict:
    m = classification_metrics(np.concatenate(labels), np.concatenate(probs), names, split=prefix)
    keys = ("accuracy", "precision", "recall", "f1", "roc_auc")
    return {f"{prefix}_loss": loss, **{f"{prefix}_{k}": float(m[k]) for k in keys}}


def train_one_epoch(
    model, source, optimizer, *, batch_size, rng, dist, device, class_names,
    label_smoothing: float = 0.0, after_step: Callable[[], None] | None = None,
) -> dict:  # fmt: skip
    """One pass over the training data; returns train loss and metrics.

    ``after_step`` runs after every update (a per-batch LR schedule, the weight average).
    """
    model.train()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    total, count, labels, probs = 0.0, 0, [], []
    bar = tqdm(total=len(source) // dist.world, desc="train", unit="ex", leave=False, disable=not dist.main)
    for x, y in source.batches(batch_size, rng=rng, dist=dist):
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = loss_fn(logits, y)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        total += float(loss.detach()) * len(y)
        count += len(y)
        labels.append(y.cpu().numpy())
        probs.append(torch.softmax(logits.detach(), 1).cpu().numpy())
        bar.update(len(y))
    bar.close()
    return _metrics("train", total / max(count, 1), labels, probs, class_names)


@torch.inference_mode()
def _logits(model, source, *, batch_size, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and the labels over a whole source, in order (eval mode)."""
    model.eval()
    logits, labels = [], []
    for x, y in source.batches(batch_size, rng=None, dist=Dist()):
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def best_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the cross-entropy of ``logits / T``.

    One parameter, so it cannot change a prediction; it only undoes systematic over- or
    under-confidence (Guo et al., 2017). Searched on a log grid, then refined around the best point.
    """

    def loss(t: float) -> float:
        return float(nn.functional.cross_entropy(logits / t, labels))

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))
    best = float(min(grid, key=loss))
    fine = np.exp(np.linspace(np.log(best) - 0.06, np.log(best) + 0.06, 61))
    return float(min(fine, key=loss))


def validate(model, source, *, batch_size, device, class_names, calibrated: bool = False) -> dict:
    """Loss and metrics on the validation data (every rank sees all of it).

    ``calibrated`` adds ``val_temperature`` (:func:`best_temperature`) and ``val_loss_calibrated``:
    the loss after it, which is what a temperature-calibrated model serves, and what
    :func:`selection_loss` then compares.
    """
    logits, labels = _logits(model, source, batch_size=batch_size, device=device)
    return validation_metrics(logits, labels, class_names, calibrated=calibrated)


def validation_metrics(
    logits: torch.Tensor, labels: torch.Tensor, class_names, *, calibrated: bool = False
) -> dict:
    """:func:`validate`'s figures from logits already computed (an ensemble's, from its members')."""
    loss = float(nn.functional.cross_entropy(logits, labels))
    row = _metrics("val", loss, [labels.numpy()], [torch.softmax(logits, 1).numpy()], class_names)
    if calibrated:
        temperature = best_temperature(logits, labels)
        row["val_temperature"] = temperature
        row["val_loss_calibrated"] = float(nn.functional.cross_entropy(logits / temperature, labels))
    return row


def selection_loss(row: dict[str, float]) -> float:
    """What early stopping and the choice of the best epoch minimise: the validation loss, after
    calibration when the run calibrates (label smoothing makes the raw loss reward timidity)."""
    return row.get("val_loss_calibrated", row["val_loss"])


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _out_of_time(history: Sequence[dict[str, float]], deadline: float | None) -> bool:
    """Whether another epoch, as long as the slowest so far, would end after ``deadline``
    (never before the first epoch)."""
    seconds = [row["epoch_seconds"] for row in history if "epoch_seconds" in row]
    return deadline is not None and bool(seconds) and time.monotonic() + max(seconds) > deadline


class FitResult(NamedTuple):
    """What :func:`fit` returns: the model with its best weights, the per-epoch history, and the
    best epoch's validation logits (validation order), so that an ensemble of fitted models can be
    scored on validation without running its members again."""

    model: nn.Module
    history: list[dict[str, float]]
    val_logits: torch.Tensor


def _epochs(settings: Settings) -> int:
    if settings.epochs is None:
        raise CatsdogsError("settings.epochs is unset: resolve it with training.config.apply_profile")
    return settings.epochs


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class _Progress:
    """Early stopping's memory: the history, and the best epoch's weights, loss and logits."""

    best_state: dict[str, torch.Tensor]
    best_loss: float = float("inf")
    bad_epochs: int = 0
    best_logits: torch.Tensor | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    next_epoch: int = 1

    def record(self, row: dict[str, float], logits: torch.Tensor, evaluated: nn.Module) -> None:
        """Add an epoch's row; keep its weights and logits when it is the best so far."""
        if selection_loss(row) < self.best_loss - 1e-6:
            self.best_loss, self.bad_epochs, self.best_logits = selection_loss(row), 0, logits
            self.best_state = _copy_state(evaluated)
        else:
            self.bad_epochs += 1
        self.history.append(row)
        self.next_epoch = int(row["epoch"]) + 1

    def checkpoint(self, fingerprint: str, model: nn.Module, optimization: Optimization) -> dict[str, Any]:
        return {
            "epoch": self.next_epoch - 1,
            "fingerprint": fingerprint,
            "model": model.state_dict(),
            **optimization.state_dict(),
            "best_model": self.best_state,
            "best_val_loss": self.best_loss,
            "best_val_logits": self.best_logits,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
        }


def _resume(
    checkpoint: Path, fingerprint: str, model: nn.Module, optimization: Optimization, device: torch.device
) -> _Progress:
    """Load a run's last checkpoint into the model and optimizer; its early-stopping state."""
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    if state["fingerprint"] != fingerprint:
        raise CatsdogsError(
            f"{checkpoint} was made with other settings; train without --resume to start over"
        )
    model.load_state_dict(state["model"])
    optimization.load_state_dict(state)
    logger.info("resuming %s after epoch %d", checkpoint.parent, state["epoch"])
    return _Progress(
        best_state=state["best_model"],
        best_loss=state["best_val_loss"],
        bad_epochs=state["bad_epochs"],
        best_logits=state.get("best_val_logits"),
        history=state["history"],
        next_epoch=state["epoch"] + 1,
    )


def _epoch(
    epoch: int,
    wrapped: nn.Module,
    sources: tuple[BatchSource, BatchSource],
    optimization: Optimization,
    *,
    settings: Settings,
    dist: Dist,
    device: torch.device,
) -> tuple[dict[str, float], torch.Tensor]:
    """Train one epoch and validate what is kept; the epoch's row and its validation logits."""
    train_source, val_source = sources
    started = time.monotonic()
    torch.manual_seed(settings.seed * 100_003 + epoch)  # dropout: same draws when resumed
    rng = _epoch_rng(settings.seed, epoch)
    row: dict[str, float] = {"epoch": epoch, "lr": optimization.optimizer.param_groups[0]["lr"]}
    row |= train_one_epoch(
        wrapped,
        train_source,
        optimization.optimizer,
        batch_size=settings.batch_size,
        rng=rng,
        dist=dist,
        device=device,
        class_names=settings.classes,
        label_smoothing=settings.label_smoothing,
        after_step=optimization.after_step,
    )
    evaluated = optimization.evaluated
    logits, labels = _logits(evaluated, val_source, batch_size=settings.eval_batch_size, device=device)
    row |= validation_metrics(logits, labels, settings.classes, calibrated=settings.calibrate_temperature)
    optimization.after_epoch()
    row["epoch_seconds"] = time.monotonic() - started
    return row, logits


def _parallel(model: nn.Module, dist: Dist, device: torch.device) -> nn.Module:
    """The model as trained: wrapped in DistributedDataParallel under torchrun, else itself."""
    if dist.world == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def fit(
    model: nn.Module,
    train_source: BatchSource,
    val_source: BatchSource,
    *,
    settings: Settings,
    run_dir: Path,
    fingerprint: str,
    dist: Dist,
    device: torch.device,
    tracker: Tracker | None = None,
    resume: bool = False,
    param_groups: list[dict[str, Any]] | None = None,
    deadline: float | None = None,
) -> FitResult:
    """Train with AdamW, a cosine or one-cycle LR schedule (``settings.lr_schedule``), early
    stopping on validation loss (:func:`selection_loss`); checkpoint every epoch.

    ``param_groups`` (AdamW's, e.g. a lower learning rate for pretrained blocks) default to every
    parameter that requires a gradient. ``deadline`` (a :func:`time.monotonic` time): no epoch
    after the first is started that would end after it, judged by the slowest epoch so far.

    Returns the model with its best (lowest validation loss) weights, the per-epoch history and
    that epoch's validation logits.
    """
    epochs = _epochs(settings)
    model.to(device)
    wrapped = _parallel(model, dist, device)
    steps = steps_per_epoch(len(train_source), settings.batch_size, dist)
    optimization = build_optimization(
        model, settings, epochs=epochs, steps_per_epoch=steps, param_groups=param_groups
    )
    checkpoint = run_dir / CHECKPOINT
    progress = _Progress(best_state=_copy_state(optimization.evaluated))
    if resume and checkpoint.is_file():
        progress = _resume(checkpoint, fingerprint, model, optimization, device)
    for epoch in range(progress.next_epoch, epochs + 1):
        if progress.bad_epochs >= settings.early_stopping_patience:
            break
        if dist.any(_out_of_time(progress.history, deadline)):
            logger.info("time budget: stopping before epoch %d", epoch)
            break
        row, logits = _epoch(
            epoch, wrapped, (train_source, val_source), optimization,
            settings=settings, dist=dist, device=device,
        )  # fmt: skip
        progress.record(row, logits, optimization.evaluated)
        if dist.main:
            logger.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})
            if tracker is not None:
                tracker.log_epoch(epoch, {k: float(v) for k, v in row.items() if k != "epoch"})
            _save_checkpoint(checkpoint, progress.checkpoint(fingerprint, model, optimization))
        dist.barrier()
    model.load_state_dict(progress.best_state)
    best_logits = progress.best_logits
    if best_logits is None:  # resumed from a checkpoint written before they were kept
        best_logits, _ = _logits(model, val_source, batch_size=settings.eval_batch_size, device=device)
    return FitResult(model.eval(), progress.history, best_logits)
