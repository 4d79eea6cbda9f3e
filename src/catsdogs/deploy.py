"""Ship the serving image to Kubernetes: render an overlay with an image, apply it, wait for the
rollout, smoke-test the live service and undo the rollout when anything fails.

GitHub Actions (``cd.yml``) and Jenkins (``Jenkinsfile``) both call ``catsdogs deploy``, so this is the
one place where the deployment logic lives. Everything goes through the ``kubectl`` binary (its
built-in kustomize included), which keeps the module free of a Kubernetes client dependency and lets
tests put a recording fake ``kubectl`` on ``PATH``.

Not to be confused with ``catsdogs rollback`` (registry side), which moves a model alias:
:func:`rollback` here undoes the Deployment's last rollout.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from catsdogs import CatsdogsError

logger = logging.getLogger(__name__)

#: The image name the base manifests use; :func:`render` replaces it with the image being shipped.
PLACEHOLDER_IMAGE = "ghcr.io/catsdogs/catsdogs-serve"
DEFAULT_NAMESPACE = "catsdogs"
DEFAULT_DEPLOYMENT = "catsdogs-api"

_DIGEST = re.compile(r"^(?P<name>[^@]+)@(?P<digest>sha256:[0-9a-f]{64})$")

Smoke = Callable[[str], None]
"""A smoke check: takes the service's base URL, returns on success, raises on failure."""


@dataclass(frozen=True)
class ImageRef:
    """An image reference split the way kustomize's ``images:`` field wants it."""

    name: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, image: str) -> ImageRef:
        """Parse ``name[:tag]`` or ``name@sha256:<64 hex>``; a port in the registry host is not a tag."""
        image = image.strip()
        if not image or any(char.isspace() for char in image):
            raise CatsdogsError(
                f"invalid image reference {image!r}: expected name[:tag] or name@sha256:<digest>"
            )
        if "@" in image:
            match = _DIGEST.match(image)
            if not match:
                raise CatsdogsError(
                    f"invalid image digest in {image!r}: expected name@sha256:<64 hex digits>"
                )
            return cls(name=match["name"], digest=match["digest"])
        last = image.rsplit("/", 1)[-1]
        if ":" in last:
            name, tag = image.rsplit(":", 1)
            if not tag:
                raise CatsdogsError(f"invalid image reference {image!r}: empty tag")
            return cls(name=name, tag=tag)
        return cls(name=image)

    def kustomize_entry(self, placeholder: str) -> dict[str, str]:
        entry = {"name": placeholder, "newName": self.name}
        if self.digest:
            entry["digest"] = self.digest
        elif self.tag:
            entry["newTag"] = self.tag
        return entry


@dataclass(frozen=True)
class DeployResult:
    """What happened during one deployment."""

    image: str
    namespace: str
    deployment: str
    applied: bool
    smoke_passed: bool | None
    """``None`` when no smoke URL was given."""
    rolled_back: bool
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.applied and self.smoke_passed is not False and not self.rolled_back


class Kubectl:
    """Runs ``kubectl`` and turns failures into :class:`CatsdogsError` with kubectl's own message."""

    def __init__(self, binary: str = "kubectl", *, context: str | None = None) -> None:
        self.binary = binary
        self.context = context

    def __call__(self, *args: str, stdin: str | None = None, timeout: float | None = None) -> str:
        command = [self.binary, *(["--context", self.context] if self.context else []), *args]
        logger.info("running %s", " ".join(command))
        try:
            completed = subprocess.run(
                command, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
            )
        except FileNotFoundError:
            raise CatsdogsError(
                f"{self.binary} is not installed or not on PATH: install kubectl first"
            ) from None
        except subprocess.TimeoutExpired:
            raise CatsdogsError(f"`{' '.join(command)}` did not finish within {timeout:.0f} s") from None
        if completed.returncode != 0:
            detail = (completed.stderr or completed.stdout).strip()
            raise CatsdogsError(f"`{' '.join(command)}` failed (exit {completed.returncode}): {detail}")
        return completed.stdout


