"""``catsdogs smoke``: a post-deploy check of a running service, used by CI/CD.

Checks ``/health``, ``/ready`` (waiting a little for the model), a known cat and a known dog (the
labelled samples shipped in the served bundle, or ``<label>.<anything>.jpg`` files from a folder),
that a bad upload is refused with a 4xx error body, and that ``/metrics`` exports predictions; or,
against a public entry point (``public=True``), that the internal endpoints are not routed there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from catsdogs.bundle import IMAGE_SUFFIXES

#: What a public entry point (the production Ingress) routes: exact paths, and ``/samples/...``.
PUBLIC_PATHS = ("/", "/predict", "/predict/batch", "/feedback", "/health", "/ready", "/samples")
#: Endpoints for operators and Prometheus only: the public Ingress must not route them (404).
INTERNAL_PATHS = ("/metrics", "/model-info", "/stats", "/docs", "/openapi.json", "/admin/reload")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class SmokeReport:
    url: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))


def _folder_images(folder: Path) -> list[tuple[str, str, bytes]]:
    return [
        (path.name, path.name.split(".", 1)[0], path.read_bytes())
        for path in sorted(folder.iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]


def _bundle_images(session: requests.Session, url: str, timeout: float) -> list[tuple[str, str, bytes]]:
    listing = session.get(f"{url}/samples", timeout=timeout)
    listing.raise_for_status()
    images = []
    for name in listing.json().get("samples", []):
        response = session.get(f"{url}/samples/{name}", timeout=timeout)
        response.raise_for_status()
        images.append((name, name.split(".", 1)[0], response.content))
    return images


def _pick(images: list[tuple[str, str, bytes]], labels: tuple[str, ...]) -> list[tuple[str, str, bytes]]:
    """The first image of each wanted label."""
    chosen = {}
    for name, label, data in images:
        if label in labels and label not in chosen:
            chosen[label] = (name, label, data)
    return [chosen[label] for label in labels if label in chosen]


def _wait_ready(session: requests.Session, url: str, timeout: float, wait_s: float) -> requests.Response:
    deadline = time.monotonic() + wait_s
    while True:
        response = session.get(f"{url}/ready", timeout=timeout)
        if response.status_code == 200 or time.monotonic() >= deadline:
            return response
        time.sleep(0.5)


def run_smoke(
    url: str,
    *,
    images_dir: Path | None = None,
    api_key: str | None = None,
    labels: tuple[str, ...] = ("cat", "dog"),
    timeout: float = 10.0,
    ready_wait_s: float = 30.0,
    public: bool = False,
) -> SmokeReport:
    """Run every check against ``url``; never raises for a failing service (see ``report.ok``).

    ``public``: ``url`` is the public entry point, where :data:`INTERNAL_PATHS` must answer 404
    (checked instead of ``/metrics``).
    """
    url = url.rstrip("/")
    report = SmokeReport(url)
    session = requests.Session()
    if api_key:
        session.headers["X-API-Key"] = api_key
    try:
        health = session.get(f"{url}/health", timeout=timeout)
        report.add("health", health.status_code == 200, f"HTTP {health.status_code}")
        ready = _wait_ready(session, url, timeout, ready_wait_s)
        report.add("ready", ready.status_code == 200, f"HTTP {ready.status_code} {ready.text[:200]}")
        images = _folder_images(images_dir) if images_dir else _bundle_images(session, url, timeout)
        picked = _pick(images, labels)
        missing = set(labels) - {label for _, label, _ in picked}
        if missing:
            report.add("known images", False, f"no image labelled {sorted(missing)} to check with")
        for name, label, data in picked:
            response = session.post(f"{url}/predict", files={"file": (name, data)}, timeout=timeout)
            got = response.json().get("label") if response.status_code == 200 else None
            report.add(f"predict {label}", got == label, f"{name}: HTTP {response.status_code}, label {got}")
        bad = session.post(
            f"{url}/predict", files={"file": ("bad.jpg", b"this is not an image")}, timeout=timeout
        )
        body_ok = bad.headers.get("content-type", "").startswith("application/json") and "error" in bad.json()
        report.add("bad upload refused", 400 <= bad.status_code < 500 and body_ok, f"HTTP {bad.status_code}")
        if public:
            routed = [
                path
                for path in INTERNAL_PATHS
                if session.get(f"{url}{path}", timeout=timeout).status_code != 404
            ]
            report.add(
                "internal endpoints not routed", not routed, f"routed: {routed}" if routed else "all 404"
            )
        else:
            metrics = session.get(f"{url}/metrics", timeout=timeout)
            report.add(
                "metrics",
                metrics.status_code == 200 and "catsdogs_predictions_total" in metrics.text,
                f"HTTP {metrics.status_code}",
            )
    except (requests.RequestException, ValueError) as exc:
        report.add("connection", False, f"{type(exc).__name__}: {exc}")
    return report
