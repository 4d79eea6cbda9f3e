"""The served model: loading a bundle into ONNX Runtime, warming it up, and swapping it atomically.

A request takes one reference to :class:`LoadedModel` and uses it to the end, so a swap never
mixes two models in one answer: old requests finish on the old session, new ones get the new.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from catsdogs import runtime
from catsdogs.ood import UnknownDetector, run_judged
from catsdogs.preprocessing import PreprocessConfig, softmax
from catsdogs.registry.model_source import ResolvedBundle, current_identity, identity, resolve
from catsdogs.runtime import (
    CAM_NAME,
    FEATURES_NAME,
    OUTPUT_NAME,
    PET_MASS_NAME,
    available_cores,
    run_logits,
    run_named,
)
from catsdogs.settings import Settings

logger = logging.getLogger(__name__)


def batch_size(settings: Settings) -> int:
    """The micro-batch limit: configured, or chosen for the core count and graph (see the setting)."""
    if settings.batch_max_size is not None:
        return max(1, settings.batch_max_size)
    return 8 if available_cores() > 4 or settings.serve_int8 else 1


def inference_workers(settings: Settings) -> int:
    """Concurrent forward passes: configured, or one per core without micro-batching, else one."""
    if settings.inference_workers is not None:
        return max(1, settings.inference_workers)
    return available_cores() if batch_size(settings) == 1 else 1


def intra_threads(settings: Settings) -> int:
    """Threads of one forward pass under load: configured, or the cores shared by the workers."""
    return settings.ort_intra_threads or max(1, available_cores() // inference_workers(settings))


def session_options(settings: Settings) -> Any:
    """ORT options of the shared session: :func:`intra_threads` per call, spinning as configured."""
    return runtime.session_options(
        intra_threads=intra_threads(settings),
        allow_spinning=settings.ort_allow_spinning,
        cpu_arena=settings.ort_cpu_arena,
    )


def lone_session_options(settings: Settings) -> Any:
    """ORT options of the session a request alone in its worker runs on: every core, spinning (as a
    bare ORT session does by default: the other cores are idle then, and spinning saves each
    operator's thread wake-up, 1.3 ms of a 13 ms answer measured on 2 cores)."""
    return runtime.session_options(
        intra_threads=available_cores(), allow_spinning=True, cpu_arena=settings.ort_cpu_arena
    )


class Scores(NamedTuple):
    """What one forward pass says: (N, classes) probabilities and (N,) OOD scores (None: no detector)."""

    probabilities: np.ndarray
    ood: np.ndarray | None

    def row(self, index: int) -> Scores:
        """One image's scores (a (classes,) row and a 0-d score)."""
        return Scores(self.probabilities[index], None if self.ood is None else self.ood[index])


@dataclass
class LoadedModel:
    """One model version ready to run: ORT session plus everything a response reports about it."""

    resolved: ResolvedBundle
    session: Any
    config: PreprocessConfig
    #: The same graph on every core, for a request that finds the worker idle (None: not needed).
    wide_session: Any | None = None
    #: The bundle's unknown detector (None: an older bundle, or ``unknown_answers`` off).
    detector: UnknownDetector | None = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.resolved.version

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    @property
    def architecture(self) -> str:
        return str(self.resolved.bundle.metadata.get("architecture", "unknown"))

    @property
    def input_shape(self) -> list[int | str | None]:
        return list(self.session.get_inputs()[0].shape)

    @property
    def explains(self) -> bool:
        """The graph has class activation maps (``/explain``)."""
        return CAM_NAME in runtime.output_names(self.session)

    def run(self, batch: np.ndarray, *, alone: bool = False) -> Scores:
        """(N, 3, H, W) float32 → probabilities and OOD scores; ``alone``: nothing else is running,
        so the wide session may take every core."""
        session = self.wide_session if alone and self.wide_session is not None else self.session
        if self.detector is None:
            return Scores(softmax(run_logits(session, batch).astype(np.float32, copy=False)), None)
        return Scores(*run_judged(session, batch, self.detector))

    def explain(self, batch: np.ndarray) -> tuple[Scores, np.ndarray]:
        """Scores plus (N, classes, h, w) class activation maps, from one pass of the narrow session."""
        available = runtime.output_names(self.session)
        names = [n for n in (OUTPUT_NAME, FEATURES_NAME, PET_MASS_NAME) if n in available] + [CAM_NAME]
        out = run_named(self.session, batch, names)
        probabilities = softmax(out[OUTPUT_NAME].astype(np.float32, copy=False))
        ood = None
        if self.detector is not None:
            ood = self.detector.scores(out[FEATURES_NAME], out.get(PET_MASS_NAME))
        return Scores(probabilities, ood), out[CAM_NAME]

    def warm_up(self, max_batch: int) -> None:
        """Run the sizes the service will run, so the first requests and the arena hold no surprise."""
        size = self.config.image_size
        for n in sorted({1, max(1, max_batch)}):
            self.run(np.zeros((n, 3, size, size), dtype=np.float32))
        if self.wide_session is not None:
            self.run(np.zeros((1, 3, size, size), dtype=np.float32), alone=True)


def load_model(resolved: ResolvedBundle, settings: Settings) -> LoadedModel:
    """Open the bundle's ONNX graph in ORT (checked against its preprocessing), and warm it up."""
    bundle = resolved.bundle
    config = bundle.preprocessing
    path = bundle.onnx_path(int8=settings.serve_int8)
    model = LoadedModel(resolved, runtime.open_model(path, config, options=session_options(settings)), config)
    if settings.unknown_answers:
        model.detector = bundle.unknown_detector()
        if model.detector is not None and FEATURES_NAME not in runtime.output_names(model.session):
            model.detector = None  # an INT8 graph quantized before the detector existed
    cores = available_cores()
    if settings.ort_lone_request_all_cores and intra_threads(settings) < cores:
        model.wide_session = runtime.open_model(path, config, options=lone_session_options(settings))
    model.warm_up(batch_size(settings))
    return model


#: A pod without a model answers nothing: past this, it keeps retrying at this pace.
NO_MODEL_BACKOFF_MAX_S = 30.0


def backoff(wait: float, failures: int, *, cap: float) -> float:
    """The wait after ``failures`` failed loads in a row: doubled per failure up to ``cap`` (never
    below ``wait``), so a download that keeps failing (a full disk) is not retried every few seconds."""
    return min(max(wait, cap), wait * 2 ** min(failures, 30))


@dataclass(frozen=True)
class ReloadResult:
    reloaded: bool
    version: str | None
    previous: str | None
    detail: str
    failed: bool = False
    """A model load was tried and failed (the poll backs off)."""


class ModelStore:
    """Holds the current model; loads, polls and swaps it off the request path."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_swap: Callable[[LoadedModel], None] | None = None,
        on_reload: Callable[[bool], None] | None = None,
    ) -> None:
        self.settings = settings
        self._current: LoadedModel | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loaded = threading.Event()
        self._on_swap = on_swap
        self._on_reload = on_reload
        self.last_error: str | None = None

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def _swap(self, model: LoadedModel) -> None:
        self._current = model  # one reference assignment: atomic for readers
        if self._on_swap:
            self._on_swap(model)
        self._loaded.set()

    def wait_loaded(self, timeout_s: float) -> bool:
        """Block until a first model is served (True) or ``timeout_s`` passes (False)."""
        return self._loaded.wait(timeout_s)

    def load_now(self, *, uri: str | None = None) -> LoadedModel:
        """Resolve, load and warm up, then swap in (raises on failure)."""
        started = time.monotonic()
        model = load_model(resolve(self.settings, uri=uri), self.settings)
        self._swap(model)
        self.last_error = None
        logger.info(
            "serving %s version %s from %s (%s) after %.2fs%s",
            model.resolved.name,
            model.version,
            model.resolved.source,
            model.resolved.bundle.root,
            time.monotonic() - started,
            f"; {model.resolved.note}" if model.resolved.note else "",
        )
        return model

    def reload(self, *, force: bool = False) -> ReloadResult:
        """Swap in the model the URI points at now, if it differs from the served one (or ``force``).

        A failed resolve, download, verification or load is a reload failure: counted, logged on one
        line, and the served model stays.
        """
        with self._lock:
            previous = self._current.version if self._current else None
            served = identity(self._current.resolved) if self._current else None
            served_from_cache = bool(self._current and self._current.resolved.source == "cache")
            if served is not None and not force:
                try:
                    latest = current_identity(self.settings)
                except Exception as exc:  # registry still down: keep serving what we have
                    detail = f"registry check failed: {type(exc).__name__}: {exc}".splitlines()[0]
                    logger.warning("%s", detail)
                    return ReloadResult(False, previous, previous, detail)
                # Same version of the same run: nothing to do, unless it came from the cache (confirm it).
                if latest == served and not served_from_cache:
                    return ReloadResult(False, previous, previous, "already serving the current version")
            try:
                model = self.load_now()
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                keeping = "no model served yet" if previous is None else f"still serving version {previous}"
                logger.error("model load failed (%s): %s", keeping, self.last_error)
                if self._on_reload:
                    self._on_reload(False)
                return ReloadResult(False, previous, previous, self.last_error, failed=True)
            if identity(model.resolved) == served and model.resolved.source == "cache":
                return ReloadResult(False, previous, previous, model.resolved.note)
            if self._on_reload and previous is not None:
                self._on_reload(True)
            return ReloadResult(True, model.version, previous, f"now serving version {model.version}")

    def start(self) -> None:
        """Load the first model and poll for new ones, in a background thread."""
        self._thread = threading.Thread(target=self._run, name="catsdogs-model-poll", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failures = int(self.reload().failed)
        interval = self.settings.reload_interval_s
        while True:
            # Without a model yet, retry every 2 s (backing off); else poll at the interval (0: admin only).
            if self._current is None:
                wait = backoff(
                    2.0, failures, cap=min(NO_MODEL_BACKOFF_MAX_S, self.settings.reload_backoff_max_s)
                )
            elif interval > 0:
                wait = backoff(interval, failures, cap=self.settings.reload_backoff_max_s)
            else:
                return
            if self._stop.wait(wait):
                return
            failures = failures + 1 if self.reload().failed else 0

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
