"""Batch results as CSV or JSON lines, streamed into a temporary file and renamed at the end
(:func:`catsdogs.files.atomic_path`): a reader finds the previous file or the complete new one,
and a job that fails half-way leaves no partial output."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from catsdogs import CatsdogsError
from catsdogs.files import atomic_path

Format = Literal["csv", "jsonl"]
FORMATS: dict[str, Format] = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def format_for(path: Path, given: str | None = None) -> Format:
    """The output format: as given, else by the file's suffix."""
    if given in ("csv", "jsonl"):
        return given  # type: ignore[return-value]
    found = FORMATS.get(path.suffix.lower())
    if given is not None or found is None:
        raise CatsdogsError(
            f"cannot tell the output format of {path}: name it .csv or .jsonl, or use --format"
        )
    return found


def csv_columns(class_names: Sequence[str]) -> list[str]:
    return [
        "path",
        "label",
        "predicted",
        "confidence",
        *(f"p_{n}" for n in class_names),
        "ood_score",
        "unknown_reason",
        "model_version",
        "error",
    ]


def _csv_row(row: dict[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    probs = row["probabilities"]
    flat = {k: v for k, v in row.items() if k != "probabilities"}
    blanks = {key: "" for key in ("confidence", "ood_score", "unknown_reason") if row.get(key) is None}
    return {**flat, **{f"p_{n}": probs.get(n, "") for n in class_names}, **blanks}


@contextmanager
def open_writer(
    path: Path, fmt: Format, class_names: Sequence[str]
) -> Iterator[Callable[[list[dict[str, Any]]], None]]:
    """A function that appends rows; the file appears at ``path`` only when the block succeeds."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as handle:
        if fmt == "csv":
            writer = csv.DictWriter(handle, fieldnames=csv_columns(class_names))
            writer.writeheader()

            def write(rows: list[dict[str, Any]]) -> None:
                writer.writerows(_csv_row(row, class_names) for row in rows)

        else:

            def write(rows: list[dict[str, Any]]) -> None:
                handle.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)

        yield write
