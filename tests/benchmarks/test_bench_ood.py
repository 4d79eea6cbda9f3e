"""The trust benchmark runs end to end on a trained bundle (few placements, one image per kind)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import REPO


def test_a_short_run_reports_every_figure_of_the_trust_issue(trust_run, tmp_path: Path) -> None:
    result, settings = trust_run
    out = tmp_path / "ood.json"
    command = [sys.executable, str(REPO / "benchmarks" / "bench_ood.py"), "--bundle", str(result.bundle_dir)]
    command += ["--data-dir", str(settings.data_dir), "--placements", "3", "--generated-per-kind", "1"]
    subprocess.run([*command, "--out", str(out)], check=True, timeout=300, capture_output=True, cwd=tmp_path)

    report = json.loads(out.read_text())
    assert report["skimage_photos"]["answered"] >= 20 and report["generated_images"]["images"] == 6
    assert report["test_split_false_unknown"]["answered"] == 400
    assert report["test_split_false_unknown"]["unknown_share"] == result.test_metrics["unknown_rate"]
    assert report["explain_peak_on_pasted_pet"]["placements"] == 3
    assert report["detector"] == json.loads((result.bundle_dir / "metadata.json").read_text())["ood"]
