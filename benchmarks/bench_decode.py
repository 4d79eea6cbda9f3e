"""JPEG decoders for the model input: time per image, and parity with today's path, in one run.

Each candidate turns the bytes of a JPEG into the model input (decode, conversion to RGB, the
project's ``resize`` and ``to_array`` with the bundle's ``preprocessing.json``). Today's path is
``decode_for_model`` (Pillow, with the JPEG draft of ``decode_draft_factor``); the candidates:

  * ``pillow_draft_1x``      Pillow drafting to 1× ``image_size``: not the same pixels, a what-if
                             (it would change ``decode_draft_factor``, so the model's preprocessing);
  * ``pillow_full``          Pillow without the draft (the full-size decode);
  * ``pillow_reduce``        Pillow without the draft, then ``Image.reduce`` by the draft's factor;
  * ``pillow_reducing_gap``  Pillow without the draft, resized with ``reducing_gap=2.0``;
  * ``simplejpeg``           ``simplejpeg.decode_jpeg`` scaled with ``min_width``/``min_height`` to the
                             draft's size; ``simplejpeg_fast`` the same with ``fastdct``/``fastupsample``;
  * ``turbojpeg``            PyTurboJPEG over the system's libturbojpeg, ``scaling_factor`` = the draft's;
  * ``opencv``               ``cv2.imdecode`` with ``IMREAD_REDUCED_COLOR_2/4/8`` = the draft's factor.

The library decoders read the header with Pillow first (what the project keeps: the format allowlist,
the size limits, the EXIF orientation) and use the scale Pillow's draft would (a power of two that
keeps both sides at or above the draft size), so that only the decoder differs. A JPEG a library
cannot decode (CMYK) goes through today's path and is counted in ``fallbacks``.

Images: the archive's photos (``dataset``: 200×200 in the shared copy), the same upscaled to the
Kaggle originals' usual 500×375 (``original_500x375``, in memory) and phone-size JPEGs (4032×3024,
made by upscaling dataset photos in a temp dir); none is ever committed. Timing: the candidates take
turns on each image (round-robin, the order rotated per image) and the whole pass is repeated, so
drifting load on a shared machine hits all alike. Reported: median and mean wall and CPU
(``time.process_time``) ms per image, the median of the per-image ratios today ÷ candidate
(``speedup_vs_today``), and today's path step by step (``today_steps``). Parity of the model input
against today's path on every image: max |Δ| in 0–255 pixel units and in model-input units, mean
|Δ|, the fraction of values off by more than 1/255. Labels: the bundle's model on
``--labels-images`` dataset photos and on the other kinds' images: label changes and max
|Δ probability| against today's path. A decoder that is not installed
(``benchmarks/decoders-requirements.txt``) is reported as such.

    python benchmarks/bench_decode.py --bundle BUNDLE [--archive ZIP] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # the sibling script: dataset and phone-size JPEGs
from catsdogs.files import write_text_atomic
from catsdogs.preprocessing import (
    ALLOWED_FORMATS,
    PREPROCESSING_FILE,
    PreprocessConfig,
    decode_for_model,
    decode_image,
    preprocess,
    resize,
    softmax,
    to_array,
)

Candidate = Callable[[bytes, PreprocessConfig], np.ndarray]
TODAY = "pillow_draft"
#: Pillow's ``exif_transpose`` table, for the decoders that ignore the EXIF orientation.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class FallbackError(Exception):
    """The library cannot decode this file (not a JPEG, CMYK): today's path decodes it instead."""


