"""``catsdogs predict-batch`` throughput: the local engine against Ray Data on the same images.

The first ``--images`` ordinary dataset photos (half cats, half dogs, from the archive) are written
into a temporary folder (never committed), then scored by ``predict_batch`` with each engine in
turn, with the same bundle and batch size; the Ray run includes starting the local Ray instance
(what a user of ``--engine ray`` waits for). Also recorded: whether both engines gave the same
labels and the largest probability difference between them.

    python benchmarks/bench_predict_batch.py --bundle BUNDLE [--images 2000] [--archive ZIP]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from catsdogs.batch.predict import predict_batch
from catsdogs.files import write_text_atomic
from catsdogs.runtime import available_cores
from catsdogs.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import dataset_photos  # the tests' pick of ordinary photos: same images every run

RESULTS = Path(__file__).resolve().parent / "results" / "predict_batch.json"
ARCHIVE = Path("/work/shared/datasets/dogs-vs-cats/train.zip")


def _rows(path: Path) -> dict[str, dict[str, Any]]:
    return {row["path"]: row for row in map(json.loads, path.read_text().splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-predict-batch-") as tmp:
        folder = Path(tmp) / "images"
        for label in ("cat", "dog"):
            (folder / label).mkdir(parents=True)
            for k, data in enumerate(dataset_photos(args.archive, label, args.images // 2)):
                (folder / label / f"{k:05d}.jpg").write_bytes(data)
        settings = Settings(cache_dir=Path(tmp) / "cache", predict_batch_size=args.batch_size)
        runs: dict[str, Any] = {}
        for engine in ("local", "ray"):
            started = time.perf_counter()
            result = predict_batch(
                folder, Path(tmp) / f"{engine}.jsonl", settings=settings, model_uri=str(args.bundle),
                engine=engine,  # type: ignore[arg-type]
            )  # fmt: skip
            runs[engine] = {
                **result.as_dict(),
                "wall_s_with_startup": round(time.perf_counter() - started, 2),
            }
        local, ray = _rows(Path(tmp) / "local.jsonl"), _rows(Path(tmp) / "ray.jsonl")
    diffs = [
        abs(p - ray[name]["probabilities"][label])
        for name, row in local.items()
        for label, p in row["probabilities"].items()
    ]
    report = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bundle": str(args.bundle),
        "images": args.images,
        "batch_size": args.batch_size,
        "engines": runs,
        "same_labels": all(row["label"] == ray[name]["label"] for name, row in local.items()),
        "max_abs_probability_diff": max(diffs, default=0.0),
        "ray_over_local": round(runs["ray"]["images_per_s"] / runs["local"]["images_per_s"], 3),
        "machine": {
            "cores": available_cores(),
            "platform": platform.platform(),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
        },
    }
    write_text_atomic(args.out, json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps(report, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
