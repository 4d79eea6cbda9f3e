"""The serving image, built for real from docker/serve.Dockerfile and run as a hardened container."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from catsdogs.bundle import SAMPLES
from support import dataset_photos, free_port

from .conftest import MEASUREMENTS, REPO, Container, podman, wait_for_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_IMAGE_BYTES = 500_000_000


def test_serve_extra_resolves_without_torch(tmp_path: Path) -> None:
    """What pip would install for `.[serve]` on an empty machine contains no torch."""
    report = tmp_path / "report.json"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
            "--report", str(report), f"{REPO}[serve]",
        ],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    names = {
        re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()  # PEP 503 normalized
        for item in json.loads(report.read_text())["install"]
    }
    assert {"catsdogs", "onnxruntime", "fastapi", "uvicorn", "prometheus-client"} <= names
    assert not {name for name in names if name == "torch" or name.startswith(("torch-", "nvidia-"))}


def test_serving_image_is_under_500_mb(serve_image: str) -> None:
    size = int(podman("image", "inspect", "--format", "{{.Size}}", serve_image).stdout.strip())
    MEASUREMENTS["serving image size"] = f"{size / 1e6:.0f} MB ({size} bytes)"
    assert size < MAX_IMAGE_BYTES


def test_serving_image_cannot_import_torch(serve_image: str) -> None:
    done = podman("run", "--rm", "--entrypoint", "python", serve_image, "-c", "import torch", check=False)
    assert done.returncode == 1
    assert "No module named 'torch'" in done.stderr


def test_serving_image_has_the_serving_stack(serve_image: str) -> None:
    code = "import onnxruntime, fastapi, uvicorn, prometheus_client, psycopg, catsdogs.bundle; print('ok')"
    done = podman(
        "run", "--rm", "--read-only", "--entrypoint", "python", serve_image, "-c", code, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_serving_image_runs_as_non_root_with_a_health_check(serve_image: str) -> None:
    (image,) = json.loads(podman("image", "inspect", serve_image).stdout)
    assert image["Config"]["User"] == "10001:10001"
    assert "8000/tcp" in image["Config"]["ExposedPorts"]
    # Kept only in the Docker image format (`--format docker`); OCI images drop HEALTHCHECK.
    healthcheck = image.get("Healthcheck") or image["Config"].get("Healthcheck")
    assert "/health" in " ".join(healthcheck["Test"])
    done = podman("run", "--rm", "--entrypoint", "id", serve_image, "-u", check=False)
    assert done.stdout.strip() == "10001"


def test_root_filesystem_can_be_read_only(serve_image: str) -> None:
    """With --read-only, only /tmp (tmpfs) is writable, and that is where the settings point."""
    script = (
        "import os, pathlib; pathlib.Path(os.environ['CATSDOGS_CACHE_DIR']).mkdir(parents=True); "
        "pathlib.Path('/app/x').write_text('x')"
    )
    done = podman(
        "run", "--rm", "--read-only", "--user", "10001", "--cap-drop=ALL",
        "--entrypoint", "python", serve_image, "-c", script,
        check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Read-only file system" in done.stderr, done.stderr


def test_container_serves_and_passes_the_smoke_test(serve_container: Container, tiny_bundle: Path) -> None:
    """Non-root, read-only root, no capabilities, model mounted read-only: /health, /ready, /metrics
    answer, predictions need the key from the mounted secret file, and `catsdogs smoke` passes."""
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{serve_container.url}{path}", timeout=5).status_code == 200
    sample = (tiny_bundle / SAMPLES / "cat.0.jpg").read_bytes()
    files = {"file": ("cat.jpg", sample)}
    assert httpx.post(f"{serve_container.url}/predict", files=files, timeout=10).status_code == 401
    done = subprocess.run(
        [sys.executable, "-m", "catsdogs", "smoke", "--url", serve_container.url],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO / "src"),
            "CATSDOGS_SMOKE_API_KEY": serve_container.api_key,
        },
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_container_without_api_keys_refuses_to_start_in_one_line(serve_image: str, tiny_bundle: Path) -> None:
    """The image binds 0.0.0.0: without keys (or CATSDOGS_ALLOW_ANONYMOUS=true) it exits at once."""
    done = podman(
        # --no-healthcheck: without systemd, podman itself would print lines about the timer.
        "run", "--rm", "--no-healthcheck", "--read-only", "--user", "10001:10001", "--cap-drop=ALL",
        "--volume", f"{tiny_bundle}:/models/bundle:ro", "--env", "CATSDOGS_MODEL_URI=/models/bundle",
        serve_image,
        check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: refusing to serve 0.0.0.0 without API keys")


def test_serving_image_has_the_sleep_that_pre_stop_runs(serve_image: str) -> None:
    done = podman("run", "--rm", "--read-only", "--entrypoint", "sleep", serve_image, "0", check=False)
    assert done.returncode == 0, done.stderr


def test_container_health_check_reports_healthy(serve_container: Container) -> None:
    """The image's HEALTHCHECK passes on a healthy container (within its 3 retries, as the engine
    would count them: a start-up of Python can exceed the timeout on a loaded 2-core machine)."""
    attempts = [podman("healthcheck", "run", serve_container.name, check=False) for _ in range(3)]
    assert any(done.returncode == 0 for done in attempts), [a.stdout + a.stderr for a in attempts]


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory, dataset_zip: Path) -> Path:
    """A bundle exactly as `catsdogs train` writes it (a small head model), left as written: no
    chmod, umask 022 like a user's shell."""
    root = tmp_path_factory.mktemp("trained")
    archive = root / "photos.zip"
    with zipfile.ZipFile(archive, "w") as dst:
        for label in ("cat", "dog"):
            for i, data in enumerate(dataset_photos(dataset_zip, label, 30)):
                dst.writestr(f"train/{label}.{i}.jpg", data)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CATSDOGS_DATA_DIR": str(root / "data")}
    common = {"env": env, "capture_output": True, "text": True, "timeout": 600, "preexec_fn": _user_umask}
    ingest = subprocess.run(
        [sys.executable, "-m", "catsdogs", "data", "ingest", "--source", str(archive)], **common
    )
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    train = subprocess.run(
        [sys.executable, "-m", "catsdogs", "train", "--model", "efficientnet_lite0", "--strategy", "head",
         "--image-size", "128", "--epochs", "2", "--no-track", "--run-name", "image-test",
         "--runs-dir", str(root / "runs"), "--cache-dir", str(root / "cache")],
        **common,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-2000:]
    return root / "runs" / "image-test" / "bundle"


