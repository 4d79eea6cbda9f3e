"""How fast this machine runs one `--profile best` training step right now: a yardstick for
training wall times, which move with the CPU a session gets (the same run took 30.7 min one
morning and ran 1.2-1.45x slower that afternoon).

Usage:
    python benchmarks/bench_step.py [--sizes 224,192] [--steps 5] [--name NAME]

Lite2 (random weights: the cost does not depend on them) with its last 14 blocks trained, as the
profile does: batch 32 of random images through the frozen trunk and the trained blocks, cross
entropy, backward, AdamW, channels-last input, freed memory kept. Two warm-up steps, then the median
of ``--steps`` timed ones per size; appended to benchmarks/results/step.json under ``--name``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from catsdogs.bundle import write_json_atomic
from catsdogs.loop import freed_memory_kept
from catsdogs.model import FinetuneTop, ModelSpec, build_model

RESULTS = Path(__file__).resolve().parent / "results" / "step.json"


def step_seconds(size: int, steps: int, batch: int = 32) -> list[float]:
    """Seconds per training step of the best profile's trained part at ``size`` px."""
    torch.manual_seed(0)
    top = FinetuneTop(
        build_model(ModelSpec("efficientnet_lite2", image_size=280)), blocks=14, from_images=True
    )
    top.train()
    optimizer = torch.optim.AdamW([p for p in top.parameters() if p.requires_grad], lr=1e-4)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(top(x), y).backward()
        optimizer.step()
        if i >= 2:  # warm-up: oneDNN picks its kernels on the first calls
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="224,192")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--name", default=datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"))
    args = parser.parse_args()
    result: dict[str, object] = {
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()}
    }
    with freed_memory_kept():
        for size in (int(s) for s in args.sizes.split(",")):
            times = step_seconds(size, args.steps)
            result[f"{size}px_s_per_step"] = round(statistics.median(times), 3)
            result[f"{size}px_all"] = [round(t, 3) for t in times]
            print(f"{size} px: median {statistics.median(times):.3f} s/step", flush=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[args.name] = result
    write_json_atomic(RESULTS, results)  # an interrupted write must not lose earlier probes


if __name__ == "__main__":
    main()
