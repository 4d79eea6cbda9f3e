"""The registry commands: `catsdogs promote`, `catsdogs rollback`, `catsdogs models list`."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from typer.testing import CliRunner

from catsdogs.cli import app
from catsdogs.settings import Settings

GOOD_RECALL = {"cat": 0.99, "dog": 0.99}


@pytest.fixture
def runner(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """The CLI reads the same store as the test's settings, through CATSDOGS_* variables."""
    for key, value in {
        "CATSDOGS_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "CATSDOGS_CACHE_DIR": str(settings.cache_dir),
        "CATSDOGS_DATA_DIR": str(settings.data_dir),
    }.items():
        monkeypatch.setenv(key, value)
    return CliRunner()


def test_promote_prints_the_table_and_exits_1_when_refused_then_rollback_and_list(
    runner: CliRunner, register_version: Callable
) -> None:
    register_version(accuracy=0.985, recall={"cat": 0.98, "dog": 0.99})
    accepted = runner.invoke(app, ["promote", "--reason", "first"])
    assert accepted.exit_code == 0, accepted.output
    assert "promoted catsdogs-classifier v1" in accepted.output
    register_version(accuracy=0.97, recall={"cat": 0.96, "dog": 0.98})
    refused = runner.invoke(app, ["promote"])
    assert refused.exit_code == 1
    assert "challenger v2" in refused.output and "champion v1" in refused.output
    assert "accuracy 0.9700 < required 0.9850" in refused.output
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0, listed.output
    assert "champion" in listed.output and "challenger" in listed.output and "0.9850" in listed.output
    register_version(accuracy=0.99, recall=GOOD_RECALL)
    assert runner.invoke(app, ["promote"]).exit_code == 0
    rolled = runner.invoke(app, ["rollback", "--reason", "bad in prod"])
    assert rolled.exit_code == 0, rolled.output
    assert "champion is now v1" in rolled.output


def test_rollback_with_no_previous_champion_exits_with_the_reason(
    runner: CliRunner, register_version: Callable
) -> None:
    from catsdogs import CatsdogsError

    register_version(accuracy=0.98, recall=GOOD_RECALL)
    result = runner.invoke(app, ["rollback"])
    assert result.exit_code != 0
    assert isinstance(result.exception, CatsdogsError)
    assert "no previous champion" in str(result.exception)


def test_a_refused_promotion_exits_1_from_the_real_command(
    settings: Settings, register_version: Callable, tmp_path
) -> None:
    """Scripts and CI read the process exit code, so check it on a real `python -m catsdogs` process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import catsdogs

    register_version(accuracy=0.96, recall=GOOD_RECALL)  # under the 0.97 accuracy floor
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(catsdogs.__file__).parents[1]),
        "CATSDOGS_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "CATSDOGS_CACHE_DIR": str(settings.cache_dir),
        "CATSDOGS_DATA_DIR": str(settings.data_dir),
    }
    result = subprocess.run(
        [sys.executable, "-m", "catsdogs", "promote"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "accuracy 0.9600 < required 0.9700" in result.stdout
