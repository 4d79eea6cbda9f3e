"""Helpers shared by every test folder (importable as ``support``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATASET_ZIP = REPO.parent / "shared" / "datasets" / "dogs-vs-cats" / "train.zip"


def require_tool(name: str) -> str:
    """Path of an external tool; a missing tool fails in CI (where .ci/run installs it), skips elsewhere."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed; .ci/run must install it")
    pytest.skip(f"{name} is not installed here (CI installs it)")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers in tests bind loopback only)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
