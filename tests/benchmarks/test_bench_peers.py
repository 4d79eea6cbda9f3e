"""The side-by-side serving benchmark runs end to end (``--quick``: a tiny model, no BentoML)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fakes import build_bundle
from support import REPO, dataset_archive


def test_quick_run_compares_the_service_with_the_naive_endpoint_raw_onnxruntime_and_itself_shadowing(
    tmp_path: Path,
) -> None:
    bundle = build_bundle(tmp_path / "bundle")
    out = tmp_path / "peers.json"
    script = REPO / "benchmarks" / "bench_peers.py"
    command = [sys.executable, str(script), "--bundle", str(bundle), "--quick", "--shadow-fraction", "0.5"]
    command += ["--client", "aiohttp", "--archive", str(dataset_archive()), "--out", str(out)]
    subprocess.run(command, check=True, timeout=240, capture_output=True, cwd=tmp_path)

    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"catsdogs", "naive", "catsdogs_shadow"}  # BentoML only in the full run
    assert result["non_200"] == {"catsdogs": 0, "naive": 0, "catsdogs_shadow": 0}
    shadow = result["runs"]["catsdogs_shadow"][0]["shadow"]
    assert shadow["predictions"] > 0 and shadow["failures"] == 0
    assert result["ratios_catsdogs_over_peer"]["shadow_cost/dataset/c16/p99_with_over_without"] > 0
    assert result["service_env"]["CATSDOGS_API_KEYS"] == "<set>"  # production settings, keys on
    for runs in result["runs"].values():
        levels = [level["concurrency"] for level in runs[0]["dataset"]]
        assert levels == [1, 16]
        assert all(level["requests"] > 0 and level["p50_ms"] > 0 for level in runs[0]["dataset"])
        assert runs[0]["rss_mb_after_requests"] > 0
    ratios = result["ratios_catsdogs_over_peer"]
    for key in ("dataset/c1/p50_vs_naive", "dataset/c16/rps_vs_naive", "dataset/c16/rps_vs_raw_best"):
        assert ratios[key] > 0
    assert ratios["dataset/c16/rps_vs_raw_from_jpeg"] > ratios["dataset/c16/rps_vs_raw_server_layout"]
    raw = result["raw_onnxruntime"]
    assert raw["best_images_per_s"] > 0
    # The second reference decodes and preprocesses each JPEG on the same threads: slower than the
    # same layout on tensors, timed in turns with it.
    from_jpeg, tensors = raw["server_from_jpeg"], raw["configs"]["server"]
    assert from_jpeg["callers"] == tensors["callers"] and from_jpeg["batch"] == 1
    assert 0 < from_jpeg["vs_tensors"] < 1
