"""`catsdogs quickstart` (what `make demo` runs), as a user runs it: the real command fetches the data
(here the dataset archive the tests use, as the source setting), ingests a sample, trains, promotes
and serves; the printed upload page answers `/predict` with the promoted model; Ctrl-C stops it.
Everything it writes stays in its demo folder."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from catsdogs.data.sources import open_source
from support import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
#: The issue's bound for `make demo` on an idle 2-core machine; the default sample takes ~2 minutes.
TIMEOUT_S = 600
URL = re.compile(r"upload page: (http://127\.0\.0\.1:\d+/)")


def _a_cat_photo(archive: Path) -> bytes:
    """The first cat of the archive, found through the project's labelled-image reader."""
    source = open_source(archive, classes=("cat", "dog"))
    member = next(m for m in source.members if m.label == "cat")
    with zipfile.ZipFile(archive) as opened:
        return opened.read(member.name)


def _wait_for_url(proc: subprocess.Popen[bytes], out: Path, err: Path, deadline: float) -> str:
    while time.monotonic() < deadline:
        found = URL.search(out.read_text(errors="replace"))
        if found:
            return found[1]
        if proc.poll() is not None:
            raise AssertionError(f"quickstart exited with {proc.returncode}:\n{err.read_text()[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"no upload page URL after {TIMEOUT_S} s:\n{err.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> int:
    """Ctrl-C, as a user stops it; killed only if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=10)


def test_quickstart_serves_a_promoted_model_that_answers_a_photo(dataset_zip: Path, tmp_path: Path) -> None:
    home = tmp_path / "user"
    home.mkdir()
    port = free_port()
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CATSDOGS_DATA_SOURCE": str(dataset_zip)}
    started = time.monotonic()
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "catsdogs", "quickstart", "--port", str(port)],
            cwd=home,
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        url = _wait_for_url(proc, out, err, started + TIMEOUT_S)
        assert url == f"http://127.0.0.1:{port}/"
        photo = _a_cat_photo(dataset_zip)
        answer = httpx.post(f"{url}predict", files={"file": ("cat.jpg", photo)}, timeout=30)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["label"] in ("cat", "dog") and body["model_version"] == "1"
        assert abs(sum(body["probabilities"].values()) - 1) < 1e-5
        page = httpx.get(url, timeout=10)
        assert page.status_code == 200 and 'type="file"' in page.text
    finally:
        code = _stop(proc)
    assert code in (0, 130), err.read_text()[-4000:]  # 130: the CLI's answer to Ctrl-C

    printed = out.read_text()
    assert "promoted v1 to champion" in printed  # through the gate's demo floors (>= 90 % accuracy)
    demo = home / "demo"
    assert sorted(p.name for p in home.iterdir()) == ["demo"]  # nothing outside the demo folder
    assert {"data", "runs", "cache", "mlruns.db", "mlartifacts"} <= {p.name for p in demo.iterdir()}
    assert not (tmp_path / "mlruns.db").exists()  # the user's MLflow store (CATSDOGS_MLFLOW_*) untouched
    report = json.loads((demo / "data" / "data_report.json").read_text())
    assert report["sample_per_class"] == 300
    assert all(0 < counts["total"] <= 300 for counts in report["per_class"].values())
