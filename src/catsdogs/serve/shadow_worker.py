"""The shadow model's own process: it loads, polls and runs the challenger at the lowest CPU priority.

A separate process rather than a thread of the service: the challenger shares no GIL with the
answers (a low-priority thread parked by the scheduler between two NumPy calls would hold it), its
niceness covers its ONNX Runtime threads, and a crash in it (a bad graph, a decoder bug) cannot take
the answers down: the worker is replaced. It is spawned (never forked: the service's threads and
sessions must not be copied) and talks to :class:`ShadowWorker` over one pipe, request then reply,
so at most one upload is in it at a time.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from catsdogs.preprocessing import resize, to_array
from catsdogs.runtime import single_threaded_blas
from catsdogs.serve.access_log import configure_logging
from catsdogs.serve.model_store import ModelStore
from catsdogs.serve.predictor import decode_upload
from catsdogs.settings import Settings

logger = logging.getLogger(__name__)

NICENESS = 19
"""The worker process's scheduling priority: under full load the answers keep the cores and the
shadow takes what is left (its skipped samples are counted)."""

Request = tuple[str] | tuple[str, bytes]
"""``("status",)``: the loaded version only; ``("score", upload)``: score this upload."""


@dataclass(frozen=True)
class ShadowAnswer:
    """What the worker says of one request: the loaded version (None: no model yet) and, for an
    upload, its label and confidence or the one-line error that stopped it."""

    version: str | None
    label: str | None = None
    confidence: float | None = None
    error: str | None = None
    cpu_s: float = 0.0
    """CPU time the worker spent on this request (charged to the shadow's budget)."""


def shadow_settings(settings: Settings) -> Settings:
    """The served settings, pointed at the shadow model, on one thread and no second session: the
    shadow must leave the cores to the answers."""
    return settings.model_copy(
        update={
            "model_uri": settings.shadow_model_uri,
            "ort_intra_threads": 1,
            "ort_lone_request_all_cores": False,
            "batch_max_size": 1,
            "serve_int8": False,
        }
    )


class ShadowWorker:
    """The parent's handle on the worker process: start, ask, restart after a crash, stop."""

    def __init__(self, settings: Settings, *, timeout_s: float) -> None:
        self._settings = shadow_settings(settings)
        self._timeout_s = timeout_s
        self._context = multiprocessing.get_context("spawn")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()  # one request at a time on the pipe

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=run, args=(self._settings, child), name="catsdogs-shadow", daemon=True
        )
        process.start()
        child.close()
        self._process, self._conn = process, parent

    def ask(self, request: Request) -> ShadowAnswer:
        """Send one request and wait for its answer; a dead or stuck worker is replaced (and raises)."""
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._replace()
            assert self._conn is not None
            try:
                self._conn.send(request)
                if self._conn.poll(self._timeout_s):
                    answer: ShadowAnswer = self._conn.recv()
                    return answer
            except (EOFError, OSError):
                self._replace()
                raise RuntimeError("the shadow worker exited") from None
            self._replace()
            raise TimeoutError(f"the shadow worker did not answer in {self._timeout_s:g} s")

    def _replace(self) -> None:
        if self._process is not None:
            logger.warning("restarting the shadow worker (exit code %s)", self._process.exitcode)
        self.stop()
        self.start()

    def stop(self) -> None:
        """Ask the worker to exit; kill it if it does not within 5 s."""
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(None)
            conn.close()
        if process is not None:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)


def lowest_priority() -> None:
    """Niceness 19 for the whole process. (Not ``SCHED_IDLE``: measured no better, and a saturated
    machine would starve the worker into timeouts.)"""
    try:
        os.nice(NICENESS - os.nice(0))
    except (AttributeError, OSError) as exc:  # other systems: what could be set is set
        logger.info("shadow worker priority: %s", exc)


def run(settings: Settings, conn: Connection) -> None:
    """The worker process's main loop: answer each request until ``None`` or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    configure_logging(settings.log_level)
    lowest_priority()
    single_threaded_blas()
    store = ModelStore(settings)
    store.start()
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the service is gone
            break
        if request is None:
            break
        conn.send(_answer(store, settings, request))
    store.stop()
    sys.exit(0)


def _answer(store: ModelStore, settings: Settings, request: Request) -> ShadowAnswer:
    model = store.current
    if model is None or len(request) == 1:
        return ShadowAnswer(model.version if model is not None else None)
    started = time.process_time()
    try:
        image = decode_upload(request[1], model.config, settings)  # type: ignore[misc]
        probs = model.run(to_array(resize(image, model.config), model.config)[None]).probabilities[0]
    except Exception as exc:  # reported to the parent, which counts it and logs it once
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return ShadowAnswer(model.version, error=error, cpu_s=time.process_time() - started)
    index = int(np.argmax(probs))
    used = time.process_time() - started
    return ShadowAnswer(model.version, model.class_names[index], float(probs[index]), cpu_s=used)
