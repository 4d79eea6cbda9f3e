"""Answers people can trust, measured on a trained bundle through the real service (in process):

* ``unknown`` on unfamiliar images: every photo the installed scikit-image wheel ships (not its
  cat) and generated ones (uniform and Gaussian noise, flat colours, text, drawings, gradients);
* false ``unknown`` on the test split of ``--data-dir`` (every image a real cat or dog);
* ``/explain``: a test-split cat or dog pasted at a random place (about 40% of the width) on a
  scikit-image photo with no person or animal in it; where the evidence map peaks, ``--placements``
  times.

The dataset photos are read at run time and never stored. Writes ``benchmarks/results/ood.json``.

    python benchmarks/bench_ood.py --bundle BUNDLE --data-dir DATA [--placements 100] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from catsdogs.bundle import ModelBundle  # noqa: E402
from catsdogs.explain import peak  # noqa: E402
from catsdogs.files import write_text_atomic  # noqa: E402
from catsdogs.serve.app import create_app  # noqa: E402
from catsdogs.settings import Settings  # noqa: E402
from catsdogs.training.features import read_manifest, split_samples  # noqa: E402
from unfamiliar_images import generated_images, skimage_photos  # noqa: E402

BACKGROUNDS = ("coffee.png", "rocket.jpg", "motorcycle_left.png", "brick.png", "gravel.png")


def _answers(client: TestClient, images: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """Name → the answer (or the refusal's status and error code)."""
    out = {}
    for name, data in images.items():
        response = client.post("/predict", files={"file": (name, data)})
        body = response.json()
        out[name] = body if response.status_code == 200 else {"status": response.status_code, **body}
    return out


def _summary(answers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    answered = {name: a for name, a in answers.items() if "label" in a}
    unknown = [name for name, a in answered.items() if a["label"] == "unknown"]
    reasons: dict[str, int] = {}
    for name in unknown:
        reasons[answered[name]["unknown_reason"]] = reasons.get(answered[name]["unknown_reason"], 0) + 1
    return {
        "images": len(answers),
        "answered": len(answered),
        "refused": {name: a["error"] for name, a in answers.items() if "label" not in a},
        "unknown": len(unknown),
        "unknown_share": len(unknown) / max(len(answered), 1),
        "reasons": reasons,
        "answered_as_pets": {n: a["label"] for n, a in answered.items() if a["label"] != "unknown"},
    }


def _placements(client: TestClient, pets: list[bytes], count: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    backgrounds = skimage_photos()
    hits, misses = 0, []
    for i in range(count):
        background = Image.open(io.BytesIO(backgrounds[BACKGROUNDS[i % len(BACKGROUNDS)]])).convert("RGB")
        background = background.resize((640, 480))
        pet = Image.open(io.BytesIO(pets[i % len(pets)])).convert("RGB")
        side = int(rng.integers(220, 300))
        pet = pet.resize((side, round(side * pet.height / pet.width)))
        pet = pet.crop((0, 0, pet.width, min(pet.height, background.height)))
        left = int(rng.integers(0, background.width - pet.width + 1))
        top = int(rng.integers(0, background.height - pet.height + 1))
        background.paste(pet, (left, top))
        buffer = io.BytesIO()
        background.save(buffer, format="JPEG", quality=92)
        response = client.post("/explain?map=true", files={"file": ("composite.jpg", buffer.getvalue())})
        x, y = peak(np.asarray(response.json()["evidence"]), background.size)
        inside = left <= x <= left + pet.width and top <= y <= top + pet.height
        hits += int(inside)
        if not inside:
            misses.append(
                {"placement": i, "peak": [round(x), round(y)], "box": [left, top, pet.width, pet.height]}
            )
    return {"placements": count, "peak_inside": hits, "share": hits / count, "misses": misses}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--placements", type=int, default=100)
    parser.add_argument("--generated-per-kind", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ood.json")
    args = parser.parse_args(argv)
    started = time.monotonic()
    test = split_samples(read_manifest(args.data_dir), "test")
    bundle = ModelBundle.open(args.bundle)
    cache = tempfile.TemporaryDirectory(prefix="bench-ood-")  # the service's feedback store and cache
    settings = Settings(model_uri=str(args.bundle), cache_dir=Path(cache.name))
    with cache, TestClient(create_app(settings)) as client:
        while client.get("/ready").status_code != 200:
            time.sleep(0.1)
        skimage = _summary(_answers(client, skimage_photos()))
        generated = _summary(_answers(client, generated_images(args.generated_per_kind, seed=args.seed)))
        split = _summary(_answers(client, {str(s.path.name): s.path.read_bytes() for s in test}))
        split.pop("answered_as_pets")
        pets = [s.path.read_bytes() for s in test[: args.placements]]
        explain = _placements(client, pets, args.placements, args.seed)
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "bundle": {
            "architecture": bundle.metadata.get("architecture"),
            "strategy": bundle.metadata.get("strategy"),
            "test_accuracy": bundle.metrics.get("accuracy"),
        },
        "detector": bundle.metadata.get("ood"),
        "skimage_photos": skimage,
        "generated_images": generated,
        "test_split_false_unknown": split,
        "explain_peak_on_pasted_pet": explain,
        "seconds": round(time.monotonic() - started, 1),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
    }
    plain = json.dumps(
        result, indent=2, default=lambda value: value.item() if hasattr(value, "item") else str(value)
    )
    write_text_atomic(args.out, plain + "\n")
    return result


if __name__ == "__main__":
    summary = main()
    print(
        json.dumps(
            {
                "skimage_unknown": summary["skimage_photos"]["unknown_share"],
                "generated_unknown": summary["generated_images"]["unknown_share"],
                "test_false_unknown": summary["test_split_false_unknown"]["unknown_share"],
                "explain_peak_inside": summary["explain_peak_on_pasted_pet"]["share"],
            }
        )
    )
