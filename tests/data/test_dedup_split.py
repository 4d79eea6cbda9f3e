"""Duplicates, label conflicts and the reproducible, leak-free, growth-stable split."""

from __future__ import annotations

import importlib
import random
from collections import Counter
from pathlib import Path

import pytest
from datafiles import decode, encode, kaggle_members, read_manifest, write_folder, write_zip
from PIL import Image, ImageEnhance

from catsdogs.data import ingest
from catsdogs.data.dedup import hamming, near_duplicate_groups, near_duplicate_pairs
from catsdogs.data.split import assign_splits, draw, split_for
from catsdogs.settings import Settings


def _variant(photo: bytes) -> bytes:
    """The same photo resized, slightly brightened and re-encoded: a near-duplicate, not an exact one."""
    image = decode(photo).resize((180, 180), Image.Resampling.BICUBIC)
    return encode(ImageEnhance.Brightness(image).enhance(1.05), "JPEG", quality=80)


def test_banding_finds_exactly_the_pairs_brute_force_finds() -> None:
    rng = random.Random(7)
    base = [rng.getrandbits(64) for _ in range(150)]
    values = list(base)
    for value in base[:60]:  # near copies at 0..6 flipped bits, some within the threshold, some not
        flipped = value
        for bit in rng.sample(range(64), rng.randint(0, 6)):
            flipped ^= 1 << bit
        values.append(flipped)
    hashes = {f"k{i:04d}": f"{v:016x}" for i, v in enumerate(values)}
    brute = {
        (a, b)
        for a in hashes
        for b in hashes
        if a < b and hamming(int(hashes[a], 16), int(hashes[b], 16)) <= 4
    }
    found = set(near_duplicate_pairs(hashes, max_distance=4))
    assert found == brute
    assert len(found) > 20  # the test data really contains near pairs


def test_identical_hashes_form_one_group_without_quadratic_pairs() -> None:
    hashes = {f"k{i:05d}": "0" * 16 for i in range(3000)}
    pairs = near_duplicate_pairs(hashes, max_distance=4)
    assert len(pairs) == 2999
    assert near_duplicate_groups(hashes, max_distance=4) == [sorted(hashes)]


def test_negative_distance_disables_near_duplicates() -> None:
    assert near_duplicate_pairs({"a": "0" * 16, "b": "0" * 16}, max_distance=-1) == []


def test_split_draw_follows_the_ratios_per_class() -> None:
    ratios = (0.8, 0.1, 0.1)
    for label in ("cat", "dog"):
        counts = Counter(split_for(draw(42, label, f"{i:064x}"), ratios) for i in range(20_000))
        assert counts["train"] / 20_000 == pytest.approx(0.8, abs=0.012)
        assert counts["val"] / 20_000 == pytest.approx(0.1, abs=0.008)
        assert counts["test"] / 20_000 == pytest.approx(0.1, abs=0.008)


def test_a_group_gets_one_split_decided_by_its_smallest_hash() -> None:
    splits = assign_splits([("cat", ["b" * 64, "a" * 64, "c" * 64])], seed=1, ratios=(0.5, 0.25, 0.25))
    assert len(set(splits.values())) == 1
    assert splits["a" * 64] == split_for(draw(1, "cat", "a" * 64), (0.5, 0.25, 0.25))


def test_exact_duplicates_with_one_label_keep_one_row(
    tmp_path: Path, settings: Settings, real_photos
) -> None:
    photo = real_photos["cat"][0]
    archive = write_zip(tmp_path / "d.zip", {"train/cat.1.jpg": photo, "train/cat.2.jpg": photo})
    report = ingest(settings, source=str(archive), show_progress=False).report
    assert report["counts"]["manifest_rows"] == 1
    assert report["exact_duplicates"] == [
        {
            "sha256": read_manifest(settings)[0]["sha256"],
            "label": "cat",
            "kept": "train/cat.1.jpg",
            "removed": ["train/cat.2.jpg"],
        }
    ]


