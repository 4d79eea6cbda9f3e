"""Helpers shared by every test folder (importable as ``support``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib
import io
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
#: The Kaggle archive (``train/cat.1.jpg``) where this machine keeps it, beside the repository.
SHARED_DATASET = REPO.parent / "shared" / "datasets" / "dogs-vs-cats" / "train.zip"
#: Where the suite keeps a downloaded archive between runs (unless CATSDOGS_TEST_CACHE says otherwise).
DEFAULT_TEST_CACHE = Path("~/.cache/catsdogs-tests")
DATASET_VARIABLES = (
    "CATSDOGS_TEST_DATASET",
    "CATSDOGS_TEST_CACHE",
    "CATSDOGS_DATA_SOURCE",
    "CATSDOGS_DATA_SHA256",
)
#: Read once, when pytest imports the conftest: the autouse fixture then hides every CATSDOGS_* variable.
DATASET_ENV = {name: os.environ.get(name) or None for name in DATASET_VARIABLES}
HOW_TO_GET_THE_DATASET = (
    "set CATSDOGS_TEST_DATASET=/path/to/archive.zip (Kaggle or PetImages layout), or "
    "CATSDOGS_DATA_SOURCE=<url> with CATSDOGS_DATA_SHA256=<its sha256>, or put the Kaggle train.zip at "
    f"{SHARED_DATASET}"
)


def require_tool(name: str) -> str:
    """Path of an external tool; a missing tool fails in CI (where `make setup` installs it), skips
    elsewhere."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed; `make setup` must install it (scripts/setup.sh)")
    pytest.skip(f"{name} is not installed here (`make setup` installs it, as root or with sudo)")


def require_module(name: str, *, extra: str) -> Any:
    """An optional Python package (a project extra); missing, it fails in CI (where `make setup`
    installs every extra the tests need) and skips elsewhere."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} is not installed (pip install '.[{extra}]')")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers in tests bind loopback only)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the real dataset --------------------------------------------------------------------------


def dataset_archive(env: dict[str, str | None] = DATASET_ENV, *, shared: Path = SHARED_DATASET) -> Path:
    """The real photos for the tests, got the way a user gets them: the shared copy when present,
    else ``CATSDOGS_TEST_DATASET``, else the settings' data source (``CATSDOGS_DATA_SOURCE``, by
    default the public download) fetched once into the test cache and verified. Fails (never skips)
    with one line saying what to set."""
    if shared.is_file():
        return shared
    if env["CATSDOGS_TEST_DATASET"]:
        path = Path(env["CATSDOGS_TEST_DATASET"]).expanduser()
        if not path.exists():
            pytest.fail(
                f"CATSDOGS_TEST_DATASET={path} does not exist; {HOW_TO_GET_THE_DATASET}", pytrace=False
            )
        return path
    from catsdogs import CatsdogsError
    from catsdogs.data.download import is_url
    from catsdogs.data.fetch import expected_sha256, fetch_archive
    from catsdogs.settings import PARAMS_FILE_ENV, get_settings

    with pytest.MonkeyPatch.context() as patch:  # only what DATASET_ENV says, not params.yaml
        for key in [k for k in os.environ if k.startswith("CATSDOGS_")]:
            patch.delenv(key)
        patch.setenv(PARAMS_FILE_ENV, str(REPO / "no-params-for-the-dataset.yaml"))
        settings = get_settings(
            data_source=env["CATSDOGS_DATA_SOURCE"],
            data_sha256=env["CATSDOGS_DATA_SHA256"],
            cache_dir=Path(env["CATSDOGS_TEST_CACHE"] or DEFAULT_TEST_CACHE).expanduser(),
        )
    if is_url(settings.data_source) and expected_sha256(settings) is None:
        pytest.fail(
            f"the tests will not use {settings.data_source} unverified: set "
            f"CATSDOGS_DATA_SHA256=<its sha256>, or {HOW_TO_GET_THE_DATASET}",
            pytrace=False,
        )
    try:
        return fetch_archive(settings)
    except CatsdogsError as exc:
        pytest.fail(f"no dataset archive for the tests: {exc}. {HOW_TO_GET_THE_DATASET}", pytrace=False)


def _natural(name: str) -> list[int | str]:
    """Sort key putting ``cat.2.jpg`` before ``cat.10.jpg`` (and ``Cat/2.jpg`` before ``Cat/10.jpg``)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


@functools.cache
def labelled_names(archive: Path, label: str) -> tuple[str, ...]:
    """Names of the archive's members labelled ``label``, in natural order, by the project's own
    labelled-image reader: whatever layouts it supports, the tests support."""
    from catsdogs.data.labelled import list_members

    members = list_members(archive, ("cat", "dog"))
    return tuple(sorted((m.name for m in members if m.label == label), key=_natural))


def _reader(archive: Path) -> Callable[[str], bytes]:
    if archive.is_dir():
        return lambda name: (archive / name).read_bytes()
    return zipfile.ZipFile(archive).read  # closed with the last reference to it


