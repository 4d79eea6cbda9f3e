"""Validation figures of averages of models already trained, from their checkpoints (never test).

Usage: python benchmarks/ensemble_val.py --data-dir data --name NAME CHECKPOINT [CHECKPOINT ...]

Each checkpoint (``runs/<run>/checkpoint.pt``, or ``runs/<run>/member<i>/checkpoint.pt`` of an
ensemble) keeps its best epoch's validation logits. They are divided by that epoch's calibrated
temperature (fitted on validation here when the run did not calibrate) and averaged as
probabilities, which is what ``--members N`` serves, so any combination of existing models can be
judged as an ensemble without training it again. Prints every combination's validation loss and
errors and records them in ``benchmarks/results/ensemble_val.json`` under ``--name``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from catsdogs.bundle import write_json_atomic
from catsdogs.settings import Settings
from catsdogs.training.features import read_manifest, split_samples
from catsdogs.training.loop import best_temperature, selection_loss, validation_metrics
from catsdogs.training.models import mean_of_softmaxes

RESULTS = Path(__file__).resolve().parent / "results" / "ensemble_val.json"


def calibrated_val_logits(checkpoint: Path, labels: torch.Tensor) -> torch.Tensor:
    """The checkpoint's best-epoch validation logits divided by their temperature."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    logits = state["best_val_logits"]
    if len(logits) != len(labels):
        raise SystemExit(
            f"{checkpoint}: {len(logits)} validation logits, but the data has {len(labels)} images"
        )
    best = min(state["history"], key=selection_loss)
    return logits / (best.get("val_temperature") or best_temperature(logits, labels))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="The data the models were validated on.")
    parser.add_argument("--name", required=True, help="Key of this comparison in ensemble_val.json.")
    parser.add_argument("--note", default="")
    parser.add_argument("checkpoints", type=Path, nargs="+")
    args = parser.parse_args()

    classes = Settings().classes
    labels = torch.tensor(
        [classes.index(s.label) for s in split_samples(read_manifest(args.data_dir), "val")]
    )
    logits = [calibrated_val_logits(path, labels) for path in args.checkpoints]
    rows = []
    for size in range(1, len(logits) + 1):
        for combo in itertools.combinations(range(len(logits)), size):
            row = validation_metrics(mean_of_softmaxes([logits[i] for i in combo]), labels, classes)
            errors = round((1 - row["val_accuracy"]) * len(labels))
            rows.append({"models": list(combo), "val_loss": round(row["val_loss"], 5), "val_errors": errors})
            print(f"{combo}: val loss {row['val_loss']:.5f}, {errors} errors of {len(labels)}")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[args.name] = {
        "checkpoints": [str(p) for p in args.checkpoints],
        "note": args.note,
        "combinations": rows,
    }
    write_json_atomic(RESULTS, results)


if __name__ == "__main__":
    main()
