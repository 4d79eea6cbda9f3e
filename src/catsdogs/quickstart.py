"""``catsdogs quickstart`` (``make demo``): the whole lifecycle in a few minutes, in a folder of its own.

Fetch the data (the settings' source) → ingest a small balanced sample → train the fast ``head``
model (tracked in MLflow, registered as ``challenger``) → promote it through the quality gate →
serve the ``champion`` on loopback. Data, runs, caches and the MLflow store all live under the demo
folder, so the user's own data set, runs and registry are never read or written.

The gate is the real one with the demo's floors (:data:`DEMO_MIN_ACCURACY`,
:data:`DEMO_MIN_CLASS_RECALL`): a test split of some 60 photos cannot show the production floors
of 97 % and 95 % with any confidence.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from catsdogs import CatsdogsError
from catsdogs.settings import Settings, get_settings

if TYPE_CHECKING:
    from catsdogs.data import IngestResult
    from catsdogs.registry import PromotionDecision
    from catsdogs.training.train import TrainResult

_logger = logging.getLogger(__name__)

#: Photos per class: ~480 to train on, ~60 each to validate and test; about two minutes on 2 cores.
DEFAULT_PER_CLASS = 300
#: The demo's gate floors. 58 of 60 right (96.7 %) has a 95 % Wilson interval of 88.6-99.1 %, so a
#: model that meets the production floor of 97 % can measure 90 % here; a class of ~30 photos moves
#: 3.3 points per error.
DEMO_MIN_ACCURACY = 0.90
DEMO_MIN_CLASS_RECALL = 0.85
#: The demo's ceiling on test photos answered ``unknown``. Calibrated on ~120 validation photos,
#: each of the detector's two thresholds is the largest validation score, which a new photo exceeds
#: with probability 1/121: ~1.7 % in all, so 3 of ~120 (over the production ceiling of 2 %) is
#: common, while 7 or more (over 5 %) happens by chance in fewer than 1 demo in 200.
DEMO_MAX_UNKNOWN_RATE = 0.05
DEMO_RUN_NAME = "quickstart-head"
READY_TIMEOUT_S = 300.0


def demo_settings(folder: Path, *, port: int | None = None, **overrides: Any) -> Settings:
    """Settings that keep everything under ``folder`` and serve the demo's champion on 127.0.0.1.

    Everything that could point elsewhere (environment or ``params.yaml``) is overridden here:
    paths, the MLflow store and registry, the profile, the strategy, the gate's floors and the
    serving address. One worker: extra worker processes rebuild their settings from the environment.
    """
    root = folder.expanduser().resolve()
    store = f"sqlite:///{root / 'mlruns.db'}"
    values: dict[str, Any] = {
        "data_dir": root / "data",
        "runs_dir": root / "runs",
        "cache_dir": root / "cache",
        "upload_dir": root / "uploads",
        "mlflow_tracking_uri": store,
        "mlflow_registry_uri": store,
        "mlflow_artifact_location": str(root / "mlartifacts"),
        "profile": "default",
        "strategy": "head",
        "run_name": DEMO_RUN_NAME,
        "promotion_min_accuracy": DEMO_MIN_ACCURACY,
        "promotion_min_class_recall": DEMO_MIN_CLASS_RECALL,
        "promotion_max_unknown_rate": DEMO_MAX_UNKNOWN_RATE,
        "host": "127.0.0.1",
        "port": port,
        "workers": 1,
        **overrides,
    }
    settings = get_settings(**values)
    return settings.model_copy(update={"model_uri": f"models:/{settings.model_name}@champion"})


def page_url(settings: Settings) -> str:
    """The upload page of a service run with these settings."""
    return f"http://{settings.host}:{settings.port}/"


@dataclass
class QuickstartResult:
    """What the demo built, with the wall time of each step in seconds."""

    archive: Path
    ingest: IngestResult
    train: TrainResult
    version: int
    decision: PromotionDecision
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for the terminal: the sample, the model's test accuracy, the gate's verdict."""
        counts = self.ingest.report["per_split"]
        metrics = self.train.test_metrics
        low, high = metrics["accuracy_ci95"]
        verdict = (
            f"promoted v{self.version} to champion"
            if self.decision.accepted
            else f"the gate kept champion v{self.decision.champion_version} ({self.decision.message})"
        )
        steps = ", ".join(f"{name} {s:.0f} s" for name, s in self.seconds.items())
        return (
            f"sample: {counts['train']} train / {counts['val']} val / {counts['test']} test photos\n"
            f"model v{self.version}: test accuracy {metrics['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}, "
            f"n={metrics['n_images']})\n{verdict}\ntime: {steps}"
        )


