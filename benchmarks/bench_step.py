"""How fast this machine runs one `--profile best` training step right now: a yardstick for
training wall times, which move with the CPU a session gets (the same run took 30.7 min one
morning and ran 1.2-1.45x slower that afternoon).

Usage:
    python benchmarks/bench_step.py [--sizes 224,192] [--steps 5] [--name NAME] [--against-library]
                                    [--against-bf16] [--against-unfolded]
                                    [--data-dir data [--images 960] [--eval-batches 16,128]]

Lite2 (random weights: the cost does not depend on them) with its last 14 blocks trained, as the
profile does: batch 32 of random images through the frozen trunk and the trained blocks, cross
entropy, backward, AdamW, channels-last input, freed memory kept. Two warm-up steps, then the median
of ``--steps`` timed ones per size; appended to benchmarks/results/step.json under ``--name``.

``--against-library`` also times the network as the library computes it (its separate padding
layers, the trunk's batch norms unfolded), step for step interleaved with ours so both see the same
machine, and records the ratio of the medians. ``--against-bf16`` does the same for ``train_bf16``
(the trunk and the trained 1x1 convolutions in bfloat16). ``--against-unfolded`` times the profile's
step (``train_bf16``) with the trained blocks' batch norms as separate layers against it, with them
folded into their convolutions (:class:`catsdogs.training.models.FinetuneTop`'s ``fold_batch_norms``).

``--data-dir`` (an ingested dataset) times what random tensors leave out, on real photos: whole
training passes over ``--images`` training images, decoded and augmented inline against decoded 2
batches ahead in a background thread (``prefetch_batches``), interleaved, median seconds per step of
three passes each; and the validation throughput (images/s, decoding included) of the same network
at 280 px for each of ``--eval-batches``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from catsdogs.bundle import write_json_atomic
from catsdogs.malloc import freed_memory_kept
from catsdogs.settings import Settings
from catsdogs.training.config import apply_profile, preprocess_config, preprocess_config_for
from catsdogs.training.distributed import Dist
from catsdogs.training.features import read_manifest, split_samples
from catsdogs.training.loop import train_one_epoch, validate
from catsdogs.training.models import FinetuneTop, ModelSpec, build_model
from catsdogs.training.strategy_sources import image_sources

RESULTS = Path(__file__).resolve().parent / "results" / "step.json"
PREFETCH = 2  # batches decoded ahead in the "prefetched" passes (the setting is off by default)


def _top(*, library: bool, bf16: bool = False, fold: bool = True) -> FinetuneTop:
    """The profile's trained part; ``library``: without ``fold_symmetric_padding``
    and with the batch norms as separate layers, the trunk's and the trained blocks'; ``bf16``: with
    ``train_bf16``; ``fold``: the trained blocks' batch norms folded."""
    torch.manual_seed(0)
    with (
        mock.patch("catsdogs.training.backbones.fold_symmetric_padding", lambda net: net)
        if library
        else nullcontext()
    ):
        model = build_model(
            ModelSpec("efficientnet_lite2"), preprocess_config("efficientnet_lite2", image_size=280)
        )
    top = FinetuneTop(model, blocks=14, from_images=True, bf16=bf16, fold_batch_norms=fold and not library)
    if library:
        top._fused_trunk = (model.backbone,)
    return top.train()


def step_seconds(size: int, steps: int, *, variants: list[str], batch: int = 32) -> dict[str, list[float]]:
    """Seconds per training step at ``size`` px of each variant (``ours``, ``library``), interleaved."""
    tops = {
        name: _top(library=name == "library", bf16=name.startswith("bf16"), fold=name != "bf16_unfolded")
        for name in variants
    }
    optimizers = {
        name: torch.optim.AdamW([p for p in top.parameters() if p.requires_grad], lr=1e-4)
        for name, top in tops.items()
    }
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(steps + 2):
        for name in variants if i % 2 else variants[::-1]:  # neither always runs first
            start = time.perf_counter()
            optimizers[name].zero_grad()
            torch.nn.functional.cross_entropy(tops[name](x), y).backward()
            optimizers[name].step()
            if i >= 2:  # warm-up: oneDNN picks its kernels on the first calls
                times[name].append(time.perf_counter() - start)
    return times


