"""The MLflow pyfunc definition of a catsdogs model ("models from code": this file, not a pickle).

:func:`catsdogs.registry.MlflowTracker.finish` logs this file as the model's code and the model
bundle as its ``bundle`` artifact, so ``mlflow.pyfunc.load_model("models:/catsdogs-classifier@champion")``
runs the same ONNX graph and the same preprocessing as the FastAPI service. Nothing is pickled.

Input: a DataFrame with an ``image`` column (or a list/array/Series) of raw image bytes or base64
strings (a ``data:image/...;base64,`` prefix is accepted). Output: one row per image with
``label``, ``confidence`` and one ``p_<class>`` column per class.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel, PythonModelContext

from catsdogs.registry.client import BUNDLE_ARTIFACT, INPUT_COLUMN


def _as_bytes(value: Any) -> bytes:
    """Raw bytes from bytes, bytearray, memoryview or a base64 string (the JSON-friendly form)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"an image string is not valid base64: {exc}") from None
    raise ValueError(f"an image must be bytes or a base64 string, got {type(value).__name__}")


def _column(model_input: Any) -> list[Any]:
    """The list of image values, whatever container the caller used."""
    if hasattr(model_input, "columns"):  # pandas DataFrame
        column = INPUT_COLUMN if INPUT_COLUMN in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if hasattr(model_input, "tolist"):  # Series or ndarray
        return list(model_input.tolist())
    if isinstance(model_input, bytes | str):
        return [model_input]
    return list(model_input)


class CatsdogsOnnxModel(PythonModel):
    """Runs the bundle's ``model.onnx`` (:mod:`catsdogs.runtime`) on images decoded and preprocessed by
    :mod:`catsdogs.preprocessing` with the bundle's own config, as the service and ``evaluate`` do."""

    def load_context(self, context: PythonModelContext) -> None:
        from catsdogs.bundle import find_bundle
        from catsdogs.runtime import open_model

        self._bundle = find_bundle(Path(context.artifacts[BUNDLE_ARTIFACT]))
        self._config = self._bundle.preprocessing
        self._session = open_model(self._bundle.onnx_path(), self._config)

    # ``model_input`` is left unannotated on purpose: MLflow turns a type hint into its own input
    # validation, which would fight the logged signature (binary ``image`` column).
    def predict(self, context: PythonModelContext, model_input, params: dict[str, Any] | None = None):
        import numpy as np
        import pandas as pd

        from catsdogs.preprocessing import decode_for_model, preprocess_batch, softmax
        from catsdogs.runtime import run_logits

        images = [decode_for_model(_as_bytes(value), self._config) for value in _column(model_input)]
        batch = preprocess_batch(images, self._config)
        logits = run_logits(self._session, batch)
        probabilities = softmax(logits.astype(np.float64))
        names = list(self._config.class_names)
        best = probabilities.argmax(axis=1) if len(images) else np.zeros(0, dtype=int)
        frame = pd.DataFrame(
            {
                "label": [names[index] for index in best],
                "confidence": probabilities.max(axis=1) if len(images) else np.zeros(0),
            }
        )
        for index, name in enumerate(names):
            frame[f"p_{name}"] = probabilities[:, index]
        return frame


# MLflow executes this file when it logs or loads the model; the package never imports it.
mlflow.models.set_model(CatsdogsOnnxModel())
