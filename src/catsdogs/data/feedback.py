"""Feedback as training data: the images staff labelled through ``/feedback`` become a folder that
ingest adds to the data set.

``export_feedback`` copies the images the feedback store keeps (EXIF-stripped JPEGs, at most
``store_max_side``) into ``<out>/<label>/<sha256>.jpg``; the folder only grows, so it is the data
(versioned by DVC: the ``feedback`` stage), while the store keeps each image only for its retention
period. ``place_feedback`` then decides where each feedback image goes without moving any existing
image: to train, unless it is a near-duplicate of a validation or test image (it would leak) or
contradicts the label of an image the data set already holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from catsdogs.data.dedup import UnionFind, near_duplicate_pairs
from catsdogs.data.validate import Accepted
from catsdogs.feedback.store import FeedbackStore, store_url
from catsdogs.files import atomic_path
from catsdogs.settings import Settings

_logger = logging.getLogger(__name__)
#: The feedback images' folder inside the data folder (the DVC ``feedback`` stage's output).
FEEDBACK_FOLDER = "feedback"


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: ``added`` new files of ``seen`` kept images, per label."""

    folder: Path
    seen: int
    added: dict[str, int]


def export_feedback(settings: Settings, out: Path) -> ExportResult:
    """Copy the store's kept images into ``out`` (existing files are left as they are).

    A default store (SQLite in ``cache_dir``) that was never created holds nothing: it is not
    created here. Expired images are purged first, so an export never hands out what retention
    already ruled out.
    """
    for label in settings.classes:
        (out / label).mkdir(parents=True, exist_ok=True)
    added = dict.fromkeys(settings.classes, 0)
    store = FeedbackStore(store_url(settings))
    if store.sqlite_file is not None and not store.sqlite_file.exists():
        _logger.info("no feedback store at %s: no feedback images to export", store.sqlite_file)
        return ExportResult(out, 0, added)
    store.open()
    try:
        store.purge_images(older_than=timedelta(days=settings.feedback_image_retention_days))
        seen = 0
        for image in store.images():
            seen += 1
            if image.label not in added:
                _logger.warning("feedback image %d has unknown label %r; skipped", image.id, image.label)
                continue
            target = out / image.label / f"{image.sha256}.jpg"
            if not target.exists():
                with atomic_path(target) as tmp:
                    tmp.write_bytes(image.data)
                added[image.label] += 1
    finally:
        store.close()
    return ExportResult(out, seen, added)


def place_feedback(
    rows: list[dict[str, Any]], feedback: list[Accepted], *, max_distance: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Manifest rows for the feedback images that may join the data set (all in train), and the
    excluded ones with their reason. ``rows`` (the data set without feedback) is not changed.

    Reasons: ``already_in_data_set`` (the same image, same label), ``conflicting_label`` (the same or
    a near-duplicate image carries the other label, here or in other feedback),
    ``near_duplicate_of_evaluation_image`` (it looks like a validation or test image).
    """
    by_sha = {row["sha256"]: row for row in rows}
    labels: dict[str, set[str]] = {}
    first: dict[str, Accepted] = {}
    for item in sorted(feedback, key=lambda a: (a.sha256, a.source)):
        labels.setdefault(item.sha256, set()).add(item.label)
        first.setdefault(item.sha256, item)
    hashes = {sha: row["phash"] for sha, row in by_sha.items()} | {sha: a.phash for sha, a in first.items()}
    groups = UnionFind(hashes)
    for a, b in near_duplicate_pairs(hashes, max_distance=max_distance):
        groups.union(a, b)
    members: dict[str, list[str]] = {}
    for sha in hashes:
        members.setdefault(groups.find(sha), []).append(sha)
    added, excluded = [], []
    for sha, item in first.items():
        reason = _exclusion(sha, labels, by_sha, members[groups.find(sha)])
        if reason is not None:
            excluded.append({"sha256": sha, "label": item.label, "source": item.source, "reason": reason})
            continue
        added.append(
            {
                "path": f"images/{item.label}/{sha}.jpg",
                "label": item.label,
                "sha256": sha,
                "phash": item.phash,
                "width": item.width,
                "height": item.height,
                "split": "train",
            }
        )
    return added, excluded


def _exclusion(
    sha: str, labels: dict[str, set[str]], by_sha: dict[str, dict[str, Any]], group: list[str]
) -> str | None:
    """Why this feedback image stays out, or ``None`` to add it to train."""
    (label, *others) = sorted(labels[sha])
    group_labels = {by_sha[m]["label"] for m in group if m in by_sha} | {
        x for m in group if m in labels for x in labels[m]
    }
    if others or group_labels != {label}:
        return "conflicting_label"
    if sha in by_sha:
        return "already_in_data_set"
    if any(by_sha[m]["split"] != "train" for m in group if m in by_sha):
        return "near_duplicate_of_evaluation_image"
    return None
