"""``predict-batch``: both engines give the same answers on real photos, a bad file is one failed
row (never a failed job), and the output appears whole or not at all."""

from __future__ import annotations

import csv
import json
import shutil
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from catsdogs import CatsdogsError
from catsdogs.batch import local_engine
from catsdogs.batch.predict import predict_batch
from catsdogs.cli import app
from catsdogs.settings import Settings
from fakes import build_bundle
from support import dataset_photos, require_module

PER_CLASS = 16
#: Files that are not images of ours, and the error code each row must carry.
BAD_FILES = {"bad/empty.jpg": b"", "bad/notes.jpg": b"not an image at all", "bad/cut.jpg": None}
BAD_CODES = {"bad/empty.jpg": "empty", "bad/notes.jpg": "not_an_image", "bad/cut.jpg": "truncated"}


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory, dataset_zip: Path) -> Path:
    """A folder tree of real photos (two nesting levels) plus three bad files."""
    root = tmp_path_factory.mktemp("collection")
    for label in ("cat", "dog"):
        for k, data in enumerate(dataset_photos(dataset_zip, label, PER_CLASS, offset=300)):
            path = root / "shelter" / f"batch{k % 2}" / f"{label}{k:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    cut = (root / "shelter" / "batch0" / "cat000.jpg").read_bytes()
    for name, data in BAD_FILES.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(cut[: len(cut) // 3] if data is None else data)
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("model") / "bundle")


def _settings(tmp_path: Path, **fields: object) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", predict_batch_size=8, **fields)  # type: ignore[arg-type]


def _rows(path: Path) -> dict[str, dict]:
    return {row["path"]: row for row in map(json.loads, path.read_text().splitlines())}


def _check_rows(rows: dict[str, dict]) -> None:
    assert len(rows) == 2 * PER_CLASS + len(BAD_FILES)
    for name, code in BAD_CODES.items():
        assert rows[name]["error"].startswith(f"{code}:"), rows[name]
        assert rows[name]["label"] == "" and rows[name]["confidence"] is None
    good = [row for name, row in rows.items() if name not in BAD_CODES]
    assert {row["label"] for row in good} <= {"cat", "dog"}
    for row in good:
        assert row["error"] == ""
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["confidence"] == max(row["probabilities"].values())


def test_local_engine_scores_a_folder_and_reports_bad_files_per_file(
    tmp_path: Path, collection: Path, bundle: Path
) -> None:
    out = tmp_path / "scores.jsonl"
    result = predict_batch(collection, out, settings=_settings(tmp_path), model_uri=str(bundle))
    rows = _rows(out)
    _check_rows(rows)
    assert result.images == len(rows) and result.failed == len(BAD_FILES)
    assert result.errors == {"empty": 1, "not_an_image": 1, "truncated": 1}
    assert {row["model_version"] for row in rows.values()} == {result.model_version}
    assert list(rows) == sorted(rows), "rows come in the collection's order"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, collection: Path) -> Path:
    """The same collection as a zip archive."""
    path = tmp_path_factory.mktemp("zipped") / "collection.zip"
    with zipfile.ZipFile(path, "w") as zipped:
        for member in sorted(collection.rglob("*.jpg")):
            zipped.write(member, member.relative_to(collection).as_posix())
    return path


def test_a_zip_archive_gives_the_rows_of_the_folder(
    tmp_path: Path, collection: Path, archive: Path, bundle: Path
) -> None:
    settings = _settings(tmp_path)
    predict_batch(collection, tmp_path / "folder.jsonl", settings=settings, model_uri=str(bundle))
    predict_batch(archive, tmp_path / "zip.jsonl", settings=settings, model_uri=str(bundle))
    assert _rows(tmp_path / "zip.jsonl") == _rows(tmp_path / "folder.jsonl")


def test_a_models_uri_is_resolved_as_the_service_resolves_it(
    tmp_path: Path, collection: Path, bundle: Path
) -> None:
    """``models:/name@alias`` → the registry's version, downloaded into the cache; same answers."""
    from mlflow import MlflowClient

    shutil.copytree(bundle, tmp_path / "model" / "artifacts" / "bundle")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("catsdogs-classifier")
    version = client.create_model_version("catsdogs-classifier", str(tmp_path / "model")).version
    client.set_registered_model_alias("catsdogs-classifier", "champion", version)
    settings = _settings(tmp_path, mlflow_tracking_uri=uri)
    result = predict_batch(
        collection, tmp_path / "registry.jsonl", settings=settings,
        model_uri="models:/catsdogs-classifier@champion",
    )  # fmt: skip
    predict_batch(collection, tmp_path / "folder.jsonl", settings=settings, model_uri=str(bundle))
    assert result.model_version == str(version)
    registry_rows, folder_rows = _rows(tmp_path / "registry.jsonl"), _rows(tmp_path / "folder.jsonl")
    assert {row["model_version"] for row in registry_rows.values()} == {str(version)}
    assert [(r["label"], r["probabilities"]) for r in registry_rows.values()] == [
        (r["label"], r["probabilities"]) for r in folder_rows.values()
    ]