# --- the candidates -----------------------------------------------------------------------------
def draft_factor(width: int, height: int, draft_size: int | None) -> int:
    """The DCT scale denominator Pillow's ``draft`` picks: the largest of 8, 4, 2, 1 that keeps both
    sides at or above ``draft_size`` (``JpegImageFile.draft``)."""
    if not draft_size:
        return 1
    scale = min(width // draft_size, height // draft_size)
    return next((a for a in (8, 4, 2) if scale >= a), 1)


def pillow_draft(data: bytes, config: PreprocessConfig) -> np.ndarray:
    return preprocess(decode_for_model(data, config), config)


def pillow_draft_1x(data: bytes, config: PreprocessConfig) -> np.ndarray:
    """Not a like-for-like decoder: what drafting to 1× ``image_size`` (a smaller DCT scale) would buy."""
    return pillow_draft(data, config.model_copy(update={"decode_draft_factor": 1.0}))


def pillow_full(data: bytes, config: PreprocessConfig) -> np.ndarray:
    return preprocess(decode_image(data), config)


def pillow_reduce(data: bytes, config: PreprocessConfig) -> np.ndarray:
    image = decode_image(data)
    factor = draft_factor(*image.size, config.draft_size)
    return preprocess(image.reduce(factor) if factor > 1 else image, config)


def pillow_reducing_gap(data: bytes, config: PreprocessConfig) -> np.ndarray:
    if config.resize != "squash":
        raise SystemExit("pillow_reducing_gap is written for the squash resize policy")
    size, resample = config.image_size, Image.Resampling[config.interpolation.upper()]
    return to_array(decode_image(data).resize((size, size), resample, reducing_gap=2.0), config)


def via_library(decode: Callable[[bytes, tuple[int, int], int], np.ndarray]) -> Candidate:
    """A candidate that decodes JPEGs with ``decode(data, (width, height), factor)`` → RGB uint8."""

    def run(data: bytes, config: PreprocessConfig) -> np.ndarray:
        header = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        if header.format not in {"JPEG", "MPO"}:
            raise FallbackError(header.format)
        orientation = header.getexif().get(ExifTags.Base.Orientation, 1)
        try:
            pixels = decode(data, header.size, draft_factor(*header.size, config.draft_size))
        except (ValueError, OSError, RuntimeError) as exc:
            raise FallbackError(str(exc)) from None
        image = Image.fromarray(pixels)
        if orientation in _ORIENTATION:
            image = image.transpose(_ORIENTATION[orientation])
        return preprocess(image, config)

    return run


def simplejpeg_candidate(*, fast: bool) -> Candidate:
    import simplejpeg

    def decode(data: bytes, size: tuple[int, int], factor: int) -> np.ndarray:
        width, height = (math.ceil(side / factor) for side in size)  # the smallest scale that big
        return simplejpeg.decode_jpeg(
            data, colorspace="rgb", fastdct=fast, fastupsample=fast, min_width=width, min_height=height
        )

    return via_library(decode)


def turbojpeg_candidate() -> Candidate:
    import turbojpeg

    decoder = turbojpeg.TurboJPEG()  # RuntimeError without libturbojpeg (apt-get install libturbojpeg0)

    def decode(data: bytes, size: tuple[int, int], factor: int) -> np.ndarray:
        scaling = None if factor == 1 else (1, factor)
        return decoder.decode(data, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=scaling)

    return via_library(decode)


def opencv_candidate() -> Candidate:
    import cv2

    cv2.setNumThreads(1)  # one request per core in the service: no parallel colour conversion
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}
    flags[8] = cv2.IMREAD_REDUCED_COLOR_8

    def decode(data: bytes, size: tuple[int, int], factor: int) -> np.ndarray:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags[factor] | cv2.IMREAD_IGNORE_ORIENTATION)
        if bgr is None:
            raise ValueError("cv2.imdecode returned nothing")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    return via_library(decode)


FACTORIES: dict[str, Callable[[], Candidate]] = {
    TODAY: lambda: pillow_draft,
    "pillow_draft_1x": lambda: pillow_draft_1x,
    "pillow_full": lambda: pillow_full,
    "pillow_reduce": lambda: pillow_reduce,
    "pillow_reducing_gap": lambda: pillow_reducing_gap,
    "simplejpeg": lambda: simplejpeg_candidate(fast=False),
    "simplejpeg_fast": lambda: simplejpeg_candidate(fast=True),
    "turbojpeg": turbojpeg_candidate,
    "opencv": opencv_candidate,
}


def load_candidates(names: list[str]) -> tuple[dict[str, Candidate], dict[str, str]]:
    """The candidates that can run here, and why each of the others cannot."""
    ready, missing = {}, {}
    for name in names:
        try:
            ready[name] = FACTORIES[name]()
        except (ImportError, OSError, RuntimeError) as exc:
            missing[name] = f"not installed: {type(exc).__name__}: {exc}"
    return ready, missing


def versions() -> dict[str, str | None]:
    from PIL import __version__ as pillow
    from PIL import features

    found: dict[str, str | None] = {
        "pillow": pillow,
        "pillow_libjpeg_turbo": features.version("libjpeg_turbo"),
    }
    for module, key in (("simplejpeg", "simplejpeg"), ("turbojpeg", "PyTurboJPEG"), ("cv2", "opencv")):
        try:
            found[key] = getattr(__import__(module), "__version__", "installed")
        except ImportError:
            found[key] = None
    return found


# --- timing ---------------------------------------------------------------------------------------
def time_candidates(
    candidates: dict[str, Candidate], images: list[bytes], config: PreprocessConfig, repeats: int
) -> dict[str, dict[str, float]]:
    """Wall and CPU ms per image, the candidates taking turns on each image, the pass repeated."""
    names = list(candidates)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: imports, first allocations
        _run(candidates, name, images[0], config)
    for repeat in range(repeats):
        for i, data in enumerate(images):
            shift = (i + repeat) % len(names)
            for name in names[shift:] + names[:shift]:
                wall_start, cpu_start = time.perf_counter(), time.process_time()
                _run(candidates, name, data, config)
                wall[name].append((time.perf_counter() - wall_start) * 1000)
                cpu[name].append((time.process_time() - cpu_start) * 1000)
    return {name: _summary(wall[name], cpu[name], wall.get(TODAY)) for name in names}