def render(
    overlay: Path,
    image: str,
    *,
    kubectl: Kubectl | None = None,
    placeholder: str = PLACEHOLDER_IMAGE,
) -> str:
    """Render a kustomize overlay with the API image replaced by ``image``.

    The overlay's files are never edited (unlike ``kustomize edit set image``): a throw-away
    kustomization that points at the overlay and adds an ``images:`` entry is rendered instead.
    """
    overlay = Path(overlay).resolve()
    if not (overlay / "kustomization.yaml").is_file():
        raise CatsdogsError(f"{overlay} is not a kustomize overlay (no kustomization.yaml there)")
    ref = ImageRef.parse(image)
    kubectl = kubectl or Kubectl()
    with tempfile.TemporaryDirectory(prefix="catsdogs-deploy-") as tmp:
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [str(Path(overlay))],
            "images": [ref.kustomize_entry(placeholder)],
        }
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
        return kubectl("kustomize", tmp)


def wait_for_rollout(
    *, namespace: str, deployment: str, timeout_s: float, kubectl: Kubectl | None = None
) -> None:
    """Block until every replica of the Deployment runs the new template, or raise."""
    kubectl = kubectl or Kubectl()
    kubectl(
        "rollout",
        "status",
        f"deployment/{deployment}",
        "--namespace",
        namespace,
        f"--timeout={int(timeout_s)}s",
        timeout=timeout_s + 30,
    )


def apply_manifests(manifests: str, *, kubectl: Kubectl | None = None) -> None:
    """``kubectl apply`` rendered manifests (server-side validation happens there)."""
    (kubectl or Kubectl())("apply", "-f", "-", stdin=manifests, timeout=120)


def rollback(
    *,
    namespace: str = DEFAULT_NAMESPACE,
    deployment: str = DEFAULT_DEPLOYMENT,
    to_revision: int | None = None,
    timeout_s: float = 300.0,
    kubectl: Kubectl | None = None,
) -> None:
    """Undo the Deployment's last rollout (or go to ``to_revision``) and wait until it has settled."""
    kubectl = kubectl or Kubectl()
    args = ["rollout", "undo", f"deployment/{deployment}", "--namespace", namespace]
    if to_revision is not None:
        args.append(f"--to-revision={to_revision}")
    kubectl(*args, timeout=60)
    wait_for_rollout(namespace=namespace, deployment=deployment, timeout_s=timeout_s, kubectl=kubectl)
    logger.warning("deployment/%s in %s rolled back", deployment, namespace)


def run_smoke_command(url: str, *, timeout_s: float = 120.0) -> None:
    """The real smoke check: ``catsdogs smoke --url URL`` (the serving side owns what it checks)."""
    command = [sys.executable, "-m", "catsdogs", "smoke", "--url", url]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise CatsdogsError(f"smoke test against {url} did not finish within {timeout_s:.0f} s") from None
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
        raise CatsdogsError(f"smoke test against {url} failed: {' | '.join(detail)}")


def deploy_and_verify(
    overlay: Path,
    image: str,
    *,
    smoke_url: str | None,
    smoke: Smoke = run_smoke_command,
    namespace: str = DEFAULT_NAMESPACE,
    deployment: str = DEFAULT_DEPLOYMENT,
    timeout_s: float = 300.0,
    kubectl: Kubectl | None = None,
) -> DeployResult:
    """Apply, wait, smoke-test; on a failed rollout or smoke test, undo the rollout.

    Returns a result whose ``ok`` is false (with the reason in ``error``) when the new version was
    rolled back; raises only when even the rollback fails or nothing was applied.
    """
    kubectl = kubectl or Kubectl()
    apply_manifests(render(overlay, image, kubectl=kubectl), kubectl=kubectl)
    stage = "rollout"
    try:
        wait_for_rollout(namespace=namespace, deployment=deployment, timeout_s=timeout_s, kubectl=kubectl)
        if smoke_url:
            stage = "smoke"
            smoke(smoke_url)
    except Exception as exc:
        logger.error("%s of %s failed, rolling back: %s", stage, image, exc)
        rollback(namespace=namespace, deployment=deployment, timeout_s=timeout_s, kubectl=kubectl)
        return DeployResult(
            image=image,
            namespace=namespace,
            deployment=deployment,
            applied=True,
            smoke_passed=False if stage == "smoke" else None,
            rolled_back=True,
            error=f"{stage} failed: {exc}",
        )
    logger.info("deployment/%s in %s runs %s", deployment, namespace, image)
    return DeployResult(
        image=image,
        namespace=namespace,
        deployment=deployment,
        applied=True,
        smoke_passed=True if smoke_url else None,
        rolled_back=False,
    )
