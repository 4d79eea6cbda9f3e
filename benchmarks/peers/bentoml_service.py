"""The same model behind BentoML (the peer of benchmarks/bench_peers.py), configured as its
documentation's adaptive-batching guide shows: a batchable API with ``max_batch_size`` and
``max_latency_ms``, one worker per core. Decode and resize as the naive endpoint does.

    BUNDLE=path/to/bundle bentoml serve bentoml_service:CatsDogs --port 8002
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import bentoml
import numpy as np
from PIL.Image import Image

BUNDLE = os.environ["BUNDLE"]
WORKERS = int(os.environ.get("BENTO_WORKERS", "1"))


@bentoml.service(workers=WORKERS, traffic={"timeout": 60})
class CatsDogs:
    def __init__(self) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(f"{BUNDLE}/model.onnx")
        self.prep = json.loads(Path(BUNDLE, "preprocessing.json").read_text())

    @bentoml.api(batchable=True, max_batch_size=16, max_latency_ms=100, route="/predict")
    def predict(self, file: list[Image]) -> list[dict]:
        size = (self.prep["image_size"],) * 2
        x = np.stack([np.asarray(image.convert("RGB").resize(size), np.float32) for image in file])
        x = ((x / 255 - self.prep["mean"]) / self.prep["std"]).transpose(0, 3, 1, 2).astype(np.float32)
        logits = self.session.run(None, {"input": x})[0]
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        names = self.prep["class_names"]
        return [{"label": names[int(p.argmax())], "confidence": float(p.max())} for p in probs]
