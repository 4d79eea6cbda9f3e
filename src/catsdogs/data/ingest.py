"""``catsdogs data ingest``: source → validated, de-duplicated, split data set on disk.

Steps: resolve the source (a URL is fetched: :mod:`catsdogs.data.fetch`) → check every member
(unsafe archives are refused before anything is written) → validate, hash and store each image
in a process pool → group exact and near-duplicates → drop groups whose images carry both labels
→ assign splits → write ``manifest.csv`` and ``data_report.json``.

Everything is built in a staging folder inside ``data_dir`` and swapped in at the end, so a
failed or interrupted run leaves the previous data set untouched, and re-running is safe.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from catsdogs import CatsdogsError
from catsdogs.data import validate
from catsdogs.data.dedup import near_duplicate_groups
from catsdogs.data.download import is_url
from catsdogs.data.feedback import place_feedback
from catsdogs.data.fetch import fetch_archive
from catsdogs.data.sources import Member, Source, open_source
from catsdogs.data.split import SPLITS, assign_splits, draw
from catsdogs.data.validate import Accepted, Rejected, StoreConfig
from catsdogs.files import exclusive_lock, replace_folder, write_text_atomic
from catsdogs.runtime import available_cores
from catsdogs.settings import Settings

_logger = logging.getLogger(__name__)
MANIFEST_COLUMNS = ("path", "label", "sha256", "phash", "width", "height", "split")
#: Below this many files a pool costs more than it saves.
MIN_FILES_FOR_POOL = 200


@dataclass(frozen=True)
class IngestResult:
    """What an ingest produced; ``report`` is the content of ``data_report.json``."""

    manifest_path: Path
    report_path: Path
    report: dict[str, Any]
    seconds: float


def resolve_source(source: str, settings: Settings) -> Path:
    """Local path of the source; a URL goes through :func:`fetch_archive` (downloaded once, verified)."""
    if is_url(source):
        return fetch_archive(settings.model_copy(update={"data_source": source}))
    return Path(source).expanduser()


def sample_members(source: Source, *, per_class: int, seed: int) -> Source:
    """A balanced sample of ``source``: at most ``per_class`` members of each label, picked by a
    seeded hash of their names, so the same archive and seed always give the same sample (a
    quick demo or test needs a few hundred photos, not 25,000). Unlabelled members are left out."""
    by_label: dict[str, list[Member]] = defaultdict(list)
    for member in source.members:
        if member.label is not None:
            by_label[member.label].append(member)
    chosen = [
        member
        for label, members in by_label.items()
        for member in sorted(members, key=lambda m: draw(seed, label, m.name))[:per_class]
    ]
    return replace(source, members=tuple(sorted(chosen, key=lambda m: m.name)))


def _process_all(
    source: Source, config: StoreConfig, *, workers: int, show_progress: bool
) -> Iterator[Accepted | Rejected]:
    """Run :func:`validate.process_task` on every member, in a pool when it pays off.

    Only (name, label, size) tuples go to the workers; each worker opens the archive once and
    reads its own members, so neither the archive nor a queue of image bytes is ever in memory.
    """
    tasks = [(m.name, m.label, m.size) for m in source.members]
    bar = tqdm(total=len(tasks), unit="img", desc="ingest", disable=not show_progress)
    initargs = (source.path, source.kind, config)
    try:
        if workers <= 1 or len(tasks) < MIN_FILES_FOR_POOL:
            validate.init_worker(*initargs)
            for task in tasks:
                bar.update()
                yield validate.process_task(task)
            return
        # fork: workers start in milliseconds with the parent's imports and sys.path (spawn and
        # forkserver re-import from the installed package, which need not be this source tree).
        # The workers run only decoding/hashing code: no locks or threads they could inherit stuck.
        context = multiprocessing.get_context("fork")
        # ProcessPoolExecutor, not Pool: a worker killed by a decoder crash or the OOM killer
        # raises BrokenProcessPool here instead of hanging forever.
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=validate.init_worker, initargs=initargs
        ) as pool:
            for result in pool.map(validate.process_task, tasks, chunksize=64):
                bar.update()
                yield result
    except BrokenProcessPool as exc:
        raise CatsdogsError(
            f"an ingest worker died ({exc}); retry with --workers 1 to find the file that crashes it"
        ) from None
    finally:
        bar.close()
        validate.close_worker()


def manifest_text(rows: list[dict[str, Any]]) -> str:
    """CSV text of manifest rows sorted by sha256, ``\\n`` line ends: byte-identical for equal input."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda row: row["sha256"]))
    return buffer.getvalue()


