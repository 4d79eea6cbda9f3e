"""Ingest of a balanced sample (``per_class``): what `catsdogs quickstart` builds its demo from."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from datafiles import read_manifest, write_zip

from catsdogs.data import ingest
from catsdogs.data.ingest import sample_members
from catsdogs.data.sources import open_source
from catsdogs.settings import Settings


def _archive(tmp_path: Path, photos: dict[str, list[bytes]]) -> Path:
    members = {f"train/cat.{i}.jpg": photos["cat"][i] for i in range(8)}
    members |= {f"train/dog.{i}.jpg": photos["dog"][i] for i in range(2)}
    members["readme.txt"] = b"licence text"
    return write_zip(tmp_path / "train.zip", members)


def test_sample_takes_at_most_n_per_class_and_drops_unlabelled_files(
    tmp_path: Path, settings: Settings, real_photos: dict[str, list[bytes]]
) -> None:
    result = ingest(settings, source=str(_archive(tmp_path, real_photos)), show_progress=False, per_class=3)
    assert result.report["per_class"]["cat"]["total"] == 3
    assert result.report["per_class"]["dog"]["total"] == 2  # fewer than asked: all of them
    assert result.report["counts"]["files"] == 5
    assert result.report["rejections"] == []
    assert result.report["sample_per_class"] == 3
    assert len(read_manifest(settings)) == 5


def test_sample_depends_on_the_seed_only(tmp_path: Path, real_photos: dict[str, list[bytes]]) -> None:
    source = open_source(_archive(tmp_path, real_photos), classes=("cat", "dog"))
    reversed_source = replace(source, members=tuple(reversed(source.members)))
    picks = {
        seed: [m.name for m in sample_members(source, per_class=3, seed=seed).members] for seed in range(6)
    }
    assert picks[0] == [m.name for m in sample_members(reversed_source, per_class=3, seed=0).members]
    assert len({tuple(p) for p in picks.values()}) > 1  # another seed, another sample
    assert all(sum(name.startswith("train/cat.") for name in p) == 3 for p in picks.values())


def test_without_a_sample_everything_is_ingested(
    tmp_path: Path, settings: Settings, real_photos: dict[str, list[bytes]]
) -> None:
    result = ingest(settings, source=str(_archive(tmp_path, real_photos)), show_progress=False)
    assert result.report["sample_per_class"] is None
    assert result.report["per_class"]["cat"]["total"] == 8
    assert result.report["counts"]["files"] == 11
