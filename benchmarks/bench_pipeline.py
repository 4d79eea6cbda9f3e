"""The whole pipeline at full size, from nothing: ingest → train (tracked, registered) → evaluate.

Usage:
    python benchmarks/bench_pipeline.py [--source PATH_OR_URL] [-- train options]

Every step runs the real CLI under GNU ``/usr/bin/time -v`` in a fresh work folder (empty data
folder, empty feature cache, a new SQLite MLflow store), so nothing is reused from earlier runs.
Writes wall time and peak RSS per step, the totals and the test metrics to
``benchmarks/results/pipeline.json`` (key ``--name``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_train import parse_time_v

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "pipeline.json"
DEFAULT_SOURCE = REPO.parent / "shared" / "datasets" / "dogs-vs-cats" / "train.zip"


def timed(step: str, args: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run one `catsdogs` command under /usr/bin/time -v; fail loudly if it fails."""
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "catsdogs", *args]
    print(f"== {step}: {' '.join(args)}", flush=True)
    run = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        sys.exit(f"{step} failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    measured = parse_time_v(run.stderr)
    print(f"   {measured['wall_s']:.1f} s, peak RSS {measured['max_rss_mb']:.0f} MB", flush=True)
    return {**measured, "command": "catsdogs " + " ".join(args), "stdout_tail": run.stdout[-600:]}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--name", default="default", help="Key of this run in pipeline.json.")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("train_args", nargs="*", help="Extra `catsdogs train` options (after --).")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "CATSDOGS_PARAMS_FILE": str(REPO / "params.yaml"),
        "CATSDOGS_DATA_DIR": str(work / "data"),
        "CATSDOGS_RUNS_DIR": str(work / "runs"),
        "CATSDOGS_CACHE_DIR": str(work / "cache"),
        "CATSDOGS_MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlruns.db'}",
        "CATSDOGS_MLFLOW_ARTIFACT_LOCATION": str(work / "mlartifacts"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    load_before = os.getloadavg()
    started = time.perf_counter()
    steps = {"ingest": timed("ingest", ["data", "ingest", "--source", args.source], env)}
    train_args = ["--log-level", "INFO", "train", "--run-name", args.name, *args.train_args]
    steps["train"] = timed("train", train_args, env)
    bundle = work / "runs" / args.name / "bundle"
    out = work / "evaluation"
    steps["evaluate"] = timed(
        "evaluate",
        ["evaluate", "--model-uri", str(bundle), "--data", str(work / "data" / "manifest.csv"),
         "--split", "test", "--out", str(out)],
        env,
    )  # fmt: skip
    total = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    result = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "total_wall_s": round(total, 1),
        "max_rss_mb": max(step["max_rss_mb"] for step in steps.values()),
        "test_accuracy": metrics["accuracy"],
        "test_accuracy_ci95": metrics["accuracy_ci95"],
        "test_n_images": metrics["n_images"],
        "per_class": metrics.get("per_class"),
        "train_args": args.train_args,
        "steps": steps,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_before": load_before},
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[args.name] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    low, high = metrics["accuracy_ci95"]
    print(
        f"pipeline {args.name}: {total / 60:.1f} min wall, peak RSS {result['max_rss_mb']:.0f} MB, "
        f"test accuracy {metrics['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}, n={metrics['n_images']})"
    )


if __name__ == "__main__":
    main()
