"""Fixtures for data tests: a few real photos from the Kaggle archive."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def real_photos(dataset_zip: Path) -> dict[str, list[bytes]]:
    """The first 40 cat and 40 dog JPEGs of the real archive (200×200, baseline RGB)."""
    photos: dict[str, list[bytes]] = {"cat": [], "dog": []}
    with zipfile.ZipFile(dataset_zip) as archive:
        for label in photos:
            names = [f"train/{label}.{i}.jpg" for i in range(40)]
            photos[label] = [archive.read(name) for name in names]
    return photos
