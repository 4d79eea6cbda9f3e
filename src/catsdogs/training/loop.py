"""The training loop: epochs over batch sources, early stopping, checkpoints, exact resume, DDP.

Resuming is exact: each epoch seeds its own shuffling, augmentation and dropout from
``(seed, epoch)``, and the checkpoint written after every epoch holds the model, optimizer,
scheduler, weight-average and early-stopping state. Under ``torchrun`` each global batch is split
across ranks (gloo on CPU, NCCL on GPU) and only rank 0 writes checkpoints or logs.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from catsdogs import CatsdogsError
from catsdogs.metrics import classification_metrics
from catsdogs.preprocessing import PreprocessConfig, preprocess
from catsdogs.settings import Settings
from catsdogs.training.augment import augment
from catsdogs.training.features import Sample, load_image

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
T = TypeVar("T")


class Tracker(Protocol):
    """What training reports to (``catsdogs.registry.MlflowTracker`` implements it)."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...


# --- distributed -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (so that every rank takes the same decision)."""
        if self.world == 1:
            return flag
        votes = torch.tensor([float(flag)])
        torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
        return bool(votes.item())


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torch.distributed.is_initialized():
        # Rank 0 alone extracts the features while the others wait: allow it hours, not minutes.
        torch.distributed.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=3)
        )
    return Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size())


# --- batches -----------------------------------------------------------------------------------


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def steps_per_epoch(n: int, batch_size: int, dist: Dist) -> int:
    """How many batches :func:`_batch_indices` yields (a last batch smaller than the world is dropped)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= max(dist.world, 1) else 0)


def _batch_indices(
    n: int, batch_size: int, rng: np.random.Generator | None, dist: Dist
) -> Iterator[np.ndarray]:
    """Global batches (shuffled when ``rng`` is given), each split across ranks."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        batch = order[start : start + batch_size]
        if len(batch) < dist.world:
            return
        yield batch[dist.rank :: dist.world]


class TensorSource:
    """Cached features (or any in-memory tensors) with labels; float16 storage is batched as float32."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        floating = x.dtype if x.dtype in (np.float16, np.float32) else np.float32
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=floating))
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, *, rng: np.random.Generator | None, dist: Dist) -> Iterator[tuple]:
        for index in _batch_indices(len(self), batch_size, rng, dist):
            yield self.x[index].float(), self.y[index]


class ImageSource:
    """Images decoded on the fly; augmented when ``train`` (random draws from the epoch's rng).

    ``prefetch`` batches are decoded ahead in a background thread (see :func:`prefetched`).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        labels: np.ndarray,
        config: PreprocessConfig,
        *,
        train: bool,
        prefetch: int = 0,
    ):
        self.samples, self.labels, self.config, self.train = list(samples), labels, config, train
        self.prefetch = prefetch

    def __len__(self) -> int:
        return len(self.samples)

    def batches(self, batch_size: int, *, rng: np.random.Generator | None, dist: Dist) -> Iterator[tuple]:
        return prefetched(self._decoded(batch_size, rng=rng, dist=dist), self.prefetch)

    def _decoded(self, batch_size: int, *, rng: np.random.Generator | None, dist: Dist) -> Iterator[tuple]:
        for index in _batch_indices(len(self), batch_size, rng, dist):
            arrays = []
            for i in index:
                image = load_image(self.samples[i].path)
                if self.train and rng is not None:
                    image = augment(image, rng)
                arrays.append(preprocess(image, self.config))
            yield torch.from_numpy(np.stack(arrays)), torch.from_numpy(self.labels[index])


