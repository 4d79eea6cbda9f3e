"""MLflow on SQLite written by two processes at once: both finish, every run is stored."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

RUNS_PER_PROCESS = 3

#: Waits for the go file (both processes have imported MLflow), then opens the fresh store and logs
#: a few runs with parameters and metrics, as a training does.
WRITER = """
import os, sys, time
from pathlib import Path
from catsdogs.registry.model_source import make_client
from catsdogs.settings import Settings

uri, go, who, runs = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
Path(f"{go}.{who}").touch()
while not go.exists():
    time.sleep(0.005)
client = make_client(Settings(mlflow_tracking_uri=uri))
experiment = client.get_experiment_by_name("race")
experiment_id = experiment.experiment_id if experiment else None
if experiment_id is None:
    try:
        experiment_id = client.create_experiment("race")
    except Exception:  # the other process created it first
        experiment_id = client.get_experiment_by_name("race").experiment_id
for index in range(runs):
    run_id = client.create_run(experiment_id, run_name=f"{who}-{index}").info.run_id
    client.log_param(run_id, "index", index)
    for step in range(5):
        client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
    client.set_terminated(run_id)
"""


def test_two_processes_log_runs_to_one_fresh_sqlite_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    go = tmp_path / "go"
    env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, uri, str(go), who, str(RUNS_PER_PROCESS)],
            cwd=tmp_path,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in ("a", "b")
    ]
    deadline = time.monotonic() + 60
    while not all(Path(f"{go}.{who}").exists() for who in ("a", "b")) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    errors = [writer.communicate(timeout=120)[1] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], "\n".join(err[:3000] for err in errors)
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(run.info.run_name for run in runs) == sorted(
        f"{who}-{index}" for who in ("a", "b") for index in range(RUNS_PER_PROCESS)
    )
    assert all(len(client.get_metric_history(run.info.run_id, "loss")) == 5 for run in runs)
