"""The one ONNX Runtime session factory, and the names of the model graph's tensors.

Every model run in the project opens its session here: feature extraction and the parity check in
training, evaluation, the MLflow pyfunc model and the service. A bundle's model is opened through
:func:`open_model`, which refuses a graph whose tensor names or input size disagree with the
bundle's ``preprocessing.json``. Only NumPy is imported at module level (ONNX Runtime when a session
is made), so serving and the pyfunc model use it without torch or MLflow.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from catsdogs import CatsdogsError

if TYPE_CHECKING:
    from catsdogs.preprocessing import PreprocessConfig

INPUT_NAME = "input"
"""The graph's input: (N, 3, H, W) float32, H×W equal to ``preprocessing.json``'s ``image_size``."""
OUTPUT_NAME = "logits"
"""The graph's output: (N, classes) float32 logits, one column per ``class_names`` entry."""
FEATURES_NAME = "features"
"""Optional output: (N, D) pooled features, what the unknown detector measures (:mod:`catsdogs.ood`)."""
PET_MASS_NAME = "pet_mass"
"""Optional output: (N,) probability of the ImageNet cat and dog classes (the unknown detector's)."""
CAM_NAME = "cam"
"""Optional output: (N, classes, h, w) class activation maps (``/explain``); only for linear heads."""


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cpu_quota(path: Path = CGROUP_CPU_MAX) -> float | None:
    """Cores the container's CPU quota allows (cgroup v2 ``cpu.max``: ``quota period``), or None
    without a quota. A pod limited to 1 CPU on a 32-core node sees 32 cores in its affinity mask;
    32 threads there would only queue behind the quota."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def available_cores(*, cgroup_cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPU cores this process may use: the affinity mask, capped by the container's CPU quota
    (rounded up: a quota of 1.5 CPUs keeps two threads busy), never the machine's count."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        cores = max(1, os.cpu_count() or 1)
    quota = cpu_quota(cgroup_cpu_max)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def single_threaded_blas() -> None:
    """Keep NumPy's BLAS to one thread in a process where ONNX Runtime owns the cores (the service,
    batch scoring). The unknown detector's small products otherwise wake OpenBLAS threads that keep
    spinning after them and slowed each next forward pass: a batch of 8 through the INT8 graph took
    49 ms instead of 37, and the INT8 service answered 26% fewer requests at concurrency 16. The
    limit holds for the calling thread (OpenBLAS keeps it per thread): thread pools that run NumPy
    call this as their initializer."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def session_options(
    *, intra_threads: int | None = None, allow_spinning: bool = True, cpu_arena: bool = True
) -> Any:
    """CPU session options: sequential execution, all graph optimizations, ``intra_threads`` per call.

    Args:
        intra_threads: threads of one call; ``None`` means every core this process may use.
        allow_spinning: idle threads spin (ORT's own default): fastest for one caller that keeps
            the cores busy (batch jobs); the service turns it off, so decoding keeps its CPU.
        cpu_arena: ORT's memory arena (grows to the largest batch run, then reuses it).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_threads or available_cores()
    options.inter_op_num_threads = 1  # sequential execution: one operator at a time
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = cpu_arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.log_severity_level = 3  # errors only: ORT's warnings are about its own fallbacks
    return options


def open_session(path: Path | str, options: Any | None = None) -> Any:
    """An ONNX Runtime CPU session over any graph file (``options``: :func:`session_options`)."""
    import onnxruntime as ort

    return ort.InferenceSession(
        str(path), sess_options=options or session_options(), providers=["CPUExecutionProvider"]
    )


def input_size(session: Any) -> tuple[int, int] | None:
    """The graph input's (H, W), or ``None`` when the graph leaves them symbolic (any size)."""
    shape = session.get_inputs()[0].shape
    if len(shape) != 4:
        raise CatsdogsError(f"the model input must be (N, 3, H, W), the graph's is {shape}")
    height, width = shape[2], shape[3]
    return (height, width) if isinstance(height, int) and isinstance(width, int) else None


def check_graph(session: Any, image_size: int, *, source: Path | str) -> None:
    """Refuse a graph without the ``input``/``logits`` contract or sized other than ``image_size``."""
    inputs = [tensor.name for tensor in session.get_inputs()]
    outputs = [tensor.name for tensor in session.get_outputs()]
    if inputs != [INPUT_NAME] or OUTPUT_NAME not in outputs:
        raise CatsdogsError(
            f"{source} must have the input {INPUT_NAME!r} and the output {OUTPUT_NAME!r}, "
            f"has inputs {inputs} and outputs {outputs}"
        )
    size = input_size(session)
    if size is not None and size != (image_size, image_size):
        raise CatsdogsError(
            f"{source} takes {size[0]}x{size[1]} images but preprocessing.json says "
            f"{image_size}x{image_size}: the bundle is inconsistent; re-export it (`catsdogs export`)"
        )


def open_model(path: Path | str, config: PreprocessConfig, *, options: Any | None = None) -> Any:
    """A session over a bundle's model graph, refused unless it fits the bundle's preprocessing."""
    session = open_session(path, options)
    check_graph(session, config.image_size, source=path)
    return session


def run_logits(session: Any, batch: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) float32 → (N, classes) logits of a model graph."""
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
    return logits


def output_names(session: Any) -> tuple[str, ...]:
    """The graph's outputs (older bundles have ``logits`` only)."""
    return tuple(tensor.name for tensor in session.get_outputs())


def run_named(session: Any, batch: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """(N, 3, H, W) float32 → the named outputs of one pass (ORT computes only what they need)."""
    return dict(zip(names, session.run(list(names), {INPUT_NAME: batch}), strict=True))