@pytest.mark.parametrize("copy", ["exact", "resized_reencoded"])
def test_same_photo_under_both_labels_is_a_conflict_and_excluded(
    tmp_path: Path, settings: Settings, real_photos, copy: str
) -> None:
    photo = real_photos["cat"][3]
    members = kaggle_members(real_photos, 3)
    members["train/dog.999.jpg"] = photo if copy == "exact" else _variant(photo)  # a cat, labelled dog
    members["train/cat.3.jpg"] = photo
    result = ingest(settings, source=str(write_zip(tmp_path / "c.zip", members)), show_progress=False)
    (conflict,) = result.report["conflicting_labels"]
    assert conflict["labels"] == ["cat", "dog"]
    assert sorted(i["source"] for i in conflict["images"]) == ["train/cat.3.jpg", "train/dog.999.jpg"]
    rows = read_manifest(settings)
    assert len(rows) == 6
    assert not {i["sha256"] for i in conflict["images"]} & {r["sha256"] for r in rows}
    stored = sorted(p.name for p in (settings.data_dir / "images").rglob("*.jpg"))
    assert stored == sorted(f"{r['sha256']}.jpg" for r in rows)


def test_near_duplicates_under_one_label_are_kept_in_one_split(
    tmp_path: Path, settings: Settings, real_photos
) -> None:
    members = kaggle_members(real_photos, 20)
    for i in range(20):
        members[f"train/cat.copy{i}.jpg"] = _variant(real_photos["cat"][i])
    report = ingest(settings, source=str(write_zip(tmp_path / "n.zip", members)), show_progress=False).report
    assert report["counts"]["manifest_rows"] == 60
    assert len(report["near_duplicate_groups"]) >= 18
    split_of = {row["sha256"]: row["split"] for row in read_manifest(settings)}
    for group in report["near_duplicate_groups"]:
        assert {split_of[sha] for sha in group["sha256"]} == {group["split"]}


def test_manifest_is_byte_identical_across_runs_and_file_orders(tmp_path: Path, real_photos) -> None:
    members = kaggle_members(real_photos, 25)
    names = list(members)
    random.Random(3).shuffle(names)
    shuffled = {name: members[name] for name in names}
    manifests = []
    for i, (kind, source) in enumerate(
        [
            ("zip", write_zip(tmp_path / "a.zip", members)),
            ("zip", write_zip(tmp_path / "b.zip", shuffled)),
            ("folder", write_folder(tmp_path / "c", shuffled)),
        ]
    ):
        settings = Settings(data_dir=tmp_path / f"out{i}")
        ingest(settings, source=str(source), show_progress=False)
        manifests.append(settings.manifest_path.read_bytes())
        assert kind
    rerun = Settings(data_dir=tmp_path / "out0")
    ingest(rerun, source=str(tmp_path / "b.zip"), show_progress=False)
    manifests.append(rerun.manifest_path.read_bytes())
    assert manifests[0].count(b"\n") == 51
    assert all(m == manifests[0] for m in manifests)


def test_parallel_and_serial_ingest_give_the_same_manifest(tmp_path: Path, real_photos) -> None:
    members = kaggle_members(real_photos, 40)  # 80 photos: pool forced with a low threshold
    members |= {f"train/cat.v{i}.jpg": _variant(real_photos["cat"][i]) for i in range(40)}
    members |= {f"train/dog.v{i}.jpg": _variant(real_photos["dog"][i]) for i in range(40)}
    archive = write_zip(tmp_path / "p.zip", members)
    ingest_module = importlib.import_module("catsdogs.data.ingest")  # the package re-exports the function

    outputs = []
    for workers in (1, 2):
        settings = Settings(data_dir=tmp_path / f"w{workers}", ingest_workers=workers)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ingest_module, "MIN_FILES_FOR_POOL", 10)
            ingest(settings, source=str(archive), show_progress=False)
        outputs.append(settings.manifest_path.read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0].count(b"\n") == 161


