"""This process's place in a ``torchrun`` job: rank, world size, and the few collective calls the
loop needs (gloo on CPU, NCCL on GPU). Without torchrun a process is rank 0 of 1 and nothing here
touches ``torch.distributed``."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


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