def real_image_figures(data_dir: Path, images: int, eval_batches: list[int]) -> dict[str, object]:
    """Seconds per step with and without prefetching, and validation images/s per eval batch size."""
    settings = apply_profile(Settings(data_dir=data_dir, profile="best"))
    samples = read_manifest(data_dir)
    train_s, val_s = split_samples(samples, "train")[:images], split_samples(samples, "val")[:images]
    top = _top(library=False)
    optimizer = torch.optim.AdamW([p for p in top.parameters() if p.requires_grad], lr=1e-5)
    steps = -(-len(train_s) // settings.batch_size)
    times: dict[str, list[float]] = {"inline": [], "prefetched": []}
    for i in range(4):
        for name in ["inline", "prefetched"] if i % 2 else ["prefetched", "inline"]:
            prefetch = PREFETCH if name == "prefetched" else 0
            source, _ = image_sources(
                settings.model_copy(update={"prefetch_batches": prefetch}), preprocess_config_for(settings),
                train_s, [],
            )  # fmt: skip
            start = time.perf_counter()
            train_one_epoch(
                top, source, optimizer, batch_size=settings.batch_size, rng=np.random.default_rng(i),
                dist=Dist(), device=torch.device("cpu"), class_names=settings.classes,
            )  # fmt: skip
            if i:  # warm-up pass
                times[name].append((time.perf_counter() - start) / steps)
    inline, ahead = statistics.median(times["inline"]), statistics.median(times["prefetched"])
    print(f"real images: {inline:.3f} s/step inline, {ahead:.3f} prefetched ({inline / ahead:.3f}x)")
    result: dict[str, object] = {
        "real_images": len(train_s),
        "real_s_per_step_inline": round(inline, 3),
        "real_s_per_step_prefetched": round(ahead, 3),
        "prefetch_speedup": round(inline / ahead, 3),
    }
    _, val_source = image_sources(settings, preprocess_config_for(settings), [], val_s)
    for batch in eval_batches:
        start = time.perf_counter()
        validate(top, val_source, batch_size=batch, device=torch.device("cpu"), class_names=settings.classes)
        rate = len(val_s) / (time.perf_counter() - start)
        result[f"validation_images_per_s_batch{batch}"] = round(rate, 1)
        print(f"validation at 280 px, batches of {batch}: {rate:.1f} images/s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="224,192")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--name", default=datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"))
    parser.add_argument("--against-library", action="store_true")
    parser.add_argument("--against-bf16", action="store_true")
    parser.add_argument("--against-unfolded", action="store_true")
    parser.add_argument("--data-dir", type=Path, help="An ingested dataset: also time real photos.")
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--eval-batches", default="16,128")
    args = parser.parse_args()
    variants = ["ours"] + ["library"] * args.against_library + ["bf16"] * args.against_bf16
    if args.against_unfolded:
        variants += ["bf16"] * (not args.against_bf16) + ["bf16_unfolded"]
    result: dict[str, object] = {
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()}
    }
    with freed_memory_kept():
        for size in (int(s) for s in args.sizes.split(",") if s):
            times = step_seconds(size, args.steps, variants=variants)
            for name, values in times.items():
                prefix = f"{size}px" if name == "ours" else f"{size}px_{name}"
                result[f"{prefix}_s_per_step"] = round(statistics.median(values), 3)
                result[f"{prefix}_all"] = [round(t, 3) for t in values]
                print(f"{size} px, {name}: median {statistics.median(values):.3f} s/step", flush=True)
            if args.against_library:
                ratio = statistics.median(times["library"]) / statistics.median(times["ours"])
                result[f"{size}px_speedup_over_library"] = round(ratio, 3)
                print(f"{size} px: {ratio:.3f}x faster than the library's layers", flush=True)
            if args.against_bf16:
                ratio = statistics.median(times["ours"]) / statistics.median(times["bf16"])
                result[f"{size}px_bf16_speedup"] = round(ratio, 3)
                print(f"{size} px: train_bf16 {ratio:.3f}x faster than float32", flush=True)
            if args.against_unfolded:
                ratio = statistics.median(times["bf16_unfolded"]) / statistics.median(times["bf16"])
                result[f"{size}px_bf16_fold_speedup"] = round(ratio, 3)
                print(f"{size} px: folded batch norms {ratio:.3f}x faster (train_bf16)", flush=True)
        if args.data_dir is not None:
            batches = [int(b) for b in args.eval_batches.split(",") if b]
            result |= real_image_figures(args.data_dir, args.images, batches)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[args.name] = result
    write_json_atomic(RESULTS, results)  # an interrupted write must not lose earlier probes


if __name__ == "__main__":
    main()
