"""Fixtures for data tests: a few real photos from the dataset archive."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import dataset_photos


@pytest.fixture(scope="session")
def real_photos(dataset_zip: Path) -> dict[str, list[bytes]]:
    """The first 40 ordinary cat and 40 dog JPEGs of the real archive (whatever its layout)."""
    return {label: dataset_photos(dataset_zip, label, 40) for label in ("cat", "dog")}
