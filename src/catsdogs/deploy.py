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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from catsdogs import CatsdogsError

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "catsdogs"
DEFAULT_DEPLOYMENT = "catsdogs-api"

_DIGEST = re.compile(r"^(?P<name>[^@]+)@(?P<digest>sha256:[0-9a-f]{64})$")
#: A digest of one repeated hex digit (``sha256:000…``) is a placeholder, never a real image.
PLACEHOLDER_DIGEST = re.compile(r"sha256:([0-9a-f])\1{63}\b")

Smoke = Callable[[str], None]
"""A smoke check: takes the service's base URL, returns on success, raises on failure."""


@dataclass(frozen=True)
class ImageRef:
    """An image reference: repository name, optional tag, optional digest."""

    name: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, image: str) -> ImageRef:
        """Parse ``name[:tag][@sha256:<64 hex>]``; a port in the registry host is not a tag."""
        image = image.strip()
        if not image or any(char.isspace() for char in image):
            raise CatsdogsError(
                f"invalid image reference {image!r}: expected name[:tag] or name@sha256:<digest>"
            )
        digest = None
        if "@" in image:
            match = _DIGEST.match(image)
            if not match:
                raise CatsdogsError(
                    f"invalid image digest in {image!r}: expected name@sha256:<64 hex digits>"
                )
            image, digest = match["name"], match["digest"]
        if ":" not in image.rsplit("/", 1)[-1]:
            return cls(name=image, digest=digest)
        name, tag = image.rsplit(":", 1)
        if not tag:
            raise CatsdogsError(f"invalid image reference {image!r}: empty tag")
        return cls(name=name, tag=tag, digest=digest)


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


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs inside a workload (Deployment, StatefulSet, DaemonSet, Job, CronJob)."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    pod = (spec.get("template") or {}).get("spec")
    return [pod] if isinstance(pod, dict) else []


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for pod in _pod_specs(doc) for c in pod.get("containers", []) + pod.get("initContainers", [])]


def render(
    overlay: Path,
    image: str,
    *,
    deployment: str = DEFAULT_DEPLOYMENT,
    kubectl: Kubectl | None = None,
) -> str:
    """Render a kustomize overlay with the API image replaced by ``image``.

    The overlay's files are never edited (unlike ``kustomize edit set image``). Whatever name the
    overlay gives the API image (``ghcr.io/...`` in production, ``localhost/...`` locally), every
    container that runs that image gets ``image`` instead.
    """
    overlay = Path(overlay)
    if not (overlay / "kustomization.yaml").is_file():
        raise CatsdogsError(f"{overlay} is not a kustomize overlay (no kustomization.yaml there)")
    ImageRef.parse(image)
    docs = [doc for doc in yaml.safe_load_all((kubectl or Kubectl())("kustomize", str(overlay))) if doc]
    apis = [d for d in docs if d.get("kind") == "Deployment" and d["metadata"]["name"] == deployment]
    if len(apis) != 1 or not _containers(apis[0]):
        raise CatsdogsError(f"{overlay} renders no Deployment named {deployment!r} with a container")
    current = ImageRef.parse(_containers(apis[0])[0]["image"]).name
    for doc in docs:
        for container in _containers(doc):
            if ImageRef.parse(container["image"]).name == current:
                container["image"] = image
    placeholders = sorted(
        {c["image"] for d in docs for c in _containers(d) if PLACEHOLDER_DIGEST.search(c["image"])}
    )
    if placeholders:
        raise CatsdogsError(
            f"{overlay} renders placeholder image digests ({', '.join(placeholders)}): pin real ones "
            "(kustomize edit set image NAME=NAME@sha256:...) before deploying"
        )
    return yaml.safe_dump_all(docs, sort_keys=False)


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


def run_smoke_command(url: str, *, timeout_s: float = 120.0, public: bool = False) -> None:
    """The real smoke check: ``catsdogs smoke --url URL`` (the serving side owns what it checks);
    ``public``: ``URL`` is the public Ingress, which must not route the internal endpoints."""
    command = [sys.executable, "-m", "catsdogs", "smoke", "--url", url, *(["--public"] if public else [])]
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
    apply_manifests(render(overlay, image, deployment=deployment, kubectl=kubectl), kubectl=kubectl)
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