def stages(images: list[bytes], config: PreprocessConfig, repeats: int) -> dict[str, float]:
    """Median CPU ms of each step of today's path: where the time goes."""
    steps: dict[str, list[float]] = {"decode_for_model": [], "resize": [], "to_array": []}
    for _ in range(repeats):
        for data in images:
            start = time.process_time()
            image = decode_for_model(data, config)
            decoded = time.process_time()
            resized = resize(image, config)
            done_resize = time.process_time()
            to_array(resized, config)
            steps["decode_for_model"].append((decoded - start) * 1000)
            steps["resize"].append((done_resize - decoded) * 1000)
            steps["to_array"].append((time.process_time() - done_resize) * 1000)
    return {f"{step}_cpu_ms": round(statistics.median(ms), 3) for step, ms in steps.items()}


def _summary(wall: list[float], cpu: list[float], today: list[float] | None) -> dict[str, float]:
    out = {
        "median_wall_ms": round(statistics.median(wall), 3),
        "median_cpu_ms": round(statistics.median(cpu), 3),
        "mean_wall_ms": round(statistics.fmean(wall), 3),
        "mean_cpu_ms": round(statistics.fmean(cpu), 3),
        "calls": len(wall),
    }
    if today is not None:  # paired per image and repeat: robust to the load drifting between images
        out["speedup_vs_today"] = round(statistics.median(t / w for t, w in zip(today, wall, strict=True)), 3)
    return out


def _run(candidates: dict[str, Candidate], name: str, data: bytes, config: PreprocessConfig) -> np.ndarray:
    try:
        return candidates[name](data, config)
    except FallbackError:
        return pillow_draft(data, config)


# --- parity and labels ----------------------------------------------------------------------------
class Parity:
    """Running |Δ| statistics of one candidate's model inputs against today's, and its label changes."""

    def __init__(self, config: PreprocessConfig) -> None:
        # model-input units → 0-255 pixel units: x = (p / 255 - mean) / std, so Δp = Δx · std · 255
        self.to_pixels = np.asarray(config.std, dtype=np.float64)[:, None, None] * 255.0
        self.max_model = self.max_pixels = self.sum_abs = 0.0
        self.values = self.over = self.images = self.identical = self.fallbacks = 0
        self.label_changes, self.max_prob_delta, self.labelled = 0, 0.0, 0

    def add(self, today: np.ndarray, other: np.ndarray) -> None:
        delta = np.abs(other.astype(np.float64) - today)
        pixels = delta * self.to_pixels
        self.max_model = max(self.max_model, float(delta.max()))
        self.max_pixels = max(self.max_pixels, float(pixels.max()))
        self.sum_abs += float(delta.sum())
        self.values += delta.size
        self.over += int((pixels > 1.0 + 1e-6).sum())  # pixels are whole levels: "more than 1/255"
        self.images += 1
        self.identical += int(not delta.any())

    def add_labels(self, today: np.ndarray, other: np.ndarray) -> None:
        self.labelled += 1
        self.label_changes += int(today.argmax() != other.argmax())
        self.max_prob_delta = max(self.max_prob_delta, float(np.abs(other - today).max()))

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "images": self.images,
            "identical_images": self.identical,
            "fallbacks": self.fallbacks,
            "max_abs_delta_pixels": round(self.max_pixels, 3),
            "max_abs_delta_model": round(self.max_model, 5),
            "mean_abs_delta_model": float(f"{self.sum_abs / max(1, self.values):.3g}"),
            "fraction_over_1_255": float(f"{self.over / max(1, self.values):.3g}"),
        }
        if self.labelled:
            out |= {
                "labelled_images": self.labelled,
                "label_changes": self.label_changes,
                "max_abs_delta_probability": float(f"{self.max_prob_delta:.3g}"),
            }
        return out


def compare(
    candidates: dict[str, Candidate], images: list[bytes], config: PreprocessConfig, session: Any | None
) -> dict[str, dict[str, Any]]:
    """Parity (and, with a model session, labels) of every candidate against today's path, image by
    image (1,000 model inputs of 280 px would hold 0.9 GB); the model runs only on inputs that differ."""
    stats = {name: Parity(config) for name in candidates}
    for data in images:
        today = pillow_draft(data, config)
        today_probs = None if session is None else _probabilities(session, today)
        for name, candidate in candidates.items():
            try:
                other = candidate(data, config)
            except FallbackError:
                other, stats[name].fallbacks = today, stats[name].fallbacks + 1
            stats[name].add(today, other)
            if today_probs is not None:
                same = np.array_equal(today, other)
                stats[name].add_labels(today_probs, today_probs if same else _probabilities(session, other))
    return {name: parity.report() for name, parity in stats.items()}


