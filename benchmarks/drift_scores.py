"""Drift-score measurements behind docs/monitoring.md, on the real dataset archive.

1. Separation: a reference from 300 training images, then windows of 200 other images,
   unchanged and shifted (grayscale, dark, rotated, model-input sized, checkerboards).
2. Noise: the highest feature PSI of in-distribution windows of several sizes (random draws), i.e.
   how often an undrifted window would cross the 0.25 threshold.

Usage: python benchmarks/drift_scores.py [--archive PATH] [--trials 40]
"""

from __future__ import annotations

import argparse
import io
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from catsdogs.drift import PSI_DRIFT, DriftMonitor, build_reference, image_stats

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "dogs-vs-cats" / "train.zip"


def load(archive: zipfile.ZipFile, indices: range) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(archive.read(f"train/{label}.{i}.jpg"))).convert("RGB")
        for label in ("cat", "dog")
        for i in indices
    ]


def checkerboard(index: int) -> Image.Image:
    yy, xx = np.indices((200, 200))
    period = 4 + index % 16
    board = ((yy // period + xx // period) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([board, np.full_like(board, (index * 37) % 256), 255 - board], axis=2))


def separation(archive: zipfile.ZipFile) -> None:
    reference_images = load(archive, range(150))
    started = time.perf_counter()
    reference = build_reference([image_stats(image) for image in reference_images])
    per_image = (time.perf_counter() - started) / len(reference_images) * 1000
    print(f"image_stats: {per_image:.2f} ms per 200x200 image")
    live = load(archive, range(5000, 5100))
    shifts = {
        "unchanged": lambda image: image,
        "grayscale": lambda image: ImageOps.grayscale(image).convert("RGB"),
        "very dark (/5)": lambda image: image.point(lambda value: value // 5),
        "rotated 90": lambda image: image.rotate(90, expand=True),
        "64x64 model input": lambda image: image.resize((64, 64)),
    }
    print("\n| live traffic | scores >= 0.25 | highest other score |\n|---|---|---|")
    windows = {name: [shift(image) for image in live] for name, shift in shifts.items()}
    windows["checkerboards"] = [checkerboard(i) for i in range(len(live))]
    for name, images in windows.items():
        monitor = DriftMonitor(reference, window=len(images), min_samples=len(images))
        for image in images:
            monitor.update(image)
        scores = monitor.scores()
        high = {k: v for k, v in scores.items() if v >= PSI_DRIFT}
        rest = max((v for k, v in scores.items() if k not in high), default=0.0)
        listed = ", ".join(f"{k} {v:.2f}" for k, v in high.items()) or "none"
        print(f"| {name} | {listed} | {rest:.3f} |")


def noise(archive: zipfile.ZipFile, trials: int) -> None:
    stats = [image_stats(image) for image in load(archive, range(2000, 2600))]
    rng = np.random.default_rng(0)
    print("\n| reference | window | highest PSI median | p95 | windows >= 0.25 |\n|---|---|---|---|---|")
    for m, n in ((300, 50), (300, 100), (300, 200), (300, 400), (600, 100), (600, 200), (600, 400)):
        highest = []
        for _ in range(trials):
            order = rng.permutation(len(stats))
            reference = build_reference([stats[i] for i in order[:m]])
            monitor = DriftMonitor(reference, window=n, min_samples=n)
            rows = [stats[i] for i in order[m : m + n]]
            # Feed precomputed statistics: the same windows update() fills, without re-decoding.
            for row in rows:
                for name, value in row.items():
                    monitor._values[name].append(value)
            highest.append(max(monitor.scores().values()))
        values = np.asarray(highest)
        print(
            f"| {m} | {n} | {np.median(values):.3f} | {np.percentile(values, 95):.3f} |"
            f" {np.mean(values >= PSI_DRIFT):.0%} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--trials", type=int, default=40)
    args = parser.parse_args()
    with zipfile.ZipFile(args.archive) as archive:
        separation(archive)
        noise(archive, args.trials)


if __name__ == "__main__":
    main()
