"""The decoder benchmark runs end to end (``--quick``: six real photos, a tiny model, the decoders
installed here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fakes import build_bundle
from support import REPO, dataset_archive

KINDS = ("dataset", "original_500x375", "phone_4032x3024")


def test_quick_run_times_every_installed_decoder_against_todays_path(tmp_path: Path) -> None:
    bundle = build_bundle(tmp_path / "bundle")
    out = tmp_path / "decode.json"
    script = REPO / "benchmarks" / "bench_decode.py"
    command = [sys.executable, str(script), "--bundle", str(bundle), "--quick"]
    command += ["--archive", str(dataset_archive()), "--out", str(out)]
    subprocess.run(command, check=True, timeout=120, capture_output=True, cwd=tmp_path)

    result = json.loads(out.read_text())
    ran, missing = result["candidates"], result["not_installed"]
    assert ran[0] == "pillow_draft"
    assert {"pillow_full", "pillow_reduce", "pillow_reducing_gap"} <= set(ran)  # Pillow is always here
    assert set(result["timing"]["dataset"]) == set(result["parity"]["dataset"]) == set(ran)
    assert len(ran) + len(missing) == 9 and all(why.startswith("not installed") for why in missing.values())
    counts = {key: result["images"][key] for key in ("dataset_timed", "phone_timed", "repeats")}
    assert counts == {"dataset_timed": 6, "phone_timed": 1, "repeats": 1}
    sizes = [result["images"][f"{kind}_mean_kb"] for kind in KINDS]
    assert sizes == sorted(sizes) and sizes[0] > 0  # 200x200 < 500x375 < 4032x3024
    for kind in KINDS:
        for name in ran:
            timing = result["timing"][kind][name]
            assert timing["median_wall_ms"] > 0 and timing["median_cpu_ms"] > 0
        today = result["parity"][kind]["pillow_draft"]
        assert today["max_abs_delta_pixels"] == 0 and today["fraction_over_1_255"] == 0
        assert today["identical_images"] == today["images"] == (1 if kind.startswith("phone") else 6)
        assert today["label_changes"] == 0 and today["max_abs_delta_probability"] == 0
        assert result["timing"][kind]["pillow_draft"]["speedup_vs_today"] == 1
    # the full decode of a 4032x3024 JPEG is not the draft's: the comparison sees it
    assert result["parity"]["phone_4032x3024"]["pillow_full"]["identical_images"] == 0
    assert (
        result["timing"]["phone_4032x3024"]["pillow_full"]["median_cpu_ms"]
        > (result["timing"]["phone_4032x3024"]["pillow_draft"]["median_cpu_ms"])
    )


def test_a_decoder_that_is_not_installed_is_reported_not_fatal(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    for module in ("simplejpeg", "turbojpeg", "cv2"):
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    import bench_decode

    ready, missing = bench_decode.load_candidates(["pillow_draft", "simplejpeg", "turbojpeg", "opencv"])
    assert list(ready) == ["pillow_draft"]
    assert sorted(missing) == ["opencv", "simplejpeg", "turbojpeg"]
    assert all(why.startswith("not installed: ModuleNotFoundError") for why in missing.values())