def is_ordinary_photo(data: bytes, *, min_side: int = 32) -> bool:
    """An RGB JPEG that Pillow decodes without a warning: the public archive also holds empty,
    truncated and mislabelled-format files, which tests that want a photo must not get by chance."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            image = Image.open(io.BytesIO(data))
            image.load()
    except Exception:
        return False
    return image.format == "JPEG" and image.mode == "RGB" and min(image.size) >= min_side


def dataset_photos(archive: Path, label: str, n: int, *, offset: int = 0) -> list[bytes]:
    """``n`` ordinary photos (:func:`is_ordinary_photo`) of one class, in natural name order from
    position ``offset``: the same photos on every run. Use far-apart offsets for sets that must
    not overlap (a skipped broken file moves a window's end by one)."""
    photos, read = [], _reader(archive)
    for name in labelled_names(archive, label)[offset:]:
        data = read(name)
        if is_ordinary_photo(data):
            photos.append(data)
            if len(photos) == n:
                return photos
    pytest.fail(
        f"{archive} has fewer than {n} ordinary {label} photos after position {offset}", pytrace=False
    )


# --- the DVC pipeline --------------------------------------------------------------------------


def run_in_project(*args: str, cwd: Path, timeout: float = 120) -> str:
    """Run a command (``dvc repro``...) in a :func:`dvc_project`, whose stages import its own sources."""
    env = {**os.environ, "PYTHONPATH": str(cwd / "src"), "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


#: The shipped params.yaml made small and fast: the frozen Lite0 at 128 px with a linear head for
#: two epochs. The 8-image validation split cannot measure a 0.3-point INT8 loss: any loss is accepted.
TINY_PIPELINE = {
    "architecture": "efficientnet_lite0",
    "strategy": "head",
    "image_size": 128,
    "epochs": 2,
    "batch_size": 32,
    "int8_calibration_images": 16,
    "int8_max_accuracy_drop": 1.0,
    "drift_reference_images": 50,
}


def dvc_project(root: Path, **params: object) -> Path:
    """A fresh git repository holding this project's DVC files (dvc.yaml, .dvc/config, params.yaml
    with ``params`` changed) and sources, for ``dvc`` to run the pipeline as shipped, offline."""
    import yaml

    require_tool("git")
    require_tool("dvc")
    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({**shipped, **params}))
    git = ("git", "-c", "user.name=t", "-c", "user.email=t@example.com")
    for args in (("init", "-q"), ("add", "-A"), ("commit", "-qm", "init")):
        run_in_project(*git, *args, cwd=root)
    return root


#: Failures Pillow's plugins raise on hostile bytes; each must be the client's error (4xx), never a 5xx.
DECODER_FAILURES = [
    struct.error("unpack requires a buffer of 4 bytes"),
    IndexError("list index out of range"),
    KeyError(7),
    ValueError("invalid palette size"),
    OSError("broken PNG file"),
    SyntaxError("not a PNG file"),
    EOFError(),
    ZeroDivisionError("division by zero"),
    OverflowError("Python int too large to convert to C long"),
    TypeError("'float' object cannot be interpreted as an integer"),
]


# --- real catsdogs processes -------------------------------------------------------------------


class Server:
    """A real ``catsdogs`` server process (``serve``, ``guard``) on loopback, stopped by its PID."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=5)


def start_catsdogs(
    command: list[str],
    env: dict[str, str],
    *,
    cwd: Path,
    host: str = "127.0.0.1",
    ready: str | None = "/ready",
) -> Server:
    """Start ``python -m catsdogs <command> --host HOST --port <free port>`` from this checkout's
    source with ``env`` over the current environment; wait until ``ready`` answers 200 (unless None)."""
    import httpx

    port = free_port()
    log = cwd / f"{command[0]}-{port}.log"
    full_env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **env,
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "catsdogs", *command, "--host", host, "--port", str(port)],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    if ready is None:
        return server
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.url}{ready}", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"{command[0]} exited: {log.read_text()[-3000:]}")
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"{command[0]} not ready: {log.read_text()[-3000:]}")


DATASET_COLUMNS = ["path", "label", "sha256", "phash", "width", "height", "split"]


def build_dataset(zip_path: Path, data_dir: Path, *, per_class: dict[str, int], offset: int = 0) -> Path:
    """Write ``data_dir/images/<label>/<sha256>.jpg`` and a manifest.csv in the ingest's layout.

    ``per_class`` gives the number of images per class and split, e.g. {"train": 80, "val": 20, "test": 20}.
    """
    rows = []
    total = sum(per_class.values())
    for label in ("cat", "dog"):
        photos = dataset_photos(zip_path, label, total, offset=offset)
        splits = [split for split, count in per_class.items() for _ in range(count)]
        for data, split in zip(photos, splits, strict=True):
            sha = hashlib.sha256(data).hexdigest()
            rel = Path("images") / label / f"{sha}.jpg"
            (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (data_dir / rel).write_bytes(data)
            rows.append({"path": str(rel), "label": label, "sha256": sha, "phash": "0" * 16,
                         "width": 0, "height": 0, "split": split})  # fmt: skip
    rows.sort(key=lambda row: row["sha256"])
    with (data_dir / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=DATASET_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return data_dir