def test_csv_output_has_one_column_per_class(tmp_path: Path, collection: Path, bundle: Path) -> None:
    out = tmp_path / "scores.csv"
    predict_batch(collection, out, settings=_settings(tmp_path), model_uri=str(bundle))
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == [
        "path", "label", "predicted", "confidence", "p_cat", "p_dog", "ood_score", "unknown_reason",
        "model_version", "error",
    ]  # fmt: skip
    good = next(r for r in rows if not r["error"])
    assert float(good["p_cat"]) + float(good["p_dog"]) == pytest.approx(1.0, abs=1e-5)
    bad = next(r for r in rows if r["path"] == "bad/empty.jpg")
    assert bad["p_cat"] == bad["confidence"] == bad["label"] == ""


def test_a_job_failing_half_way_leaves_the_previous_output_untouched(
    tmp_path: Path, collection: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "scores.jsonl"
    out.write_text("previous\n")
    calls = iter(range(1000))

    def failing_score(*args: object) -> list[dict]:
        if next(calls) == 2:
            raise RuntimeError("the machine went away")
        return real_score(*args)

    real_score = local_engine.score
    monkeypatch.setattr(local_engine, "score", failing_score)
    with pytest.raises(RuntimeError, match="went away"):
        predict_batch(collection, out, settings=_settings(tmp_path), model_uri=str(bundle))
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".scores")) == []


def test_unknown_engine_format_and_missing_ray_are_one_line_errors(
    tmp_path: Path, collection: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path)
    with pytest.raises(CatsdogsError, match="unknown engine"):
        predict_batch(
            collection, tmp_path / "a.csv", settings=settings, model_uri=str(bundle), engine="spark"
        )  # type: ignore[arg-type]
    with pytest.raises(CatsdogsError, match=r"\.csv or \.jsonl"):
        predict_batch(collection, tmp_path / "a.parquet", settings=settings, model_uri=str(bundle))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(CatsdogsError, match=r"catsdogs\[ray\]") as failure:
        predict_batch(collection, tmp_path / "a.csv", settings=settings, model_uri=str(bundle), engine="ray")
    assert "\n" not in str(failure.value)
    assert not (tmp_path / "a.csv").exists()


def test_the_cli_prints_a_summary(tmp_path: Path, collection: Path, bundle: Path) -> None:
    out = tmp_path / "scores.jsonl"
    args = ["predict-batch", str(collection), "-o", str(out), "--model-uri", str(bundle), "--batch-size", "4"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["images"] == 2 * PER_CLASS + len(BAD_FILES) and summary["failed"] == len(BAD_FILES)
    assert summary["engine"] == "local" and out.is_file()


# --- the Ray engine --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local() -> Iterator[object]:
    """One local Ray instance for the module (starting one takes seconds)."""
    ray = require_module("ray", extra="ray")
    from catsdogs.batch.ray_engine import start_local

    started = start_local(ray)
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_ray_engine_gives_the_local_engines_answers(
    tmp_path: Path, collection: Path, archive: Path, bundle: Path, ray_local: object
) -> None:
    settings = _settings(tmp_path, predict_workers=2)
    local = predict_batch(collection, tmp_path / "local.jsonl", settings=settings, model_uri=str(bundle))
    on_ray = predict_batch(  # from the zip: each actor opens the archive itself
        archive, tmp_path / "ray.jsonl", settings=settings, model_uri=str(bundle), engine="ray"
    )
    assert (on_ray.images, on_ray.failed, on_ray.labels) == (local.images, local.failed, local.labels)
    local_rows, ray_rows = _rows(tmp_path / "local.jsonl"), _rows(tmp_path / "ray.jsonl")
    _check_rows(ray_rows)
    assert list(ray_rows) == list(local_rows), "same files, same order"
    for name, row in local_rows.items():
        other = ray_rows[name]
        assert (other["label"], other["error"], other["model_version"]) == (
            row["label"], row["error"], row["model_version"],
        )  # fmt: skip
        for label, p in row["probabilities"].items():
            assert other["probabilities"][label] == pytest.approx(p, abs=1e-5)
    assert ray_local.is_initialized(), "a job leaves a Ray instance it did not start running"


def test_a_bundle_with_a_detector_answers_unknown_for_what_is_not_a_pet(tmp_path: Path, trust_run) -> None:
    """The service's rule in batch: the scikit-image photos and a blank image come back `unknown`."""
    from unfamiliar_images import generated_images, skimage_photos

    result, _ = trust_run
    folder = tmp_path / "uploads"
    folder.mkdir()
    photos = {name: data for name, data in skimage_photos().items() if name.endswith((".png", ".jpg"))}
    for name, data in {**photos, "blank.png": generated_images(1)["flat-0.png"]}.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "scores.jsonl"
    predict_batch(folder, out, settings=_settings(tmp_path), model_uri=str(result.bundle_dir))
    rows = _rows(out)
    answered = [row for row in rows.values() if not row["error"]]
    unknown = [row for row in answered if row["label"] == "unknown"]
    assert len(unknown) >= 0.9 * len(answered)
    assert rows["blank.png"]["unknown_reason"] == "flat_image"
    assert all(row["predicted"] in ("cat", "dog") and row["ood_score"] is not None for row in answered)