_END = object()


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items`` in order, the next ``depth`` of them produced ahead in one background thread.

    Decoding JPEGs (Pillow releases the GIL) then overlaps the model's step: one thread, so the
    items and any random draws they make come in the same order as inline; an exception raised
    while producing an item is raised here, where that item would have been. ``depth`` 0 produces
    them inline.
    """
    if depth <= 0:
        yield from items
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        pending = deque(pool.submit(next, items, _END) for _ in range(depth))
        while (item := pending.popleft().result()) is not _END:
            pending.append(pool.submit(next, items, _END))
            yield item


# --- memory --------------------------------------------------------------------------------------


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024


def _glibc() -> Any | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """While open, glibc's malloc keeps freed memory for reuse instead of handing it back.

    By default a large tensor is mmap-ed and unmapped when freed, so every forward and backward
    pass page-faults its activations in again: on this 2-core machine that kernel time made a Lite2
    forward pass 3.8× slower (README, "Training"). On exit the defaults come back and the kept
    memory is returned, so what runs next (export, evaluation) does not add its peak to training's.
    Yields False, changing nothing, where the C library is not glibc.
    """
    libc = _glibc()
    largest = ctypes.c_int(2**31 - 1)
    kept = libc is not None and all(libc.mallopt(p, largest) for p in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))
    try:
        yield kept
    finally:
        if libc is not None:
            for parameter in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD):
                libc.mallopt(parameter, ctypes.c_int(_GLIBC_DEFAULT_THRESHOLD))
            libc.malloc_trim(0)


# --- loop --------------------------------------------------------------------------------------


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


def weight_average(model: nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and buffers (BatchNorm statistics
    included), or ``None`` without a decay. Averaging the last few hundred steps smooths out the
    noise of the final updates, at the cost of one extra copy of the model."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


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


def fit(
    model: nn.Module,
    train_source,
    val_source,
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
    if settings.epochs is None:
        raise CatsdogsError("settings.epochs is unset: resolve it with catsdogs.training.train.apply_profile")
    model.to(device)
    wrapped = model
    if dist.world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    horizon = settings.lr_schedule_epochs or settings.epochs
    if horizon < settings.epochs:
        raise CatsdogsError(f"lr_schedule_epochs ({horizon}) must be at least epochs ({settings.epochs})")
    groups = param_groups or [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    per_batch = settings.lr_schedule == "one_cycle"
    if per_batch:
        # At least 4 steps and a warm-up of 2, which OneCycleLR needs (tiny runs never finish it).
        steps = max(4, horizon * steps_per_epoch(len(train_source), settings.batch_size, dist))
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=steps,
            pct_start=max(0.1, 2 / steps),
        )
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=horizon)
    ema = weight_average(model, settings.ema_decay)
    evaluated = model if ema is None else ema.module  # what is validated, kept and returned

    def after_step() -> None:
        if per_batch:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)

    history: list[dict[str, float]] = []
    best_state = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
    best_loss, bad_epochs, start = float("inf"), 0, 1
    best_logits: torch.Tensor | None = None
    checkpoint = run_dir / CHECKPOINT
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise CatsdogsError(
                f"{checkpoint} was made with other settings; train without --resume to start over"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        best_state, best_loss, bad_epochs = state["best_model"], state["best_val_loss"], state["bad_epochs"]
        best_logits = state.get("best_val_logits")
        history, start = state["history"], state["epoch"] + 1
        logger.info("resuming %s after epoch %d", run_dir, state["epoch"])
    names = settings.classes
    for epoch in range(start, settings.epochs + 1):
        if bad_epochs >= settings.early_stopping_patience:
            break
        if dist.any(_out_of_time(history, deadline)):
            logger.info("time budget: stopping before epoch %d", epoch)
            break
        epoch_started = time.monotonic()
        torch.manual_seed(settings.seed * 100_003 + epoch)  # dropout: same draws when resumed
        rng = _epoch_rng(settings.seed, epoch)
        lr = optimizer.param_groups[0]["lr"]
        row = {"epoch": epoch, "lr": lr}
        row |= train_one_epoch(
            wrapped,
            train_source,
            optimizer,
            batch_size=settings.batch_size,
            rng=rng,
            dist=dist,
            device=device,
            class_names=names,
            label_smoothing=settings.label_smoothing,
            after_step=after_step,
        )
        logits, labels = _logits(evaluated, val_source, batch_size=settings.eval_batch_size, device=device)
        row |= validation_metrics(logits, labels, names, calibrated=settings.calibrate_temperature)
        if not per_batch:
            scheduler.step()
        row["epoch_seconds"] = time.monotonic() - epoch_started
        if selection_loss(row) < best_loss - 1e-6:
            best_loss, bad_epochs, best_logits = selection_loss(row), 0, logits
            best_state = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
        else:
            bad_epochs += 1
        history.append(row)
        if dist.main:
            logger.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})
            if tracker is not None:
                tracker.log_epoch(epoch, {k: float(v) for k, v in row.items() if k != "epoch"})
            _save_checkpoint(
                checkpoint,
                {
                    "epoch": epoch,
                    "fingerprint": fingerprint,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    **({} if ema is None else {"ema": ema.state_dict()}),
                    "best_model": best_state,
                    "best_val_loss": best_loss,
                    "best_val_logits": best_logits,
                    "bad_epochs": bad_epochs,
                    "history": history,
                },
            )
        dist.barrier()
    model.load_state_dict(best_state)
    if best_logits is None:  # resumed from a checkpoint written before they were kept
        best_logits, _ = _logits(model, val_source, batch_size=settings.eval_batch_size, device=device)
    return FitResult(model.eval(), history, best_logits)
