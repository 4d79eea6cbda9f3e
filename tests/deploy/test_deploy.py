"""`catsdogs deploy`: render with an image, apply, wait, smoke-test, roll back on failure.

A fake `kubectl` on PATH records every call (and renders through the real kubectl's kustomize);
the smoke checks run over HTTP against real services on loopback.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from catsdogs import CatsdogsError
from catsdogs.deploy import (
    ImageRef,
    Kubectl,
    deploy_and_verify,
    render,
    rollback,
    run_smoke_command,
)

from .conftest import OVERLAYS, REPO, find

DIGEST = "sha256:" + "ab" * 32
IMAGE = f"ghcr.io/acme/catsdogs-serve@{DIGEST}"


def http_ready_smoke(url: str) -> None:
    """A smoke check over real HTTP: the service must be alive and ready."""
    for path in ("/health", "/ready"):
        response = httpx.get(f"{url}{path}", timeout=5)
        if response.status_code != 200:
            raise CatsdogsError(f"GET {path} answered {response.status_code}")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "catsdogs", *args], capture_output=True, text=True, env=env, timeout=300
    )


# --- image references -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("ghcr.io/acme/api:1.2.3", ImageRef("ghcr.io/acme/api", tag="1.2.3")),
        ("registry:5000/team/api", ImageRef("registry:5000/team/api")),
        ("registry:5000/team/api:dev", ImageRef("registry:5000/team/api", tag="dev")),
        (IMAGE, ImageRef("ghcr.io/acme/catsdogs-serve", digest=DIGEST)),
        (f"ghcr.io/acme/api:1.0@{DIGEST}", ImageRef("ghcr.io/acme/api", tag="1.0", digest=DIGEST)),
    ],
)
def test_image_references_are_split_into_name_tag_and_digest(image: str, expected: ImageRef) -> None:
    assert ImageRef.parse(image) == expected


@pytest.mark.parametrize("image", ["", "api:", "api@sha256:123", "api@md5:" + "a" * 64, "two words"])
def test_malformed_image_references_are_refused(image: str) -> None:
    with pytest.raises(CatsdogsError, match="invalid image"):
        ImageRef.parse(image)


# --- rendering ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_render_puts_the_digest_into_the_api_deployment_without_editing_the_overlay() -> None:
    overlay = OVERLAYS / "production"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in overlay.iterdir()}

    docs = [d for d in yaml.safe_load_all(render(overlay, IMAGE)) if d]

    api = find(docs, "Deployment", "catsdogs-api")
    assert api["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    cronjob = find(docs, "CronJob", "catsdogs-evaluate-deployed")
    assert cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE, (
        "the nightly evaluation runs the serving image too, so it moves with the API"
    )
    mlflow = find(docs, "Deployment", "catsdogs-mlflow")
    assert mlflow["spec"]["template"]["spec"]["containers"][0]["image"].startswith(
        "ghcr.io/catsdogs/catsdogs-mlflow@sha256:"
    ), "only the serving image is replaced"
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in overlay.iterdir()} == before


@pytest.mark.integration
def test_render_with_a_tag_on_the_local_overlay() -> None:
    docs = [d for d in yaml.safe_load_all(render(OVERLAYS / "local", "localhost/catsdogs-serve:pr-7")) if d]
    api = find(docs, "Deployment", "catsdogs-api")
    assert api["spec"]["template"]["spec"]["containers"][0]["image"] == "localhost/catsdogs-serve:pr-7"


def test_render_refuses_a_folder_that_is_not_an_overlay(tmp_path: Path) -> None:
    with pytest.raises(CatsdogsError, match="not a kustomize overlay"):
        render(tmp_path, IMAGE)


def test_a_missing_kubectl_is_reported_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(CatsdogsError, match="not installed or not on PATH"):
        render(OVERLAYS / "local", IMAGE, kubectl=Kubectl(str(tmp_path / "no-kubectl")))


# --- deploy, verify, roll back (library) ----------------------------------------------------------


@pytest.mark.integration
def test_successful_deployment_applies_waits_and_smoke_tests(fake_kubectl, ready_service: str) -> None:
    result = deploy_and_verify(
        OVERLAYS / "production", IMAGE, smoke_url=ready_service, smoke=http_ready_smoke
    )

    assert result.ok and result.smoke_passed and not result.rolled_back
    assert fake_kubectl.verbs == ["kustomize", "apply", "rollout status"]
    applied = [d for d in yaml.safe_load_all(fake_kubectl.calls[1]["stdin"]) if d]
    assert (
        find(applied, "Deployment", "catsdogs-api")["spec"]["template"]["spec"]["containers"][0]["image"]
        == IMAGE
    )
    status = fake_kubectl.calls[2]["args"]
    assert "deployment/catsdogs-api" in status and "catsdogs" in status


@pytest.mark.integration
def test_failing_smoke_test_rolls_the_deployment_back(fake_kubectl, unready_service: str) -> None:
    result = deploy_and_verify(
        OVERLAYS / "production", IMAGE, smoke_url=unready_service, smoke=http_ready_smoke
    )

    assert not result.ok
    assert result.rolled_back and result.smoke_passed is False
    assert "smoke failed" in result.error and "503" in result.error
    assert fake_kubectl.verbs == ["kustomize", "apply", "rollout status", "rollout undo", "rollout status"]


@pytest.mark.integration
def test_failed_rollout_is_rolled_back_without_smoke_testing(
    fake_kubectl, ready_service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ROLLOUT_FAILS", "1")
    smoked: list[str] = []

    result = deploy_and_verify(OVERLAYS / "production", IMAGE, smoke_url=ready_service, smoke=smoked.append)

    assert result.rolled_back and result.smoke_passed is None and smoked == []
    assert "progress deadline" in result.error
    assert fake_kubectl.verbs[-2:] == ["rollout undo", "rollout status"]


@pytest.mark.integration
def test_rollback_undoes_to_a_given_revision(fake_kubectl) -> None:
    rollback(namespace="catsdogs", to_revision=4)
    undo = fake_kubectl.calls[0]["args"]
    assert undo[:3] == ["rollout", "undo", "deployment/catsdogs-api"] and "--to-revision=4" in undo
    assert fake_kubectl.verbs == ["rollout undo", "rollout status"]


def test_smoke_command_failure_is_an_error_with_the_reason() -> None:
    # Whatever `catsdogs smoke` checks, an unreachable URL must fail it with a readable message.
    with pytest.raises(CatsdogsError, match="smoke test against"):
        run_smoke_command("http://127.0.0.1:9", timeout_s=60)


# --- the CLI, as cd.yml and the Jenkinsfile call it --------------------------------------------------


@pytest.mark.integration
def test_cli_dry_run_prints_the_manifests_and_applies_nothing(fake_kubectl) -> None:
    done = run_cli("deploy", "--dry-run", "--overlay", str(OVERLAYS / "production"), "--image", IMAGE)
    assert done.returncode == 0, done.stderr
    assert IMAGE in done.stdout
    assert fake_kubectl.verbs == ["kustomize"]


@pytest.mark.integration
def test_cli_without_overlay_or_image_says_what_is_missing() -> None:
    done = run_cli("deploy", "--image", IMAGE)
    assert done.returncode == 1
    assert "needs --overlay and --image" in done.stderr


@pytest.mark.integration
def test_cli_deploy_rollback_undoes_the_rollout(fake_kubectl) -> None:
    done = run_cli("deploy", "rollback", "--namespace", "staging")
    assert done.returncode == 0, done.stderr
    assert fake_kubectl.verbs == ["rollout undo", "rollout status"]
    assert all("staging" in call["args"] for call in fake_kubectl.calls)


@pytest.mark.integration
def test_cli_failing_smoke_exits_nonzero_after_rolling_back(fake_kubectl, ready_service: str) -> None:
    """The real `catsdogs smoke` against a live service that is up and ready but cannot classify
    (it has no /model-info or /predict): the smoke test fails, the rollout is undone."""
    done = run_cli(
        "deploy", "--overlay", str(OVERLAYS / "production"), "--image", IMAGE, "--smoke-url", ready_service
    )
    assert done.returncode == 1
    assert "rolled back" in done.stderr
    assert fake_kubectl.verbs == ["kustomize", "apply", "rollout status", "rollout undo", "rollout status"]


@pytest.mark.integration
@pytest.mark.slow
def test_cli_deploy_passes_the_real_smoke_test_against_the_real_service(
    fake_kubectl, tiny_bundle: Path, tmp_path: Path
) -> None:
    from .conftest import free_port, wait_for_http

    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "CATSDOGS_MODEL_URI": str(tiny_bundle),
        "CATSDOGS_HOST": "127.0.0.1",
        "CATSDOGS_PORT": str(port),
        "CATSDOGS_CACHE_DIR": str(tmp_path / "cache"),
    }
    server = subprocess.Popen([sys.executable, "-m", "catsdogs", "serve"], env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/ready", timeout_s=60, alive=lambda: server.poll() is None)
        done = run_cli(
            "deploy", "--overlay", str(OVERLAYS / "production"), "--image", IMAGE, "--smoke-url", url
        )
        assert done.returncode == 0, done.stderr
        assert "smoke test passed" in done.stderr
        assert fake_kubectl.verbs == ["kustomize", "apply", "rollout status"]
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_tiny_bundle_tells_its_two_samples_apart(tiny_bundle: Path) -> None:
    """The test model is real ONNX that the smoke test can pass: it predicts its own samples right."""
    import numpy as np
    import onnxruntime as ort

    from catsdogs.bundle import ModelBundle
    from catsdogs.preprocessing import decode_image, preprocess

    bundle = ModelBundle.open(tiny_bundle)
    session = ort.InferenceSession(str(bundle.onnx_path()), providers=["CPUExecutionProvider"])
    for path, label in bundle.samples():
        batch = preprocess(decode_image(path.read_bytes()), bundle.preprocessing)[None]
        (logits,) = session.run(["logits"], {"input": batch})
        assert bundle.preprocessing.class_names[int(np.argmax(logits[0]))] == label