def test_adding_images_never_moves_existing_ones(tmp_path: Path, real_photos) -> None:
    first = {f"train/{label}.{i}.jpg": real_photos[label][i] for label in ("cat", "dog") for i in range(20)}
    grown = first | {
        f"train/{label}.{i}.jpg": real_photos[label][i] for label in ("cat", "dog") for i in range(20, 40)
    }
    before = Settings(data_dir=tmp_path / "before")
    after = Settings(data_dir=tmp_path / "after")
    ingest(before, source=str(write_zip(tmp_path / "first.zip", first)), show_progress=False)
    ingest(after, source=str(write_zip(tmp_path / "grown.zip", grown)), show_progress=False)
    old = {row["sha256"]: row["split"] for row in read_manifest(before)}
    new = {row["sha256"]: row["split"] for row in read_manifest(after)}
    assert len(old) == 40
    assert len(new) == 80
    assert {sha: new[sha] for sha in old} == old


def test_another_seed_gives_another_split(tmp_path: Path, real_photos) -> None:
    archive = write_zip(tmp_path / "s.zip", kaggle_members(real_photos, 40))
    splits = []
    for seed in (1, 2):
        settings = Settings(data_dir=tmp_path / f"s{seed}", seed=seed)
        ingest(settings, source=str(archive), show_progress=False)
        splits.append([row["split"] for row in read_manifest(settings)])
    assert splits[0] != splits[1]


def test_reingest_replaces_the_store_and_leaves_no_staging(
    tmp_path: Path, settings: Settings, real_photos
) -> None:
    ingest(
        settings,
        source=str(write_zip(tmp_path / "a.zip", kaggle_members(real_photos, 6))),
        show_progress=False,
    )
    ingest(
        settings,
        source=str(write_zip(tmp_path / "b.zip", kaggle_members(real_photos, 2))),
        show_progress=False,
    )
    rows = read_manifest(settings)
    stored = sorted(p.relative_to(settings.data_dir).as_posix() for p in settings.data_dir.rglob("*.jpg"))
    assert stored == sorted(row["path"] for row in rows)
    assert len(rows) == 4
    assert sorted(p.name for p in settings.data_dir.iterdir()) == [
        "data_report.json",
        "images",
        "manifest.csv",
    ]


def test_new_near_duplicate_joins_its_groups_split_never_straddles(tmp_path: Path, real_photos) -> None:
    """The documented limit of growth stability: leakage prevention wins over keeping a split."""
    import hashlib

    originals = {f"train/cat.{i}.jpg": real_photos["cat"][i] for i in range(30)}
    before = Settings(data_dir=tmp_path / "before")
    ingest(before, source=str(write_zip(tmp_path / "a.zip", originals)), show_progress=False)
    added = {}
    for i in range(30):  # one re-encoded copy per photo: some hash lower than their original, some higher
        copy = _variant(real_photos["cat"][i])
        added[f"train/cat.copy{i}.jpg"] = copy
        assert hashlib.sha256(copy).hexdigest() != hashlib.sha256(real_photos["cat"][i]).hexdigest()
    after = Settings(data_dir=tmp_path / "after")
    report = ingest(
        after, source=str(write_zip(tmp_path / "b.zip", originals | added)), show_progress=False
    ).report
    split_of = {row["sha256"]: row["split"] for row in read_manifest(after)}
    old = {row["sha256"]: row["split"] for row in read_manifest(before)}
    assert len(report["near_duplicate_groups"]) >= 25
    for group in report["near_duplicate_groups"]:
        assert len({split_of[sha] for sha in group["sha256"]}) == 1
    moved = [sha for sha in old if split_of[sha] != old[sha]]
    for sha in moved:  # an old image moves only with a new look-alike whose hash is smaller
        (group,) = [g["sha256"] for g in report["near_duplicate_groups"] if sha in g["sha256"]]
        assert min(group) not in old