def _user_umask() -> None:
    os.umask(0o022)


def test_container_serves_a_bundle_catsdogs_train_just_wrote(
    serve_image: str, trained_bundle: Path, tmp_path: Path
) -> None:
    """Non-root (uid 10001), the bundle mounted read-only as training left it: ready, and answers."""
    name = f"catsdogs-trained-{os.getpid()}"
    port = free_port()
    keys = tmp_path / "api_keys"
    keys.write_text("trained-bundle-key\n")
    keys.chmod(0o644)
    podman(
        "run", "--detach", "--name", name, "--read-only", "--user", "10001:10001", "--cap-drop=ALL",
        "--publish", f"127.0.0.1:{port}:8000",
        "--volume", f"{trained_bundle}:/models/bundle:ro", "--volume", f"{keys}:/run/secrets/api_keys:ro",
        "--env", "CATSDOGS_MODEL_URI=/models/bundle", "--env", "CATSDOGS_API_KEYS_FILE=/run/secrets/api_keys",
        serve_image,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for_http(f"{url}/ready", timeout_s=120)
        except AssertionError as exc:
            logs = podman("logs", name, check=False)
            raise AssertionError(
                f"{exc}; container logs:\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}"
            ) from None
        sample = next((trained_bundle / SAMPLES).glob("cat.*"))
        answer = httpx.post(
            f"{url}/predict",
            files={"file": ("cat.jpg", sample.read_bytes())},
            headers={"X-API-Key": "trained-bundle-key"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["label"] in ("cat", "dog")
    finally:
        podman("rm", "--force", "--time", "5", name, check=False)
