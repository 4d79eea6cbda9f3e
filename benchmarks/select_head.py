"""Choose the input size and head on the VALIDATION split from cached backbone features (never on test).

Usage: python benchmarks/select_head.py --data-dir data --cache-dir .cache/catsdogs \
           --architecture efficientnet_lite2 [--image-sizes 260 300 340] [--heads linear mlp] [--flip]
Trains each candidate (input size x head, with and without mirror-image features when --flip) with
the real training loop on the cached features and records validation loss and accuracy (with its
Wilson interval) in benchmarks/results/head_selection.json, keyed ``arch@size/head/views``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from catsdogs.metrics import wilson_interval
from catsdogs.settings import Settings
from catsdogs.training.features import read_manifest, split_samples
from catsdogs.training.loop import Dist, fit
from catsdogs.training.models import BACKBONES, build_head
from catsdogs.training.train import head_sources, preprocess_config_for

RESULTS = Path(__file__).resolve().parent / "results" / "head_selection.json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--architecture", default="efficientnet_lite2")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[None], help="Default: the backbone's.")
    parser.add_argument("--heads", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    parser.add_argument("--flip", action="store_true", help="Also try mirror-image training features.")
    args = parser.parse_args()

    samples = read_manifest(args.data_dir)
    train_s, val_s = split_samples(samples, "train"), split_samples(samples, "val")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    candidates = itertools.product(args.image_sizes, args.heads, (False, True) if args.flip else (False,))
    for size, head, flip in candidates:
        settings = Settings(
            architecture=args.architecture, image_size=size, head=head, flip_features=flip,
            data_dir=args.data_dir, cache_dir=args.cache_dir,
        )  # fmt: skip
        config = preprocess_config_for(settings)
        train_src, val_src = head_sources(settings, config, train_s, val_s, Dist())
        torch.manual_seed(settings.seed)
        model = build_head(
            head, in_features=BACKBONES[args.architecture].feature_dim, num_classes=2,
            hidden=settings.head_hidden, dropout=settings.head_dropout,
        )  # fmt: skip
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            _, history, _ = fit(
                model, train_src, val_src, settings=settings, run_dir=Path(run_dir), fingerprint="select",
                dist=Dist(), device=torch.device("cpu"),
            )  # fmt: skip
        best = min(history, key=lambda row: row["val_loss"])
        correct = round(best["val_accuracy"] * len(val_src))
        key = f"{args.architecture}@{config.image_size}/{head}/{'orig+flip' if flip else 'orig'}"
        results[key] = {
            "val_loss": best["val_loss"],
            "val_accuracy": best["val_accuracy"],
            "val_accuracy_ci95": list(wilson_interval(correct, len(val_src))),
            "n_val": len(val_src),
            "n_train_rows": len(train_src),
            "best_epoch": best["epoch"],
            "epochs_run": len(history),
            "head_train_s": time.perf_counter() - started,
        }
        print(key, json.dumps(results[key]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
