"""A training run killed (SIGKILL) during epoch 2 and resumed with --resume ends exactly where an
uninterrupted run ends: same history, same test metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _train_cmd(data_dir: Path, runs: Path, cache: Path, run_name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "catsdogs", "train", "--model", "simple_cnn", "--epochs", "3",
        "--batch-size", "16", "--data-dir", str(data_dir), "--runs-dir", str(runs),
        "--cache-dir", str(cache), "--run-name", run_name, *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def _checkpoint_epoch(path: Path) -> int | None:
    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except (OSError, EOFError, RuntimeError, KeyError):
        return None


def test_killed_during_epoch_2_and_resumed_gives_the_same_final_metrics(make_dataset, tmp_path: Path) -> None:
    data_dir = make_dataset(tmp_path / "data", per_class={"train": 40, "val": 6, "test": 6})
    runs, cache = tmp_path / "runs", tmp_path / "cache"

    # An interrupted run: SIGKILL as soon as epoch 1's checkpoint exists, i.e. during epoch 2.
    checkpoint = runs / "killed" / "checkpoint.pt"
    proc = subprocess.Popen(
        _train_cmd(data_dir, runs, cache, "killed"), env=_env(), stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while _checkpoint_epoch(checkpoint) != 1:
        assert proc.poll() is None, "training ended before it could be interrupted"
        assert time.monotonic() < deadline, "epoch 1 never finished"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _checkpoint_epoch(checkpoint) == 1, "the kill must land during epoch 2"
    assert not (runs / "killed" / "bundle").exists()

    resumed = subprocess.run(
        _train_cmd(data_dir, runs, cache, "killed", "--resume"), env=_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = subprocess.run(
        _train_cmd(data_dir, runs, cache, "straight"), env=_env(), capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_ckpt = torch.load(checkpoint, weights_only=True)
    straight_ckpt = torch.load(runs / "straight" / "checkpoint.pt", weights_only=True)
    assert [row["epoch"] for row in killed_ckpt["history"]] == [1, 2, 3]
    for a, b in zip(killed_ckpt["history"], straight_ckpt["history"], strict=True):
        a, b = ({k: v for k, v in row.items() if k != "epoch_seconds"} for row in (a, b))  # timing differs
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    metrics_a = json.loads((runs / "killed" / "bundle" / "metrics.json").read_text())
    metrics_b = json.loads((runs / "straight" / "bundle" / "metrics.json").read_text())
    for key in ("accuracy", "log_loss", "roc_auc", "f1"):
        assert metrics_a[key] == pytest.approx(metrics_b[key], rel=1e-5, abs=1e-6), key
