"""``catsdogs data fetch`` and ``data ingest``: build the data set."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from catsdogs.cli.common import console
from catsdogs.settings import get_settings

if TYPE_CHECKING:
    from catsdogs.data import IngestResult
    from catsdogs.data.feedback import ExportResult

app = typer.Typer(help="Ingest, validate, de-duplicate and split datasets.", no_args_is_help=True)


@app.command("fetch")
def data_fetch(
    source: Annotated[
        str | None,
        typer.Option("--source", help="Zip, folder or http(s) URL (default: settings data_source)."),
    ] = None,
    sha256: Annotated[
        str | None, typer.Option("--sha256", help="Expected SHA-256 (default: CATSDOGS_DATA_SHA256).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Also put the archive here (the DVC fetch stage's output)."),
    ] = None,
    allow_unverified: Annotated[
        bool, typer.Option("--allow-unverified", help="Download a URL that has no known SHA-256.")
    ] = False,
) -> None:
    """Download the data source once into the cache (verified), or check a local one; print its path."""
    from catsdogs.data.download import is_url
    from catsdogs.data.fetch import fetch_archive, place

    settings = get_settings(data_source=source, data_sha256=sha256)
    path = fetch_archive(settings, allow_unverified=allow_unverified)
    typer.echo(place(path, out, link=is_url(settings.data_source)) if out is not None else path)


@app.command("ingest")
def data_ingest(
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            help="Zip, folder or http(s) URL (default: settings data_source / CATSDOGS_DATA_SOURCE).",
        ),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Output folder (default: data).")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Split seed (default: params.yaml).")] = None,
    sha256: Annotated[
        str | None, typer.Option("--sha256", help="Expected SHA-256 of a downloaded archive.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Decoding processes (default: one per core).")
    ] = None,
    feedback: Annotated[
        bool,
        typer.Option(
            "--feedback",
            help="Export the feedback store's images into data_dir/feedback first, then add them.",
        ),
    ] = False,
    feedback_dir: Annotated[
        Path | None,
        typer.Option("--feedback-dir", help="Add this folder of labelled feedback images (class folders)."),
    ] = None,
) -> None:
    """Validate, de-duplicate and split a data set into data_dir (images/, manifest.csv, data_report.json)."""
    from catsdogs.data import ingest
    from catsdogs.data.feedback import FEEDBACK_FOLDER, export_feedback

    settings = get_settings(
        data_source=source, data_dir=data_dir, seed=seed, data_sha256=sha256, ingest_workers=workers
    )
    if feedback:
        feedback_dir = feedback_dir or settings.data_dir / FEEDBACK_FOLDER
        _print_export(export_feedback(settings, feedback_dir))
    _print_report(ingest(settings, feedback=feedback_dir))


@app.command("feedback")
def data_feedback(
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder of feedback images (default: data_dir/feedback).")
    ] = None,
) -> None:
    """Copy the images kept with /feedback labels into a folder of class folders (the DVC feedback stage)."""
    from catsdogs.data.feedback import FEEDBACK_FOLDER, export_feedback

    settings = get_settings()
    _print_export(export_feedback(settings, out or settings.data_dir / FEEDBACK_FOLDER))


def _print_export(result: ExportResult) -> None:
    added = ", ".join(f"{label} {count}" for label, count in result.added.items())
    console.print(
        f"{sum(result.added.values())} new feedback images in {result.folder} ({added}) "
        f"of {result.seen} kept in the feedback store",
        highlight=False,
    )


def _print_report(result: IngestResult) -> None:
    from rich.table import Table

    report = result.report
    table = Table(title=f"{report['counts']['manifest_rows']} images in {result.manifest_path}")
    table.add_column("class")
    for split in ("train", "val", "test", "total"):
        table.add_column(split, justify="right")
    for label, counts in report["per_class"].items():
        table.add_row(label, *(str(counts[s]) for s in ("train", "val", "test", "total")))
    console.print(table)
    counts = report["counts"]
    rejected = ", ".join(f"{k}={v}" for k, v in report["rejections_by_reason"].items()) or "none"
    if "feedback" in report:
        section = report["feedback"]
        console.print(
            f"feedback: {section['added']} of {section['files']} images added to train, "
            f"{len(section['excluded'])} excluded, {len(section['rejected'])} rejected",
            highlight=False,
        )
    console.print(
        f"{counts['files']} files, {counts['accepted']} valid, {counts['rejected']} rejected ({rejected}); "
        f"{counts['exact_duplicates_removed']} exact duplicates removed, "
        f"{counts['near_duplicate_groups']} near-duplicate groups, "
        f"{counts['conflicting_images_excluded']} images with conflicting labels excluded; "
        f"{counts['files'] / max(result.seconds, 1e-9):.0f} files/s. Report: {result.report_path}",
        highlight=False,
    )
