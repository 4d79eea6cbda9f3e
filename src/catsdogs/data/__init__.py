"""Data ingest: sources, validation, de-duplication, reproducible split, manifest and report.

Only :mod:`catsdogs.preprocessing`, Pillow, imagehash, requests and tqdm are imported here, never
torch: see ``docs/architecture.md``.
"""

from catsdogs.data.ingest import IngestResult, ingest
from catsdogs.data.labelled import UnsafeSourceError

__all__ = ["IngestResult", "UnsafeSourceError", "ingest"]
