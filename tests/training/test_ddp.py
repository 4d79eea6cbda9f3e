"""Distributed data parallel: `torchrun --nproc_per_node=2` trains one model over two CPU processes
(gloo), and only rank 0 writes the bundle and logs the one MLflow run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_two_cpu_processes_train_one_model_with_gloo(make_dataset, tmp_path: Path) -> None:
    data_dir = make_dataset(tmp_path / "data", per_class={"train": 16, "val": 4, "test": 4})
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [
        torchrun, "--standalone", "--nproc_per_node=2", "-m", "catsdogs", "train",
        "--model", "simple_cnn", "--epochs", "2", "--batch-size", "8",
        "--data-dir", str(data_dir), "--runs-dir", str(tmp_path / "runs"),
        "--cache-dir", str(tmp_path / "cache"), "--run-name", "ddp", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    run_dir = tmp_path / "runs" / "ddp"
    assert json.loads((run_dir / "params.json").read_text())["world_size"] == 2
    metrics = json.loads((run_dir / "bundle" / "metrics.json").read_text())
    assert metrics["n_images"] == 8
    assert run.stdout.count("test accuracy") == 1  # rank 1 printed nothing

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["CATSDOGS_MLFLOW_TRACKING_URI"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    assert runs[0].data.params["world_size"] == "2"
    assert runs[0].info.status == "FINISHED"
    assert len(client.search_model_versions("name='catsdogs-classifier'")) == 1