def _probabilities(session: Any, array: np.ndarray) -> np.ndarray:
    from catsdogs.runtime import run_logits

    return softmax(run_logits(session, array[None]))[0]


def open_session(bundle: Path, config: PreprocessConfig) -> Any:
    from catsdogs.runtime import open_model

    return open_model(bundle / "model.onnx", config)


# --- the run --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, required=True, help="its preprocessing.json and model.onnx")
    parser.add_argument("--archive", type=Path, default=bench_serve.DATASET, help="the Kaggle train.zip")
    parser.add_argument("--images", type=int, default=400, help="dataset photos timed")
    parser.add_argument("--phone-images", type=int, default=12, help="4032x3024 JPEGs timed")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the images")
    parser.add_argument(
        "--labels-images", type=int, default=1000, help="dataset photos for parity and labels"
    )
    parser.add_argument("--candidates", default=",".join(FACTORIES), help="comma-separated names")
    parser.add_argument("--quick", action="store_true", help="6 photos, 1 phone JPEG, 1 pass")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.phone_images, args.repeats, args.labels_images = 6, 1, 1, 6
    names = [name for name in args.candidates.split(",") if name]
    unknown = sorted(set(names) - set(FACTORIES))
    if unknown:
        parser.error(f"unknown candidates {unknown}; known: {', '.join(FACTORIES)}")
    args.candidates = [TODAY, *(name for name in names if name != TODAY)]
    return args


def table(result: dict[str, Any]) -> str:
    """The markdown summary printed at the end: one cell per image kind, ``/``-separated."""
    kinds = list(result["timing"])
    rows = [
        f"| decoder ({' / '.join(kinds)}) | CPU ms (wall) | speedup | max Δ px | > 1/255 | label changes |",
        "|" + "---|" * 6,
    ]
    for name in result["candidates"]:
        timing = [result["timing"][kind][name] for kind in kinds]
        parity = [result["parity"][kind][name] for kind in kinds]
        cells = [
            " / ".join(f"{t['median_cpu_ms']:.2f} ({t['median_wall_ms']:.2f})" for t in timing),
            " / ".join(f"{t['speedup_vs_today']:.2f}" for t in timing),
            " / ".join(f"{p['max_abs_delta_pixels']:g}" for p in parity),
            " / ".join(f"{p['fraction_over_1_255']:g}" for p in parity),
            " / ".join(str(p.get("label_changes", "—")) for p in parity),
        ]
        rows.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(rows)


def resized_jpegs(sources: list[bytes], size: tuple[int, int]) -> list[bytes]:
    """The photos at the Kaggle originals' usual size (this archive's copy is 200×200), upscaled the
    way ``bench_serve.phone_jpegs`` makes phone photos; in memory, never written."""
    out = []
    for data in sources:
        image = Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bench_serve.DATASET = args.archive
    bundle = args.bundle.resolve()
    config = PreprocessConfig.load(bundle / PREPROCESSING_FILE)
    candidates, missing = load_candidates(args.candidates)
    started, load_before = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), os.getloadavg()
    labelled = bench_serve.dataset_jpegs(max(args.images, args.labels_images))
    with tempfile.TemporaryDirectory(prefix="catsdogs-decode-") as tmp:
        phone = bench_serve.phone_jpegs(labelled, args.phone_images, Path(tmp))
    kinds = {
        "dataset": labelled[: args.images],
        "original_500x375": resized_jpegs(labelled[: args.images], (500, 375)),
        "phone_4032x3024": phone,
    }
    timing = {
        kind: time_candidates(candidates, images, config, args.repeats) for kind, images in kinds.items()
    }
    steps = {kind: stages(images, config, args.repeats) for kind, images in kinds.items()}
    session = open_session(bundle, config) if args.labels_images else None
    parity = {
        "dataset": compare(candidates, labelled[: max(args.labels_images, args.images)], config, session),
        **{kind: compare(candidates, kinds[kind], config, session) for kind in list(kinds)[1:]},
    }
    result = {
        "started_at": started,
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "bundle": str(bundle),
        "archive": str(args.archive),
        "preprocessing": config.model_dump(mode="json"),
        "images": {
            "dataset_timed": len(kinds["dataset"]),
            "phone_timed": len(phone),
            "repeats": args.repeats,
            **{f"{kind}_mean_kb": round(statistics.fmean(map(len, kinds[kind])) / 1024, 1) for kind in kinds},
        },
        "labels_images": args.labels_images,
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
        },
        "versions": versions(),
        "candidates": list(candidates),
        "not_installed": missing,
        "timing": timing,
        "today_steps": steps,
        "parity": parity,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