def _split_conflicts(
    groups: list[list[str]], by_sha: dict[str, list[Accepted]]
) -> tuple[list[dict[str, Any]], list[tuple[str, list[str]]]]:
    """Duplicate groups whose images carry more than one label (reported, dropped), and the
    ``(label, group)`` pairs of the others (kept)."""
    conflicts, kept = [], []
    for group in groups:
        labels = sorted({item.label for sha in group for item in by_sha[sha]})
        if len(labels) > 1:
            images = [
                {"sha256": sha, "label": item.label, "source": item.source}
                for sha in group
                for item in by_sha[sha]
            ]
            conflicts.append({"labels": labels, "images": images})
        else:
            kept.append((labels[0], group))
    return conflicts, kept


def _manifest_rows(
    kept: list[tuple[str, list[str]]], by_sha: dict[str, list[Accepted]], splits: dict[str, str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """One manifest row per distinct image (the first file of identical ones), with the report's
    exact-duplicate and near-duplicate sections."""
    rows, exact, near = [], [], []
    for label, group in kept:
        if len(group) > 1:
            near.append({"label": label, "split": splits[group[0]], "sha256": group})
        for sha in group:
            first, *others = by_sha[sha]
            if others:
                removed = [o.source for o in others]
                exact.append({"sha256": sha, "label": label, "kept": first.source, "removed": removed})
            rows.append(
                {
                    "path": f"images/{label}/{sha}.jpg",
                    "label": label,
                    "sha256": sha,
                    "phash": first.phash,
                    "width": first.width,
                    "height": first.height,
                    "split": splits[sha],
                }
            )
    return rows, exact, near


def _organize(accepted: list[Accepted], settings: Settings) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Exact/near-duplicate groups, label conflicts and splits → manifest rows and report sections."""
    by_sha: dict[str, list[Accepted]] = defaultdict(list)
    for item in sorted(accepted, key=lambda a: (a.sha256, a.source)):
        by_sha[item.sha256].append(item)
    groups = near_duplicate_groups(
        {sha: items[0].phash for sha, items in by_sha.items()}, max_distance=settings.near_duplicate_distance
    )
    conflicts, kept = _split_conflicts(groups, by_sha)
    splits = assign_splits(kept, seed=settings.seed, ratios=settings.split_ratios)
    rows, exact, near = _manifest_rows(kept, by_sha, splits)
    sections = {"exact_duplicates": exact, "near_duplicate_groups": near, "conflicting_labels": conflicts}
    return rows, sections


def _report(
    *,
    requested: str,
    source: Source,
    settings: Settings,
    rows: list[dict[str, Any]],
    rejected: list[Rejected],
    accepted_count: int,
    sections: dict[str, Any],
    sample_per_class: int | None,
) -> dict[str, Any]:
    per_class = {c: {s: 0 for s in (*SPLITS, "total")} for c in settings.classes}
    for row in rows:
        per_class[row["label"]][row["split"]] += 1
        per_class[row["label"]]["total"] += 1
    per_split = {s: sum(per_class[c][s] for c in settings.classes) for s in SPLITS}
    conflicts = sections["conflicting_labels"]
    return {
        "source": requested,
        "layout": source.layout,
        "sample_per_class": sample_per_class,
        "seed": settings.seed,
        "split_ratios": list(settings.split_ratios),
        "near_duplicate_distance": settings.near_duplicate_distance,
        "counts": {
            "files": len(source.members),
            "accepted": accepted_count,
            "rejected": len(rejected),
            "exact_duplicates_removed": sum(len(e["removed"]) for e in sections["exact_duplicates"]),
            "near_duplicate_groups": len(sections["near_duplicate_groups"]),
            "conflicting_label_groups": len(conflicts),
            "conflicting_images_excluded": sum(len(c["images"]) for c in conflicts),
            "manifest_rows": len(rows),
        },
        "per_class": per_class,
        "per_split": per_split,
        "rejections_by_reason": dict(sorted(Counter(r.reason for r in rejected).items())),
        "rejections": [
            {"source": r.source, "label": r.label, "reason": r.reason, "detail": r.detail}
            for r in sorted(rejected, key=lambda r: r.source)
        ],
        **sections,
    }


def _swap_in(staging: Path, data_dir: Path) -> None:
    """Replace the store, then the manifest and report, by the staged ones (each swap is atomic:
    :func:`replace_folder`). Image names are content hashes, so the store never holds another
    image under a name the manifest lists."""
    replace_folder(staging / "images", data_dir / "images")
    for name in ("manifest.csv", "data_report.json"):
        (staging / name).replace(data_dir / name)


def _remove_leftovers(data_dir: Path) -> None:
    """Delete staging folders of an interrupted earlier run (one ingest per data_dir at a time)."""
    patterns = (".ingest-*", ".old-images-*", ".images.old-*")
    for leftover in [path for pattern in patterns for path in data_dir.glob(pattern)]:
        _logger.warning("removing %s left by an interrupted ingest", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _store_images(
    source: Source, images_dir: Path, settings: Settings, *, show_progress: bool
) -> tuple[list[Accepted], list[Rejected]]:
    """Validate, hash and store every member of ``source`` under ``images_dir/<label>/``."""
    config = StoreConfig(
        images_dir=images_dir,
        max_pixels=settings.max_image_pixels,
        min_side=settings.min_image_side,
        store_max_side=settings.store_max_side,
        max_bytes=settings.max_image_bytes,
    )
    for label in settings.classes:
        (images_dir / label).mkdir(parents=True, exist_ok=True)
    accepted: list[Accepted] = []
    rejected: list[Rejected] = []
    workers = settings.ingest_workers or available_cores()
    for result in _process_all(source, config, workers=workers, show_progress=show_progress):
        (accepted if isinstance(result, Accepted) else rejected).append(result)
    return accepted, rejected


def _add_feedback(
    folder: Path | None, images_dir: Path, rows: list[dict[str, Any]], settings: Settings
) -> dict[str, Any] | None:
    """Store the images of a feedback folder beside the data set's and append the rows of those that
    may join it (:func:`~catsdogs.data.feedback.place_feedback`); the report's ``feedback`` section."""
    if folder is None:
        return None
    report: dict[str, Any] = {"folder": str(folder), "files": 0, "added": 0, "excluded": [], "rejected": []}
    if not any(path.is_file() for path in folder.rglob("*")):
        return report
    source = open_source(folder, classes=settings.classes)
    accepted, rejected = _store_images(source, images_dir, settings, show_progress=False)
    added, excluded = place_feedback(rows, accepted, max_distance=settings.near_duplicate_distance)
    kept = {(row["sha256"], row["label"]) for row in (*rows, *added)}
    for item in accepted:  # only the files of images the manifest lists stay in the store
        if (item.sha256, item.label) not in kept:
            (images_dir / item.label / f"{item.sha256}.jpg").unlink(missing_ok=True)
    rows.extend(added)
    report.update(
        files=len(source.members),
        added=len(added),
        excluded=excluded,
        rejected=[{"source": r.source, "reason": r.reason} for r in rejected],
    )
    return report


def ingest(
    settings: Settings,
    *,
    source: str | None = None,
    show_progress: bool = True,
    per_class: int | None = None,
    feedback: Path | None = None,
) -> IngestResult:
    """Build the data set in ``settings.data_dir`` from ``source`` (default ``settings.data_source``);
    with ``per_class``, from a balanced sample of that many files per class (:func:`sample_members`);
    with ``feedback``, plus that folder of labelled feedback images (``export_feedback``), placed so
    that no image of ``source`` changes split.

    Raises:
        UnsafeSourceError: the archive or folder holds an escaping member; nothing was written.
        CatsdogsError: the source is missing, unreadable, or its download failed.
    """
    started = time.perf_counter()
    requested = source or settings.data_source
    local = open_source(resolve_source(requested, settings), classes=settings.classes)
    if per_class is not None:
        local = sample_members(local, per_class=per_class, seed=settings.seed)
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(data_dir, what=f"an ingest into {data_dir}"):
        _remove_leftovers(data_dir)
        staging = Path(tempfile.mkdtemp(prefix=".ingest-", dir=data_dir))
        try:
            images_dir = staging / "images"
            accepted, rejected = _store_images(local, images_dir, settings, show_progress=show_progress)
            rows, sections = _organize(accepted, settings)
            for conflict in sections["conflicting_labels"]:
                for image in conflict["images"]:
                    (images_dir / image["label"] / f"{image['sha256']}.jpg").unlink(missing_ok=True)
            feedback_section = _add_feedback(feedback, images_dir, rows, settings)
            if feedback_section is not None:
                sections["feedback"] = feedback_section
            report = _report(
                requested=requested,
                source=local,
                settings=settings,
                rows=rows,
                rejected=rejected,
                accepted_count=len(accepted),
                sections=sections,
                sample_per_class=per_class,
            )
            write_text_atomic(staging / "manifest.csv", manifest_text(rows))
            write_text_atomic(
                staging / "data_report.json", json.dumps(report, indent=2, sort_keys=True) + "\n"
            )
            _swap_in(staging, data_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started
    _logger.info("ingested %d files in %.1f s", len(local.members), seconds)
    return IngestResult(settings.manifest_path, settings.report_path, report, seconds)
