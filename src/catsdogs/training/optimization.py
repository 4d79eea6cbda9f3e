"""What updates the weights: AdamW, its learning-rate schedule and the optional weight average."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from catsdogs import CatsdogsError
from catsdogs.settings import Settings


@dataclass
class Optimization:
    """The optimizer, its learning-rate schedule and the optional weight average of one fit."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    per_batch: bool
    ema: AveragedModel | None

    @property
    def evaluated(self) -> nn.Module:
        """What is validated, kept and returned: the weight average when there is one."""
        return self.model if self.ema is None else self.ema.module

    def after_step(self) -> None:
        if self.per_batch:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def after_epoch(self) -> None:
        if not self.per_batch:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        return state if self.ema is None else {**state, "ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


def build_optimization(
    model: nn.Module,
    settings: Settings,
    *,
    epochs: int,
    steps_per_epoch: int,
    param_groups: list[dict[str, Any]] | None,
) -> Optimization:
    """AdamW with a cosine (per epoch) or one-cycle (per batch) schedule over ``lr_schedule_epochs``."""
    horizon = settings.lr_schedule_epochs or epochs
    if horizon < epochs:
        raise CatsdogsError(f"lr_schedule_epochs ({horizon}) must be at least epochs ({epochs})")
    groups = param_groups or [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    per_batch = settings.lr_schedule == "one_cycle"
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if per_batch:
        # At least 4 steps and a warm-up of 2, which OneCycleLR needs (tiny runs never finish it).
        steps = max(4, horizon * steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=steps,
            pct_start=max(0.1, 2 / steps),
        )
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=horizon)
    return Optimization(model, optimizer, scheduler, per_batch, weight_average(model, settings.ema_decay))


def weight_average(model: nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and buffers (BatchNorm statistics
    included), or ``None`` without a decay. Averaging the last few hundred steps smooths out the
    noise of the final updates, at the cost of one extra copy of the model."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
