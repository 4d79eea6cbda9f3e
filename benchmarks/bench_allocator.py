"""What keeping freed memory (``catsdogs.malloc.freed_memory_kept``) does to a PyTorch forward pass.

Usage:
    python benchmarks/bench_allocator.py [--passes 4] [--batch 64] [--size 280]

Lite2 (random weights: the cost does not depend on them), eval mode, channels-last, 2 threads.
After one warm-up pass, times ``--passes`` passes with glibc's default allocator, then the same
inside ``freed_memory_kept()``; reports wall, user and system CPU seconds and minor page faults of
each, and writes them to benchmarks/results/allocator.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from catsdogs.malloc import freed_memory_kept
from catsdogs.preprocessing import PreprocessConfig
from catsdogs.training.models import ModelSpec, build_model

RESULTS = Path(__file__).resolve().parent / "results" / "allocator.json"


def timed_passes(model: torch.nn.Module, batch: torch.Tensor, passes: int) -> dict[str, float]:
    """One warm-up pass, then ``passes`` timed ones."""
    with torch.inference_mode():
        model(batch)
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(passes):
            model(batch)
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall_s": round(wall, 2),
        "user_s": round(after.ru_utime - before.ru_utime, 2),
        "system_s": round(after.ru_stime - before.ru_stime, 2),
        "minor_page_faults": after.ru_minflt - before.ru_minflt,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=280)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = PreprocessConfig(image_size=args.size)
    model = build_model(ModelSpec("efficientnet_lite2"), config, pretrained=False).eval()
    model = model.to(memory_format=torch.channels_last)
    batch = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    default = timed_passes(model, batch, args.passes)
    with freed_memory_kept() as kept:
        kept_run = timed_passes(model, batch, args.passes)
    result = {
        "setup": vars(args) | {"threads": 2, "model": "efficientnet_lite2", "platform": platform.platform()},
        "default_allocator": default,
        "freed_memory_kept": kept_run | {"active": kept},
        "speedup": round(default["wall_s"] / kept_run["wall_s"], 2),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