def quickstart(
    settings: Settings,
    *,
    per_class: int = DEFAULT_PER_CLASS,
    allow_unverified: bool = False,
    say: Callable[[str], None] = _logger.info,
) -> QuickstartResult:
    """Fetch, ingest a sample of ``per_class`` photos per class, train, register and promote.

    ``say`` receives one line per step (the CLI prints them). A challenger the gate refuses is not
    an error while a champion from an earlier run exists: that champion is what gets served (re-tested
    on this run's test split first when it was tested on another sample).

    Raises:
        CatsdogsError: a step failed, or the gate refused the demo's first model.
    """
    from catsdogs.data import ingest
    from catsdogs.data.fetch import fetch_archive
    from catsdogs.registry import promote
    from catsdogs.training.evaluate import evaluator_on_test_split
    from catsdogs.training.workflow import train_and_register

    seconds: dict[str, float] = {}
    mark = time.monotonic()

    def lap(step: str) -> None:
        nonlocal mark
        seconds[step], mark = time.monotonic() - mark, time.monotonic()

    say(f"fetching {settings.data_source}")
    archive = fetch_archive(settings, allow_unverified=allow_unverified)
    lap("fetch")
    say(f"ingesting {per_class} photos per class from {archive} into {settings.data_dir}")
    ingested = ingest(settings, source=str(archive), per_class=per_class, show_progress=False)
    lap("ingest")
    say(f"training the `head` model on frozen {settings.architecture} features (run in {settings.runs_dir})")
    trained, version = train_and_register(settings)
    lap("train")
    say(
        f"promoting v{version} (demo gate: accuracy >= {settings.promotion_min_accuracy:.2f}, "
        f"recall of each class >= {settings.promotion_min_class_recall:.2f}, "
        f"unknown answers <= {settings.promotion_max_unknown_rate:.0%})"
    )
    decision = promote(
        settings, version=version, reason="catsdogs quickstart", evaluate=evaluator_on_test_split(settings)
    )
    lap("promote")
    if not decision.accepted and decision.champion_version is None:
        raise CatsdogsError(f"the demo model did not pass the gate:\n{decision.table()}\n{decision.message}")
    return QuickstartResult(archive, ingested, trained, version, decision, seconds)


def serve_demo(settings: Settings, *, on_ready: Callable[[str], None]) -> None:
    """Serve the champion until Ctrl-C (SIGINT) or SIGTERM; ``on_ready(url)`` once it answers."""
    from catsdogs.serve.server import serve

    url = page_url(settings)
    # Training left a great many long-lived objects (torch, MLflow) in this process: frozen, the
    # collector no longer walks them, neither in a full collection while serving nor at exit
    # (on the loaded 2-core machine, Ctrl-C took 8 s to exit, in the final collection; 3 s frozen).
    gc.freeze()
    threading.Thread(target=_announce_when_ready, args=(url, on_ready), daemon=True).start()
    serve(settings)


def _announce_when_ready(url: str, on_ready: Callable[[str], None]) -> None:
    # The page is usable only once the model is loaded: announce it then, not when the port opens.
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}ready", timeout=2).status_code == 200:
                on_ready(url)
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    _logger.warning("the service at %s was not ready after %.0f s; see the log above", url, READY_TIMEOUT_S)
