"""Full-size training benchmark: `catsdogs train` under `/usr/bin/time -v` on an ingested dataset.

Usage (after `catsdogs data ingest`):
    python benchmarks/bench_train.py --name default --data-dir data -- [train options]

Each run trains from an empty feature cache (so feature extraction is timed too), then records
wall time, peak memory, the test metrics from the bundle and the command into
benchmarks/results/train.json under ``--name``. The CPU may be shared: timings are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "train.json"


def parse_time_v(stderr: str) -> dict[str, float]:
    """Wall time (s) and peak RSS (MB) from GNU time's verbose report."""
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    seconds = 0.0
    if wall:
        hours, minutes, secs = wall.groups()
        seconds = int(hours or 0) * 3600 + int(minutes) * 60 + float(secs)
    return {"wall_s": seconds, "max_rss_mb": int(rss.group(1)) / 1024 if rss else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", required=True, help="Key of this run in train.json.")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="Runs and cache (default: a temp folder)."
    )
    parser.add_argument("--keep-cache", action="store_true", help="Reuse the feature cache in --work-dir.")
    parser.add_argument(
        "--note", default="", help="What else ran on the machine meanwhile (recorded with the result)."
    )
    parser.add_argument("train_args", nargs="*", help="Extra `catsdogs train` options (after --).")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    if not args.keep_cache:
        shutil.rmtree(work / "cache", ignore_errors=True)
    command = [
        "/usr/bin/time", "-v", sys.executable, "-m", "catsdogs", "--log-level", "INFO", "train",
        "--data-dir", str(args.data_dir), "--runs-dir", str(work / "runs"),
        "--cache-dir", str(work / "cache"),
        "--run-name", args.name, *args.train_args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    started = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"training failed with exit code {proc.returncode}")
    bundle = work / "runs" / args.name / "bundle"
    metrics = json.loads((bundle / "metrics.json").read_text())
    metadata = json.loads((bundle / "metadata.json").read_text())
    params = json.loads((work / "runs" / args.name / "params.json").read_text())
    entry = {
        "command": " ".join(command[2:]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        **parse_time_v(proc.stderr),
        "test_accuracy": metrics["accuracy"],
        "test_accuracy_ci95": metrics["accuracy_ci95"],
        "test_n_images": metrics["n_images"],
        "test_log_loss": metrics["log_loss"],
        "test_roc_auc": metrics["roc_auc"],
        "val_metrics_best_epoch": metadata.get("val_metrics"),
        "epochs_trained": metadata.get("epochs_trained"),
        "architecture": metadata["architecture"],
        "head": metadata.get("head"),
        "onnx_parity": metadata.get("onnx"),
        "params": params,
        "feature_cache": "reused" if args.keep_cache else "empty at start",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_at_end": os.getloadavg(),
        },
        "note": args.note or "quiet machine",
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[args.name] = entry
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(RESULTS)
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
